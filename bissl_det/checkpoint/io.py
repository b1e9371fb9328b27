"""Checkpoint files: the one atomic writer, the one safe reader, Detectron2 backbone files.

Every checkpoint, export and tag of the project is written by :func:`atomic_save` /
:func:`atomic_write_text` (temporary file in the same folder, fsync, rename), and every file is
read by :func:`load_checkpoint_file`, whose errors always name the path and which never
unpickles a Python object other than tensors, NumPy arrays and plain containers unless the caller
opts in (``trust_pickle``, logged as a warning).

The backbone checkpoint format is the one Detectron2's ``DetectionCheckpointer`` loads with its
name-matching heuristics (as MoCo's converted checkpoints are)::

    {"model": {detectron2 key: tensor}, "__author__": str, "matching_heuristics": True}

With ``matching_heuristics`` Detectron2 matches ``res5.*`` to ``roi_heads.res5.*`` in R50-C4 and
``res2.*`` to ``backbone.bottom_up.res2.*`` in FPN models.
"""

from __future__ import annotations

import codecs
import collections
import logging
import os
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..utils.files import _atomic_write, atomic_write_text

__all__ = [
    "CheckpointFileError",
    "UntrustedCheckpointError",
    "safe_unpickle",
    "atomic_save",
    "atomic_write_text",
    "load_checkpoint_file",
    "save_backbone_checkpoint",
]

logger = logging.getLogger(__name__)

_RESERVED_KEYS = ("model", "__author__", "matching_heuristics")


class CheckpointFileError(ValueError):
    """A file is empty, truncated, corrupt or not a checkpoint; the message names the path."""


class UntrustedCheckpointError(ValueError):
    """A checkpoint holds pickled Python objects that ``torch.load(weights_only=True)`` refuses."""


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`_atomic_write`)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def save_backbone_checkpoint(
    path: str | os.PathLike[str],
    model_sd: Mapping[str, torch.Tensor],
    author: str = "bissl_det",
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a Detectron2 backbone checkpoint, atomically.

    The payload goes to a temporary file in the destination directory, which then replaces
    ``path`` with :func:`os.replace`: a failed or interrupted write never leaves a partial file,
    and an existing file at ``path`` survives a failed write unchanged.

    Args:
        path: Destination ``.pth`` file (parent directories are created). Not ``.pkl``:
            Detectron2 reads ``.pkl`` files with ``pickle``, not ``torch.load``.
        model_sd: Detectron2 state dict. Tensors are detached and moved to CPU; floating-point
            tensors (e.g. fp16/bf16 training weights) are cast to float32, integer buffers
            (``num_batches_tracked``) keep their dtype.
        author: Stored as ``__author__`` (Detectron2 logs it; "Caffe2" would trigger Caffe2
            renaming, so it is refused).
        extra: Further top-level entries (e.g. provenance strings); must not use the reserved
            keys ``model``, ``__author__``, ``matching_heuristics``.

    Raises:
        ValueError: for a ``.pkl`` path, author "Caffe2", a reserved key in ``extra`` or a
            non-tensor value in ``model_sd``.
    """
    path = os.fspath(path)
    if path.endswith(".pkl"):
        raise ValueError(
            f"{path}: a backbone checkpoint is written with torch.save and must not end in .pkl "
            "(Detectron2 would read it with pickle); use .pth"
        )
    if author == "Caffe2":
        raise ValueError(
            "author 'Caffe2' makes Detectron2 rename keys as Caffe2 blobs; pick another"
        )
    clashes = sorted(set(extra or {}) & set(_RESERVED_KEYS))
    if clashes:
        raise ValueError(f"extra entries {clashes} clash with the reserved keys {_RESERVED_KEYS}")

    model: dict[str, torch.Tensor] = {}
    for key, value in model_sd.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"model entry '{key}' is a {type(value).__name__}, expected a tensor")
        value = value.detach().to("cpu")
        model[key] = value.float() if value.is_floating_point() else value
    payload = {**(extra or {}), "model": model, "__author__": author, "matching_heuristics": True}

    atomic_save(payload, path)


def _refusal_reason(err: Exception) -> str:
    """The part of torch's weights-only error that says what it refused."""
    text = str(err)
    start = text.find("WeightsUnpickler error:")
    if start < 0:
        return text.splitlines()[0] if text else repr(err)
    reason = text[start:].split("Check the documentation")[0]
    return " ".join(reason.split())


def _unreadable(path: str, err: BaseException) -> CheckpointFileError:
    size = os.path.getsize(path)
    reason = str(err).splitlines()[0] if str(err) else ""
    return CheckpointFileError(
        f"{path} is not a readable torch checkpoint ({size} bytes: truncated by an interrupted "
        f"write or copy, corrupt, or not written by torch.save): {type(err).__name__}: {reason}"
    )


# The globals a pickle of NumPy arrays in plain containers needs (Detectron2 / Caffe2 model-zoo
# files, written by Python 2 or 3, pickle protocols 0-5), and nothing else: none of these
# callables can run code, import a module or touch a file.
_NUMPY_CORE = getattr(np, "_core", None) or np.core  # NumPy 2 renamed numpy.core to numpy._core
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles written by Python 3
    ("collections", "OrderedDict"): collections.OrderedDict,
}
for _module in ("numpy.core", "numpy._core"):
    _SAFE_GLOBALS[(f"{_module}.multiarray", "_reconstruct")] = _NUMPY_CORE.multiarray._reconstruct
    _SAFE_GLOBALS[(f"{_module}.multiarray", "scalar")] = _NUMPY_CORE.multiarray.scalar
    _SAFE_GLOBALS[(f"{_module}.numeric", "_frombuffer")] = _NUMPY_CORE.numeric._frombuffer


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays, scalars, dtypes and plain containers; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"Unsupported global: {module}.{name}") from None


