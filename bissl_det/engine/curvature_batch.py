"""What the stage's curvature is built from: its batch (BISSL.HYPERGRAD.IMS_PER_BATCH) and the
precision of its retained graph (BISSL.HYPERGRAD.GRAPH_DTYPE).

The curvature graph is the stage's largest memory (docs/full_scale.md): a smaller curvature
batch shrinks it in proportion, a bfloat16 graph roughly halves it. The curvature batch is the
first images of the lower-step batch drawn for the stage (no extra data is read); 0 keeps the
whole batch, the paper's choice. The bf16 graph is the curvature batch's forward under autocast:
its saved activations are bfloat16, the parameters, products and solvers stay float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from ..config.defaults import GRAPH_DTYPES

__all__ = ["check_curvature_batch", "curvature_images", "graph_precision"]


def check_curvature_batch(cfg, world_size: int = 1) -> int:
    """The curvature batch per process (0: the lower batch's); refuses a value that is not one.

    Raises:
        ValueError: Naming BISSL.HYPERGRAD.IMS_PER_BATCH and what it must be.
    """
    total, lower = cfg.BISSL.HYPERGRAD.IMS_PER_BATCH, cfg.BISSL.LOWER.IMS_PER_BATCH
    if total == 0:
        return lower // world_size
    if total < 0 or total > lower or total % world_size:
        raise ValueError(
            f"BISSL.HYPERGRAD.IMS_PER_BATCH = {total}: must be 0 (the lower batch) or a multiple "
            f"of the {world_size} processes up to BISSL.LOWER.IMS_PER_BATCH = {lower} (the "
            "curvature batch is taken from the lower-step batch drawn for the stage)"
        )
    return total // world_size


def curvature_images(batch: Sequence[torch.Tensor], per_process: int) -> tuple[torch.Tensor, ...]:
    """The first ``per_process`` images of each view of a pretext batch (all if 0 or more)."""
    if per_process <= 0 or per_process >= batch[0].shape[0]:
        return tuple(batch)
    return tuple(view[:per_process] for view in batch)


def graph_precision(dtype: str, device: torch.device):
    """The context the curvature batch's forward runs in: float32, or bf16 autocast."""
    if dtype not in GRAPH_DTYPES:
        raise ValueError(
            f"BISSL.HYPERGRAD.GRAPH_DTYPE = {dtype!r}: valid values are {list(GRAPH_DTYPES)}"
        )
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
