"""Flat-vector views of tensor tuples, shared by the bilevel tests (dense references)."""

from __future__ import annotations

import torch
from torch import Tensor

DT = torch.float64


def flatten(ts: tuple[Tensor, ...]) -> Tensor:
    """Concatenate the tensors of a tuple into one vector."""
    return torch.cat([t.reshape(-1) for t in ts])


def unflatten(vec: Tensor, like: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Cut ``vec`` into tensors shaped as those of ``like`` (the inverse of :func:`flatten`)."""
    out, start = [], 0
    for t in like:
        out.append(vec[start : start + t.numel()].reshape(t.shape))
        start += t.numel()
    return tuple(out)


def random_like(params: tuple[Tensor, ...], gen: torch.Generator) -> tuple[Tensor, ...]:
    """Standard-normal tensors shaped and typed as ``params``."""
    return tuple(torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params)
