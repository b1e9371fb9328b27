"""Key conversion between ResNet checkpoint layouts and Detectron2's ResNet.

Pure functions over state dicts (no file access, no model construction). Two layouts exist for the
same ResNet weights:

* torchvision (also timm and most SSL codebases): ``conv1``, ``bn1``, ``layer1..4.<b>.conv<j>``,
  ``layer<i>.<b>.bn<j>``, ``layer<i>.<b>.downsample.{0,1}`` and a ``fc`` classifier;
* Detectron2: ``stem.conv1``, ``stem.conv1.norm``, ``res2..5.<b>.conv<j>``,
  ``res<i>.<b>.conv<j>.norm``, ``res<i>.<b>.shortcut`` and ``res<i>.<b>.shortcut.norm``.

Around the backbone, each source codebase wraps the keys differently (a DDP ``module.`` prefix, a
``state_dict`` entry, a ``backbone.`` attribute, momentum copies, projection heads, queues).
:func:`convert_to_detectron2` finds the one online backbone, converts it, drops the known heads by
name and reports everything else, so that nothing is lost silently.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "FORMATS",
    "ConversionResult",
    "check_complete",
    "convert_to_detectron2",
    "detect_format",
    "detectron2_to_torchvision",
    "extract_state_dict",
    "is_head_key",
    "resnet50_detectron2_keys",
    "resnet_detectron2_keys",
    "torchvision_to_detectron2",
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

_BN_LEAVES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# Prefix components added by wrappers around the whole model: DDP, Lightning, torch.compile.
_WRAPPERS = ("module", "model", "_orig_mod")
_WRAPPER_PREFIX = re.compile(r"^(?:(?:module|model|_orig_mod)\.)*")

# Names of modules that are not the online backbone in the supported codebases: classifiers,
# SSL heads, momentum/target copies, MoCo queues, memory banks, detector heads.
_HEAD_NAMES = frozenset(
    {
        "fc",
        "head",
        "heads",
        "classifier",
        "projector",
        "predictor",
        "projection_head",
        "prediction_head",
        "projection",
        "prediction",
        "encoder_k",
        "momentum_encoder",
        "teacher",
        "queue",
        "queue_ptr",
        "queue_idx",
        "prototypes",
        "memory_bank",
        "criterion",
        "proposal_generator",
        "roi_heads",
        "top_block",
        "pixel_mean",
        "pixel_std",
    }
)

_TV_STEM = re.compile(r"^(conv1|bn1)\.(\w+)$")
_TV_BLOCK = re.compile(
    r"^layer([1-4])\.(\d+)\.(conv[1-3]|bn[1-3]|downsample\.0|downsample\.1)\.(\w+)$"
)
_D2_STEM = re.compile(r"^stem\.conv1\.(weight|norm\.\w+)$")
_D2_BLOCK = re.compile(r"^res([2-5])\.(\d+)\.(conv[1-3]|shortcut)\.(weight|norm\.\w+)$")
# torchvision's nn.Sequential(*resnet.children()[:-1]) (lightly): index -> torchvision name.
# Indices 2 (relu), 3 (maxpool) and 8 (avgpool) hold no parameters.
_LIGHTLY_CHILDREN = {
    "0": "conv1",
    "1": "bn1",
    "4": "layer1",
    "5": "layer2",
    "6": "layer3",
    "7": "layer4",
}

_STAGE_BLOCKS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}


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
# Single-key mappings
# ---------------------------------------------------------------------------------------------


def _norm_leaf(leaf: str) -> str | None:
    return f"norm.{leaf}" if leaf in _BN_LEAVES else None


def _tv_key_to_d2(key: str) -> str | None:
    """Detectron2 name of one torchvision ResNet key, or None if it is not a backbone key."""
    m = _TV_STEM.match(key)
    if m:
        module, leaf = m.groups()
        if module == "conv1":
            return "stem.conv1.weight" if leaf == "weight" else None
        norm = _norm_leaf(leaf)
        return f"stem.conv1.{norm}" if norm else None
    m = _TV_BLOCK.match(key)
    if not m:
        return None
    stage, block, module, leaf = m.groups()
    # torchvision layer1..4 are Detectron2's res2..5 (named after their output stride 2^i).
    prefix = f"res{int(stage) + 1}.{block}"
    if module.startswith("conv"):
        return f"{prefix}.{module}.weight" if leaf == "weight" else None
    if module.startswith("bn"):
        norm = _norm_leaf(leaf)
        return f"{prefix}.conv{module[2]}.{norm}" if norm else None
    if module == "downsample.0":
        return f"{prefix}.shortcut.weight" if leaf == "weight" else None
    norm = _norm_leaf(leaf)
    return f"{prefix}.shortcut.{norm}" if norm else None


def _d2_key_to_tv(key: str) -> str | None:
    """torchvision name of one Detectron2 ResNet key, or None if it is not a backbone key."""
    m = _D2_STEM.match(key)
    if m:
        leaf = m.group(1)
        if leaf == "weight":
            return "conv1.weight"
        return f"bn1.{leaf[5:]}" if leaf[5:] in _BN_LEAVES else None
    m = _D2_BLOCK.match(key)
    if not m:
        return None
    stage, block, module, leaf = m.groups()
    prefix = f"layer{int(stage) - 1}.{block}"
    if leaf == "weight":
        return (
            f"{prefix}.downsample.0.weight" if module == "shortcut" else f"{prefix}.{module}.weight"
        )
    bn_leaf = leaf[5:]
    if bn_leaf not in _BN_LEAVES:
        return None
    if module == "shortcut":
        return f"{prefix}.downsample.1.{bn_leaf}"
    return f"{prefix}.bn{module[4]}.{bn_leaf}"


def _is_d2_backbone_key(key: str) -> bool:
    return _d2_key_to_tv(key) is not None


def _lightly_key_to_tv(key: str) -> str | None:
    """torchvision name of a key of ``nn.Sequential(*resnet.children()[:-1])``."""
    index, _, rest = key.partition(".")
    name = _LIGHTLY_CHILDREN.get(index)
    return f"{name}.{rest}" if name and rest else None


def is_head_key(key: str) -> bool:
    """Whether a key belongs to a known non-backbone module (head, momentum copy, queue...).

    A key is a head key when one of its dotted components is a known head name (``fc``,
    ``projector``, ``encoder_k``, ``queue``, ...) or looks like a momentum/target copy
    (``momentum_*``, ``*_momentum``, ``target_*``) or an FPN neck (``fpn_*``).
    """
    for part in key.split("."):
        if part in _HEAD_NAMES or part.startswith(("momentum_", "target_", "fpn_")):
            return True
        if part.endswith("_momentum"):
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Whole state dicts in one layout
# ---------------------------------------------------------------------------------------------


def torchvision_to_detectron2(
    sd: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a torchvision-layout ResNet state dict to Detectron2's ResNet keys.

    Args:
        sd: State dict with torchvision keys (``conv1.weight``, ``layer1.0.bn1.weight``, ...).

    Returns:
        ``(converted, unconverted)``: the Detectron2 state dict (same tensor objects) and the
        source keys that are not ResNet backbone keys (e.g. ``fc.weight``), in source order.
    """
    converted: dict[str, torch.Tensor] = {}
    unconverted: list[str] = []
    for key, value in sd.items():
        new_key = _tv_key_to_d2(key)
        if new_key is None:
            unconverted.append(key)
        else:
            converted[new_key] = value
    return converted, unconverted


