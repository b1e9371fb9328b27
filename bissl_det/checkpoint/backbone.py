"""MODEL.WEIGHTS that must initialise every backbone tensor: the one check all tools use.

A checkpoint that leaves a ResNet tensor at its random initialisation is refused before any
training, with the file, the missing / unexpected / mis-shaped keys and the converter command.
Empty MODEL.WEIGHTS (a deliberate random initialisation) is allowed with a warning.

* :func:`load_backbone_weights`: into a Detectron2 ResNet module (pretraining, the BiSSL lower
  level, the classifier); any format :func:`~.convert.convert_to_detectron2` reads.
* :func:`check_detector_weights`: before Detectron2's own loader fills a detector (fine-tuning).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .convert import convert_to_detectron2, detect_format, detectron2_backbone_name
from .io import load_checkpoint_file

__all__ = [
    "BackboneWeightsError",
    "check_detector_weights",
    "converter_command",
    "load_backbone_weights",
    "read_backbone_weights",
]

logger = logging.getLogger(__name__)

_SHOWN = 10  # keys listed per category in a message
_COUNTERS = "num_batches_tracked"  # BN step counters: never needed, often absent
_RUN_PREFIXES = ("encoder.resnet.", "lower.encoder.resnet.")  # this project's run checkpoints


class BackboneWeightsError(KeyError, ValueError):
    """MODEL.WEIGHTS would leave backbone tensors uninitialised (a KeyError for missing keys and
    a ValueError for the rest, so callers may catch either); the message says what to do."""

    def __str__(self) -> str:  # KeyError would print the message as a quoted repr
        return str(self.args[0]) if self.args else ""


def converter_command(path: str | os.PathLike[str]) -> str:
    """The command that converts ``path`` into a Detectron2 backbone file next to it."""
    path = Path(path)
    return f"python tools/convert_checkpoint.py {path} {path.with_name(path.stem + '_d2.pth')}"


def _listed(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return f"{keys[:_SHOWN]}{more}"


def _format_of(checkpoint: Any) -> str:
    try:
        layout = detect_format(checkpoint)
    except (ValueError, TypeError, AttributeError):
        return "no ResNet backbone was recognised in it"
    if any(k.startswith(_RUN_PREFIXES) for k in _model_entries(checkpoint)):
        return (
            "it is a training checkpoint of a pretraining or BiSSL run, whose backbone file is "
            "the run's pretext_backbone.pth / lower_backbone.pth"
        )
    return f"it reads as a '{layout}' checkpoint"


def _refusal(path: str, problem: str, checkpoint: Any = None) -> BackboneWeightsError:
    layout = f" ({_format_of(checkpoint)})" if checkpoint is not None else ""
    return BackboneWeightsError(
        f"MODEL.WEIGHTS = {path}: {problem}{layout}. Refusing to start from partly random "
        f"weights. Give a backbone export (pretext_backbone.pth, lower_backbone.pth) or "
        f"convert the file first: {converter_command(path)} (it reports the format, the "
        "dropped heads and any missing key); or set MODEL.RESNETS to the file's architecture"
    )


def _read(path: str, trust_pickle: bool = False) -> Any:
    if not path:
        raise ValueError("MODEL.WEIGHTS is empty: there is no checkpoint to read")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MODEL.WEIGHTS = {path}: file not found")
    return load_checkpoint_file(path, trust_pickle=trust_pickle)


def read_backbone_weights(
    path: str, *, trust_pickle: bool = False, checkpoint: Any = None
) -> dict[str, torch.Tensor]:
    """The Detectron2 ResNet state dict inside ``path`` (any supported format), heads dropped.

    ``checkpoint``: the file's content when the caller has read it already.

    Raises:
        FileNotFoundError, CheckpointFileError, UntrustedCheckpointError: from reading the file
            (each names it).
        BackboneWeightsError: no ResNet backbone found (names the file and the converter).
    """
    if checkpoint is None:
        checkpoint = _read(path, trust_pickle)
    try:
        result = convert_to_detectron2(checkpoint)
    except (ValueError, TypeError) as err:
        raise _refusal(path, f"no backbone can be read from it ({err})") from err
    if result.unconverted:
        logger.info("%s: %d keys neither backbone nor known head", path, len(result.unconverted))
    return result.model


def _mismatch(own: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str | None:
    """What keeps ``given`` (Detectron2 backbone names) from filling ``own``, or None."""
    missing = [k for k in own if k not in given and not k.endswith(_COUNTERS)]
    unexpected = [k for k in given if k not in own and not k.endswith(_COUNTERS)]
    shapes = [
        f"{k}: {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
        for k, v in given.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if shapes:
        return (
            f"backbone shapes do not match MODEL.RESNETS ({len(shapes)} tensors), e.g. {shapes[:5]}"
        )
    if missing or unexpected:
        return (
            f"{len(missing)} of {sum(not k.endswith(_COUNTERS) for k in own)} backbone tensors "
            "would stay uninitialised - missing "
            f"keys {_listed(missing)}, unexpected keys {_listed(unexpected)}"
        )
    return None


def load_backbone_weights(
    module: nn.Module,
    weights: str | Mapping[str, torch.Tensor],
    *,
    source: str | None = None,
    trust_pickle: bool = False,
) -> int:
    """Load every tensor of a Detectron2 ResNet ``module`` from MODEL.WEIGHTS, or refuse.

    Args:
        module: A Detectron2 ResNet (keys ``stem.*``, ``res2.*`` .. ``res5.*``).
        weights: The checkpoint path (any supported format), or a state dict already read by
            :func:`read_backbone_weights` (then ``source`` names its file in messages). An
            empty path keeps the random initialisation, with a warning.
        source: The file ``weights`` came from, when it is a state dict.
        trust_pickle: See :func:`~.io.load_checkpoint_file`.

    Returns:
        The number of tensors loaded (0 for empty ``weights``).

    Raises:
        BackboneWeightsError: a backbone tensor would keep its random value, or shapes differ;
            ``module`` is left unchanged.
    """
    if isinstance(weights, str):
        if not weights:
            logger.warning("MODEL.WEIGHTS is empty: the backbone keeps its random initialisation")
            return 0
        source, weights = weights, read_backbone_weights(weights, trust_pickle=trust_pickle)
    source = source or "<state dict>"
    own = module.state_dict()
    problem = _mismatch(own, weights)
    if problem:
        raise _refusal(source, problem)
    module.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
    return sum(1 for k in own if k in weights)


def _model_entries(checkpoint: Any) -> Mapping[str, Any]:
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), Mapping):
        return checkpoint["model"]
    return checkpoint if isinstance(checkpoint, Mapping) else {}


def check_detector_weights(model: nn.Module, path: str, *, whole_model: bool = False) -> str:
    """Refuse a file that Detectron2's loader would leave a ResNet tensor of ``model`` unset by.

    Two kinds of files initialise a detector: a backbone checkpoint (``matching_heuristics``:
    this project's exports and converted files), whose names Detectron2 matches by suffix, and
    a full detector checkpoint (e.g. a fine-tuning run's ``model_final.pth``), loaded by name.
    Anything else (an unconverted torchvision/MoCo file, a BiSSL or pretraining run's
    checkpoint) would load nothing and is refused with the converter command.

    Args:
        model: The detector about to be loaded.
        path: MODEL.WEIGHTS (non-empty).
        whole_model: Also require every non-backbone tensor (evaluation without training).

    Returns:
        "backbone" or "detector": a backbone file's values are checked after loading with
        :func:`~.verify.verify_backbone_loaded`.
    """
    checkpoint = _read(path)
    own = model.state_dict()
    own_backbone = {detectron2_backbone_name(k): v for k, v in own.items()}
    own_backbone.pop(None, None)
    if isinstance(checkpoint, Mapping) and checkpoint.get("matching_heuristics", False):
        if whole_model:
            raise _refusal(path, "a backbone checkpoint, but evaluation needs a trained detector")
        problem = _mismatch(own_backbone, read_backbone_weights(path, checkpoint=checkpoint))
        if problem:
            raise _refusal(path, problem)
        return "backbone"
    entries = _model_entries(checkpoint)
    required = [
        k
        for k in own
        if (whole_model or detectron2_backbone_name(k))
        and k not in ("pixel_mean", "pixel_std")
        and not k.endswith(_COUNTERS)
    ]
    missing = [k for k in required if k not in entries]
    shapes = [
        f"{k}: {tuple(entries[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        for k in required
        if k in entries and hasattr(entries[k], "shape") and entries[k].shape != own[k].shape
    ]
    if missing or shapes:
        unexpected = [k for k in entries if k not in own]
        raise _refusal(
            path,
            f"Detectron2 would leave {len(missing) + len(shapes)} of {len(required)} tensors "
            f"uninitialised - missing keys {_listed(missing)}, unexpected keys "
            f"{_listed(unexpected)}" + (f", shapes {shapes[:5]}" if shapes else ""),
            checkpoint,
        )
    return "detector"
