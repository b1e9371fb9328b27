"""The warnings every start printed, silenced where they arise and nowhere else.

``fvcore.nn.focal_loss`` and ``detectron2.modeling.box_regression`` call ``torch.jit.script``
when they are imported, and torch >= 2.10 deprecates it with a FutureWarning: warnings on every
start, even for ``--help``, about code this project never calls. :mod:`bissl_det` imports this
module right after :mod:`bissl_det.compat` (detectron2 needs the shims first): it imports those
two modules once under a filter for exactly that message (and
:func:`~bissl_det.bilevel.curvature.output_jvp` the forward-mode decompositions torch scripts at
the first dual tensor, when forward-mode products are first used). Later imports are cached, and a
``torch.jit.script`` call in user code still warns.

detectron2 v0.6's anchor generator calls ``torch.meshgrid`` without ``indexing=`` (its result
is the "ij" default either way) and torch warns at the first training step: that message is
filtered for good (the call is inside torch.functional, whoever calls it).

``torch.utils.cpp_extension`` (imported by detectron2's environment report, which every tool
logs at start-up) logs "No CUDA runtime is found, using CUDA_HOME=..." on any machine without a
GPU that has a CUDA toolkit folder: a statement about compiling extensions, which this project
never does. A filter on that logger drops exactly that line; its other warnings still show.
"""

from __future__ import annotations

import importlib
import logging
import warnings

TORCH_JIT_DEPRECATION = r"`torch\.jit\.script` is (deprecated|not supported)"
MESHGRID_INDEXING = (
    r"torch\.meshgrid: in an upcoming release, it will be required to pass the indexing"
)
SCRIPTED_AT_IMPORT = ("fvcore.nn.focal_loss", "detectron2.modeling.box_regression")
NO_CUDA_RUNTIME = "No CUDA runtime is found, using CUDA_HOME="


class DropMessage(logging.Filter):
    """Drops the records of one logger whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def import_quietly(modules: tuple[str, ...] = SCRIPTED_AT_IMPORT) -> None:
    """Import ``modules`` without the torch.jit deprecation FutureWarning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TORCH_JIT_DEPRECATION, category=FutureWarning)
        for name in modules:
            importlib.import_module(name)


import_quietly()
warnings.filterwarnings(
    "ignore", message=MESHGRID_INDEXING, category=UserWarning, module="torch.functional"
)
# Before anything imports torch.utils.cpp_extension (it logs once, at import).
logging.getLogger("torch.utils.cpp_extension").addFilter(DropMessage(NO_CUDA_RUNTIME))
