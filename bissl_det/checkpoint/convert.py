"""Finding the one online ResNet inside a checkpoint of any supported codebase, as Detectron2 keys.

Around the backbone, each source codebase wraps the keys differently (a DDP ``module.`` prefix, a
``state_dict`` entry, a ``backbone.`` attribute, momentum copies, projection heads, queues).
:func:`convert_to_detectron2` finds the one online backbone, converts it (key names in
:mod:`.keys`), drops the known heads by name and reports everything else, so that nothing is
lost silently. Pure functions over state dicts (no file access, no model construction).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .keys import _lightly_key_to_tv, _tv_key_to_d2, is_bare_detectron2_key, is_head_key

__all__ = [
    "FORMATS",
    "ConversionResult",
    "convert_to_detectron2",
    "detect_format",
    "detectron2_backbone_name",
    "extract_state_dict",
]

#: Source formats :func:`convert_to_detectron2` understands (plus "auto").
FORMATS: tuple[str, ...] = (
    "torchvision",
    "timm",
    "moco",
    "solo-learn",
    "lightly",
    "bissl",
    "detectron2",
)

# Prefix components added by wrappers around the whole model: DDP, Lightning, torch.compile.
_WRAPPERS = ("module", "model", "_orig_mod")
_WRAPPER_PREFIX = re.compile(r"^(?:(?:module|model|_orig_mod)\.)*")


@dataclass
class ConversionResult:
    """What :func:`convert_to_detectron2` made of a checkpoint.

    Attributes:
        model: Detectron2 ResNet state dict (``stem.*``, ``res2.*`` .. ``res5.*``).
        dropped_heads: Source keys recognised as heads, momentum copies or buffers and dropped.
        unconverted: Source keys that are neither backbone weights nor a known head.
        source_format: The format the keys were read as (one of :data:`FORMATS`).
        backbone_prefix: The prefix under which the backbone was found ("" for a bare state dict).
    """

    model: dict[str, torch.Tensor]
    dropped_heads: list[str] = field(default_factory=list)
    unconverted: list[str] = field(default_factory=list)
    source_format: str = ""
    backbone_prefix: str = ""


# ---------------------------------------------------------------------------------------------
# Format detection and conversion
# ---------------------------------------------------------------------------------------------


def _is_tensor_like(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def extract_state_dict(checkpoint: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Find the state dict inside a checkpoint.

    A checkpoint whose values are all tensors (or NumPy arrays) is a state dict itself; otherwise
    the first of ``state_dict`` (MoCo, Lightning), ``model`` (Detectron2, BiSSL) and ``model_state``
    (pycls) holding tensors is used.

    Args:
        checkpoint: The object loaded from a checkpoint file.

    Returns:
        ``(state_dict, container_key)``; ``container_key`` is None for a bare state dict.

    Raises:
        ValueError: when no state dict is found (names the top-level keys).
    """
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise ValueError(f"checkpoint must be a non-empty dict, got {type(checkpoint).__name__}")
    if all(_is_tensor_like(v) for v in checkpoint.values()):
        return dict(checkpoint), None
    for container in ("state_dict", "model", "model_state"):
        inner = checkpoint.get(container)
        if isinstance(inner, Mapping) and any(_is_tensor_like(v) for v in inner.values()):
            return dict(inner), container
    raise ValueError(
        "no state dict found in checkpoint: expected tensors at the top level or under "
        f"'state_dict', 'model' or 'model_state'; top-level keys are {sorted(map(str, checkpoint))}"
    )


def _backbone_prefixes(keys: Iterable[str], layout: str) -> list[str]:
    """Prefixes under which a ResNet body lives, momentum/target/head copies excluded."""
    anchor = "4.0.conv1.weight" if layout == "lightly" else "layer1.0.conv1.weight"
    prefixes = {k[: -len(anchor)] for k in keys if k.endswith(anchor)}
    # A prefix must end at a component boundary ("backbone." not "xbackbone").
    prefixes = {p for p in prefixes if p == "" or p.endswith(".")}
    return sorted(p for p in prefixes if not is_head_key(p.rstrip(".")))