def safe_unpickle(path: str) -> Any:
    """Read a pickle file that may hold only NumPy arrays and plain containers.

    Raises:
        UntrustedCheckpointError: it refers to any other Python global (which a full unpickle
            would import and may call: arbitrary code); the message names the path and global.
        CheckpointFileError: not a readable pickle.
    """
    try:
        with open(path, "rb") as f:
            # latin1: Caffe2/Detectron1 pickles were written by Python 2.
            return _ArraysOnlyUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):
            raise _unreadable(path, err) from err
        raise UntrustedCheckpointError(
            f"{path} is a pickle that refers to Python objects besides NumPy arrays and plain "
            f"containers ({err}): loading it could execute code, so it was not unpickled. If "
            "you trust the file's source, convert it once with tools/convert_checkpoint.py "
            "--trust-pickle (logged) and use the converted .pth"
        ) from err
    except Exception as err:
        raise _unreadable(path, err) from err


def load_checkpoint_file(path: str | os.PathLike[str], trust_pickle: bool = False) -> Any:
    """Load a checkpoint file onto the CPU.

    ``.pth``/``.pt``/``.ckpt``/``.tar`` files are read with ``torch.load(weights_only=True)``,
    which only rebuilds tensors and plain containers. Files that also pickle Python objects
    (``argparse.Namespace`` hyper-parameters, OmegaConf configs in Lightning checkpoints) are
    refused unless ``trust_pickle=True``, which unpickles them fully and can run arbitrary code.

    ``.pkl`` files (Detectron2 model zoo / Caffe2 format: a pickle of NumPy arrays such as
    ``{"model": {...}, "__author__": ...}``) are read by :func:`safe_unpickle`, which refuses
    any other Python object; ``trust_pickle=True`` unpickles them fully (logged).

    Args:
        path: The checkpoint file.
        trust_pickle: Fall back to a full unpickle when the safe load refuses the file.

    Returns:
        The loaded object (usually a dict).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CheckpointFileError: if the file is empty, truncated, corrupt or not a checkpoint (torch's
            own errors - ``EOFError``, ``PytorchStreamReader failed``, ``KeyError`` - do not say
            which file).
        UntrustedCheckpointError: if the file holds pickled objects and ``trust_pickle`` is False.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointFileError(
            f"{path} is empty (0 bytes): an interrupted write or copy; use an earlier file"
        )
    if path.endswith(".pkl"):
        if not trust_pickle:
            return safe_unpickle(path)
        logger.warning(
            "Reading %s with a full pickle.load because trust_pickle=True: this can execute "
            "arbitrary code and must only be done for trusted files",
            path,
        )
        try:
            with open(path, "rb") as f:
                return pickle.load(f, encoding="latin1")  # latin1: Python 2 pickles
        except Exception as err:
            raise _unreadable(path, err) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # Only a refused Python object is a question of trust; anything else is a broken file.
        if not any(s in str(err) for s in ("Unsupported global", "Unsupported class")):
            raise CheckpointFileError(
                f"{path} is not a readable torch checkpoint (corrupt or not written by "
                f"torch.save): {_refusal_reason(err)}"
            ) from err
        if not trust_pickle:
            raise UntrustedCheckpointError(
                f"{path} holds pickled Python objects besides tensors (e.g. training arguments "
                "or a config object), so the safe torch.load(weights_only=True) refused it. If "
                "you trust the file's source, load it with trust_pickle=True (CLI: "
                f"--trust-pickle); unpickling can execute arbitrary code. {_refusal_reason(err)}"
            ) from err
    except Exception as err:
        raise _unreadable(path, err) from err
    logger.warning(
        "Loading %s with torch.load(weights_only=False) because trust_pickle=True: this "
        "unpickles arbitrary objects and must only be done for trusted files",
        path,
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise _unreadable(path, err) from err
