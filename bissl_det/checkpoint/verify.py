"""Proof that a backbone checkpoint really initialised a detector: every value, in one place."""

from __future__ import annotations

import torch
from torch import nn

from .backbone import read_backbone_weights
from .keys import check_complete, resnet_detectron2_keys
from .pairing import pair_by_suffix


def verify_backbone_loaded(model: nn.Module, weights: str, depth: int = 50) -> int:
    """Check every ResNet tensor of ``weights`` sits, loaded, in exactly one place of ``model``.

    Raises ValueError/KeyError naming the keys when the checkpoint lacks backbone keys, a key
    has no (or several) homes in the model, or a loaded value differs. Returns the count.
    """
    backbone = read_backbone_weights(weights)
    check_complete(backbone, resnet_detectron2_keys(depth))
    backbone = {k: v for k, v in backbone.items() if not k.endswith("num_batches_tracked")}
    pairs = pair_by_suffix(backbone, model.state_dict(keep_vars=False), "tensor")
    wrong = [
        f"{name} -> {target}"
        for name, target, source, loaded in zip(
            pairs.names, pairs.upper_names, pairs.lower, pairs.upper, strict=True
        )
        if not torch.equal(source.to(loaded.device, loaded.dtype), loaded)
    ]
    if wrong:
        raise ValueError(f"{weights}: backbone tensors not loaded into the model: {wrong[:20]}")
    return len(pairs.names)