def _last_component(prefix: str) -> str:
    return prefix.rstrip(".").rsplit(".", 1)[-1] if prefix else ""


def _is_wrapper_only(prefix: str) -> bool:
    return all(part in _WRAPPERS for part in prefix.rstrip(".").split(".")) if prefix else True


def _has_d2_keys(keys: Iterable[str]) -> bool:
    return any(detectron2_backbone_name(k) is not None for k in keys)


# Where a Detectron2 ResNet sits: a bare backbone, a detector (C4 / FPN), and this project's own
# training checkpoints (pretraining: the encoder; BiSSL: theta, the lower level's encoder).
_D2_LOCATIONS = ("", "backbone.", "backbone.bottom_up.", "encoder.resnet.", "lower.encoder.resnet.")


def detectron2_backbone_name(key: str) -> str | None:
    """Bare Detectron2 backbone key (``res2.0.conv1.weight``) of a key of a Detectron2 backbone,
    detector or training checkpoint of this project; None for any other key."""
    key = key[_WRAPPER_PREFIX.match(key).end() :]
    for location in _D2_LOCATIONS:
        if key.startswith(location) and is_bare_detectron2_key(key[len(location) :]):
            return key[len(location) :]
    # R50-C4 detectors run res5 inside the ROI head.
    if key.startswith("roi_heads.res5.") and is_bare_detectron2_key(key[len("roi_heads.") :]):
        return key[len("roi_heads.") :]
    return None


def detect_format(checkpoint: Mapping[str, Any]) -> str:
    """Guess which codebase wrote a checkpoint from its key layout.

    Rules, in order: Detectron2 backbone keys -> "detectron2"; an online MoCo encoder
    (``encoder_q.``/``base_encoder.``) -> "moco"; a ``nn.Sequential`` ResNet body
    (``backbone.0.weight``, ``backbone.4.0.conv1.weight``) -> "lightly"; ``backbone.`` keys in a
    Lightning checkpoint or next to solo-learn's online ``classifier`` -> "solo-learn"; a bare
    torchvision layout with ``head.fc`` -> "timm", with nothing around it -> "torchvision"; any
    other torchvision layout (wrapped in ``model``/``state_dict`` or behind a prefix) -> "bissl".
    torchvision, timm and bissl convert identically; only the reporting differs.

    Args:
        checkpoint: The loaded checkpoint (dict).

    Returns:
        One of :data:`FORMATS`.

    Raises:
        ValueError: for Caffe2-named checkpoints and for checkpoints with no ResNet keys.
    """
    if checkpoint.get("__author__") == "Caffe2":
        raise ValueError(
            "this is a Caffe2/Detectron1 checkpoint (Caffe2 blob names); do not convert it: pass "
            "the .pkl file to Detectron2's MODEL.WEIGHTS directly, DetectionCheckpointer renames it"
        )
    sd, container = extract_state_dict(checkpoint)
    keys = list(sd)
    if _has_d2_keys(keys):
        return "detectron2"
    tv_prefixes = _backbone_prefixes(keys, "torchvision")
    if any(_last_component(p) in ("encoder_q", "base_encoder") for p in tv_prefixes):
        return "moco"
    lightly_prefixes = _backbone_prefixes(keys, "lightly")
    if lightly_prefixes and not tv_prefixes:
        return "lightly"
    if any(_last_component(p) == "backbone" for p in tv_prefixes):
        lightning = "pytorch-lightning_version" in checkpoint or "hyper_parameters" in checkpoint
        solo_classifier = any(_WRAPPER_PREFIX.sub("", k).startswith("classifier.") for k in keys)
        if container == "state_dict" and (lightning or solo_classifier):
            return "solo-learn"
        return "bissl"
    if "" in tv_prefixes and container is None:
        return "timm" if any(k.startswith("head.fc.") for k in keys) else "torchvision"
    if tv_prefixes:
        return "bissl"
    raise ValueError(
        "cannot detect the checkpoint format: no ResNet keys found (looked for '*layer1.0.conv1."
        f"weight', '*4.0.conv1.weight' and Detectron2's 'res2.0.conv1.weight'); first keys: "
        f"{keys[:8]}"
    )