def detectron2_to_torchvision(
    sd: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Exact inverse of :func:`torchvision_to_detectron2` on backbone keys.

    Used to export a backbone trained in Detectron2 to torchvision's ``resnet50`` (classification).

    Args:
        sd: State dict with Detectron2 ResNet keys (``stem.conv1.weight``,
            ``res2.0.conv1.norm.bias``, ...).

    Returns:
        ``(converted, unconverted)``: the torchvision state dict and the keys that were not
        Detectron2 ResNet backbone keys.
    """
    converted: dict[str, torch.Tensor] = {}
    unconverted: list[str] = []
    for key, value in sd.items():
        new_key = _d2_key_to_tv(key)
        if new_key is None:
            unconverted.append(key)
        else:
            converted[new_key] = value
    return converted, unconverted


# ---------------------------------------------------------------------------------------------
# Expected keys and completeness
# ---------------------------------------------------------------------------------------------


def resnet_detectron2_keys(depth: int = 50) -> set[str]:
    """Keys of Detectron2's ResNet-``depth`` backbone (stem, res2..res5) with BatchNorm buffers.

    ``num_batches_tracked`` is not part of the set: Detectron2's default FrozenBN has none and
    Caffe2-era checkpoints never carry it; :func:`check_complete` accepts it where present.

    Args:
        depth: 18, 34, 50, 101 or 152.

    Returns:
        The set of parameter and buffer names.
    """
    if depth not in _STAGE_BLOCKS:
        raise ValueError(
            f"unsupported ResNet depth {depth}; expected one of {sorted(_STAGE_BLOCKS)}"
        )
    bottleneck = depth >= 50
    norm_leaves = ("weight", "bias", "running_mean", "running_var")

    def layer(name: str) -> list[str]:
        return [f"{name}.weight"] + [f"{name}.norm.{leaf}" for leaf in norm_leaves]

    keys = set(layer("stem.conv1"))
    n_convs = 3 if bottleneck else 2
    for stage, n_blocks in zip(range(2, 6), _STAGE_BLOCKS[depth], strict=True):
        for block in range(n_blocks):
            for conv in range(1, n_convs + 1):
                keys.update(layer(f"res{stage}.{block}.conv{conv}"))
            # Channel count changes only in the first block of a stage; basic-block res2 keeps 64.
            if block == 0 and (bottleneck or stage > 2):
                keys.update(layer(f"res{stage}.{block}.shortcut"))
    return keys


def resnet50_detectron2_keys() -> set[str]:
    """Keys of Detectron2's ResNet-50 backbone; see :func:`resnet_detectron2_keys`."""
    return resnet_detectron2_keys(50)


def _preview(keys: Iterable[str], limit: int = 40) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_complete(model_sd: Mapping[str, Any], reference_keys: Iterable[str]) -> None:
    """Refuse a converted backbone that lacks expected keys or carries unexpected ones.

    Args:
        model_sd: Converted Detectron2 state dict.
        reference_keys: Expected keys, e.g. :func:`resnet50_detectron2_keys`.

    Raises:
        ValueError: naming every missing key and every unexpected key. A
            ``<bn>.num_batches_tracked`` is accepted when ``<bn>.running_mean`` is expected.
    """
    reference = set(reference_keys)
    present = set(model_sd)
    missing = reference - present
    unexpected = {
        k
        for k in present - reference
        if not (
            k.endswith(".num_batches_tracked")
            and k[: -len("num_batches_tracked")] + "running_mean" in reference
        )
    }
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} backbone keys missing: {_preview(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {_preview(unexpected)}")
    raise ValueError("converted checkpoint is incomplete: " + "; ".join(parts))


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
    return any(_d2_backbone_name(k) is not None for k in keys)


def _d2_backbone_name(key: str) -> str | None:
    """Bare Detectron2 backbone key of a key in a d2 backbone or full detector, else None."""
    key = key[_WRAPPER_PREFIX.match(key).end() :]
    for location in ("", "backbone.", "backbone.bottom_up."):
        if key.startswith(location) and _is_d2_backbone_key(key[len(location) :]):
            return key[len(location) :]
    # R50-C4 detectors run res5 inside the ROI head.
    if key.startswith("roi_heads.res5.") and _is_d2_backbone_key(key[len("roi_heads.") :]):
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
        name = _d2_backbone_name(key)
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
    :func:`check_complete` on ``result.model``.

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
