"""The one place that knows about Detectron2 builds without compiled ops.

PyPI's ``pb1-detectron2==0.6`` (see ``tools/install_detectron2.py``) installs upstream v0.6's Python
sources without ``detectron2._C``, on a modern numpy and Pillow. Upstream imports ``_C`` at
module import time in several layers (rotated boxes, deformable conv) and uses aliases that
numpy 1.24 and Pillow 10 removed. :func:`apply` restores exactly those, and only when ``_C`` is
missing: with a full Detectron2 build it changes nothing. It runs when :mod:`bissl_det` is
imported, before detectron2.

Faster R-CNN itself needs none of the compiled ops (it uses torchvision's ``roi_align`` and
``nms``); COCO evaluation then uses the pure-Python pycocotools path (``use_fast_impl=False``).
"""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
from PIL import Image

STUB_NAME = "detectron2._C"
# numpy 1.24 removed these builtin aliases; detectron2 v0.6 still uses them.
NUMPY_ALIASES = {"int": int, "float": float, "str": str, "bool": bool}


class MissingCompiledOpError(NotImplementedError, AttributeError):
    """A detectron2 C++/CUDA operator was used, but this build has none.

    It subclasses AttributeError too, so ``hasattr(_C, name)`` stays a plain False.
    """


NOT_BUILT = "not built (detectron2 without its C++ extension)"


class _MissingOps(types.ModuleType):
    """Stand-in for ``detectron2._C``: every operator access names the missing operator.

    Only the build-information queries that ``collect_env_info`` makes answer, truthfully.
    """

    def get_compiler_version(self) -> str:
        return NOT_BUILT

    def get_cuda_version(self) -> str:
        return NOT_BUILT

    def has_cuda(self) -> bool:
        return False

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise MissingCompiledOpError(
            f"detectron2._C.{name} is a compiled operator, and this detectron2 was installed "
            "without its C++ extension (the offline PyPI build of pb1-detectron2). Faster R-CNN "
            "with upright boxes does not need it; for rotated boxes, deformable convolution or "
            "the fast COCO evaluator install the full build: pip install --no-build-isolation "
            "'git+https://github.com/facebookresearch/detectron2.git'"
        )


def has_compiled_ops() -> bool:
    """Whether a real ``detectron2._C`` is importable (a full upstream build)."""
    existing = sys.modules.get(STUB_NAME)
    if existing is not None:
        return not isinstance(existing, _MissingOps)
    try:
        return importlib.util.find_spec(STUB_NAME) is not None
    except ModuleNotFoundError:  # detectron2 itself is not installed
        return False


def apply() -> bool:
    """Install the shims when detectron2's compiled ops are missing. Returns whether it did."""
    if has_compiled_ops() or importlib.util.find_spec("detectron2") is None:
        return False
    for name, value in NUMPY_ALIASES.items():
        if name not in np.__dict__:
            setattr(np, name, value)
    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR
    import detectron2

    stub = _MissingOps(STUB_NAME, "Stand-in for detectron2's missing compiled operators.")
    sys.modules[STUB_NAME] = stub
    detectron2._C = stub
    return True


COMPILED_OPS_STUBBED = apply()