def _select_prefix(sd: Mapping[str, Any], fmt: str) -> str:
    layout = "lightly" if fmt == "lightly" else "torchvision"
    candidates = _backbone_prefixes(sd, layout)
    if fmt == "moco":
        candidates = [p for p in candidates if _last_component(p) in ("encoder_q", "base_encoder")]
    elif fmt == "solo-learn":
        candidates = [p for p in candidates if _last_component(p) == "backbone"]
    elif fmt in ("torchvision", "timm"):
        candidates = [p for p in candidates if _is_wrapper_only(p)]
    if len(candidates) == 1:
        return candidates[0]
    anchor = "4.0.conv1.weight" if layout == "lightly" else "layer1.0.conv1.weight"
    if not candidates:
        raise ValueError(
            f"no {fmt} backbone found: no key ends with '{anchor}' under a prefix valid for "
            f"{fmt}; first keys: {list(sd)[:8]}"
        )
    raise ValueError(
        f"several ResNet bodies found under prefixes {candidates}; choose one with "
        "backbone_prefix=... (CLI: --prefix)"
    )


def _as_tensor(value: Any, key: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise TypeError(f"checkpoint entry '{key}' is a {type(value).__name__}, expected a tensor")


def _convert_detectron2(sd: Mapping[str, Any]) -> ConversionResult:
    result = ConversionResult(model={}, source_format="detectron2")
    for key, value in sd.items():
        name = detectron2_backbone_name(key)
        if name is None:
            (result.dropped_heads if is_head_key(key) else result.unconverted).append(key)
            continue
        if name in result.model:
            raise ValueError(
                f"two checkpoint entries map to backbone key '{name}' (one is '{key}')"
            )
        result.model[name] = _as_tensor(value, key)
    return result


def convert_to_detectron2(
    checkpoint: Mapping[str, Any], fmt: str = "auto", backbone_prefix: str | None = None
) -> ConversionResult:
    """Convert a ResNet checkpoint of any supported format to Detectron2 backbone keys.

    Heads (classifier ``fc``/``head.fc``, projectors, predictors, momentum/target encoders, MoCo
    queues, detector heads) are dropped explicitly and listed in ``dropped_heads``; any other
    key that is not converted is listed in ``unconverted``. Completeness is not checked here: call
    :func:`.keys.check_complete` on ``result.model``.

    Args:
        checkpoint: The loaded checkpoint: a state dict or a dict holding one (see
            :func:`extract_state_dict`). NumPy arrays are turned into tensors.
        fmt: "auto" (see :func:`detect_format`) or one of :data:`FORMATS`.
        backbone_prefix: The prefix of the backbone keys (e.g. ``"module.encoder_q."``); found
            automatically when None. Not used for "detectron2".

    Returns:
        The :class:`ConversionResult`.

    Raises:
        ValueError: unknown format, no backbone found, or several candidate backbones.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format '{fmt}'; expected 'auto' or one of {FORMATS}")
    sd, _ = extract_state_dict(checkpoint)
    source = detect_format(checkpoint) if fmt == "auto" else fmt
    if source == "detectron2":
        return _convert_detectron2(sd)
    prefix = _select_prefix(sd, source) if backbone_prefix is None else backbone_prefix
    result = ConversionResult(model={}, source_format=source, backbone_prefix=prefix)
    for key, value in sd.items():
        inner = key[len(prefix) :] if key.startswith(prefix) else None
        if inner is not None:
            tv_key = _lightly_key_to_tv(inner) if source == "lightly" else inner
            d2_key = _tv_key_to_d2(tv_key) if tv_key is not None else None
            if d2_key is not None:
                result.model[d2_key] = _as_tensor(value, key)
                continue
        # Judge names below the backbone prefix, so a user-given prefix is never itself a "head".
        if is_head_key(inner if inner is not None else key):
            result.dropped_heads.append(key)
        else:
            result.unconverted.append(key)
    return result
