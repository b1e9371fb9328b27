"""Optimisers and learning-rate schedules of the two levels (per optimiser step, not per stage)."""

from __future__ import annotations

import torch
from detectron2.solver.lr_scheduler import LRMultiplier
from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    CosineParamScheduler,
    LinearParamScheduler,
    ParamScheduler,
)
from torch import nn

from .lars import LARS, lars_param_groups


def warmup_cosine(total_steps: int, warmup_steps: int, final_factor: float) -> ParamScheduler:
    """Multiplier: linear 0 -> 1 over ``warmup_steps``, then cosine 1 -> ``final_factor``."""
    if total_steps <= 0:
        raise ValueError(f"schedule length must be > 0 steps, got {total_steps}")
    warmup_steps = min(warmup_steps, total_steps)
    cosine = CosineParamScheduler(1.0, final_factor)
    if warmup_steps == 0:
        return cosine
    # Step 0 of the warm-up already gets a small positive lr, as in SimCLR/BYOL.
    warmup = LinearParamScheduler(1.0 / (warmup_steps + 1), 1.0)
    if warmup_steps == total_steps:
        return warmup
    fraction = warmup_steps / total_steps
    return CompositeParamScheduler(
        [warmup, cosine], lengths=[fraction, 1 - fraction], interval_scaling=["rescaled"] * 2
    )


def build_lars(
    module: nn.Module, base_lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """LARS over ``module``'s trainable parameters; biases and norms skip decay and adaptation."""
    return LARS(lars_param_groups(module, weight_decay), lr=base_lr, momentum=momentum)


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, final_factor: float
) -> LRMultiplier:
    return LRMultiplier(
        optimizer, warmup_cosine(total_steps, warmup_steps, final_factor), max_iter=total_steps
    )
