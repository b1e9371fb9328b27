"""naiveSyncBN with float32 batch statistics under any reduced-precision autocast.

Detectron2's ``NaiveSyncBatchNorm`` upcasts float16 inputs before computing ``E[x]`` and
``E[x^2]`` but not bfloat16 ones: under bf16 autocast (BISSL.AMP) it computes the variance as
``E[x^2] - E[x]^2`` in bfloat16 (8 significant bits), which cancels to garbage for activations
whose mean is large against their spread. Models built by this package swap every
``NaiveSyncBatchNorm`` for :class:`Float32StatsSyncBatchNorm` (same parameters and buffers, so
checkpoints are unchanged).
"""

from __future__ import annotations

import torch
from detectron2.layers import NaiveSyncBatchNorm
from torch import nn

__all__ = ["Float32StatsSyncBatchNorm", "use_float32_sync_bn_statistics"]

_REDUCED = (torch.float16, torch.bfloat16)


class Float32StatsSyncBatchNorm(NaiveSyncBatchNorm):
    """``NaiveSyncBatchNorm`` whose statistics and normalisation run in float32 for float16 and
    bfloat16 inputs; the output has the input's dtype."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dtype not in _REDUCED:
            return super().forward(input)
        # Autocast off inside: the statistics' products must not be cast back down.
        with torch.autocast(input.device.type, enabled=False):
            return super().forward(input.float()).to(input.dtype)


def use_float32_sync_bn_statistics(model: nn.Module) -> int:
    """Make every ``NaiveSyncBatchNorm`` of ``model`` a :class:`Float32StatsSyncBatchNorm` in
    place (a class swap: no new parameters or buffers); return how many were swapped."""
    swapped = 0
    for module in model.modules():
        if type(module) is NaiveSyncBatchNorm:
            module.__class__ = Float32StatsSyncBatchNorm
            swapped += 1
    return swapped
