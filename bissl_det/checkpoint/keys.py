"""ResNet key names: torchvision <-> Detectron2, one key at a time and whole state dicts.

Two layouts exist for the same ResNet weights:

* torchvision (also timm and most SSL codebases): ``conv1``, ``bn1``, ``layer1..4.<b>.conv<j>``,
  ``layer<i>.<b>.bn<j>``, ``layer<i>.<b>.downsample.{0,1}`` and a ``fc`` classifier;
* Detectron2: ``stem.conv1``, ``stem.conv1.norm``, ``res2..5.<b>.conv<j>``,
  ``res<i>.<b>.conv<j>.norm``, ``res<i>.<b>.shortcut`` and ``res<i>.<b>.shortcut.norm``.

Pure functions over names and state dicts; :mod:`.convert` finds the backbone inside a checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

__all__ = [
    "check_complete",
    "detectron2_to_torchvision",
    "is_head_key",
    "resnet50_detectron2_keys",
    "resnet_detectron2_keys",
    "torchvision_to_detectron2",
]

_BN_LEAVES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
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


def is_bare_detectron2_key(key: str) -> bool:
    """Whether ``key`` is a Detectron2 ResNet key without prefix (``res2.0.conv1.weight``)."""
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
    return _rename(sd, _tv_key_to_d2)


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
    return _rename(sd, _d2_key_to_tv)


def _rename(
    sd: Mapping[str, torch.Tensor], new_name: Callable[[str], str | None]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``{new_name(k): v}`` for the keys ``new_name`` maps, and the keys it does not (None)."""
    converted: dict[str, torch.Tensor] = {}
    unconverted: list[str] = []
    for key, value in sd.items():
        new_key = new_name(key)
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
