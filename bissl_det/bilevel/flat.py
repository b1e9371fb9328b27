"""Krylov vectors as one flat buffer: a linear system on tuples seen as one on 1-D tensors.

A solver's vectors (``x``, residuals, directions, Lanczos vectors) are sums and inner products of
whole parameter tuples. Held per tensor, each inner product is one dot per tensor (159 for a
ResNet-50) and each Lanczos re-orthogonalisation ``k`` times that; held as one contiguous 1-D
buffer, each is one kernel, and a Lanczos basis is one ``(k, n)`` matrix whose projections are
matrix products. The operator still sees tuples: it gets views of the buffer shaped like the
parameters, and its output is concatenated once per product (one copy of ``n`` numbers, small
next to the product itself).

A solver wraps its problem with :func:`flat_problem` and works on 1-tuples ``(buffer,)``: the
tuple code of :mod:`.krylov` runs unchanged on them. Tensors of different dtypes or devices
cannot share a buffer; such a tuple is solved as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .krylov import MatVec, TensorTuple, apply_matvec

__all__ = ["FlatLayout", "flat_problem", "is_flat"]


def is_flat(ts: TensorTuple) -> bool:
    """Whether ``ts`` is already one flat buffer (a 1-tuple of a 1-D tensor)."""
    return len(ts) == 1 and ts[0].dim() == 1


@dataclass(frozen=True)
class FlatLayout:
    """Shapes of a tuple of tensors of one dtype on one device, packed into one 1-D buffer."""

    shapes: tuple[torch.Size, ...]
    numels: tuple[int, ...]

    @classmethod
    def of(cls, ts: TensorTuple) -> FlatLayout | None:
        """The layout of ``ts``; None if its tensors differ in dtype or device."""
        if not ts or any(t.dtype != ts[0].dtype or t.device != ts[0].device for t in ts):
            return None
        return cls(tuple(t.shape for t in ts), tuple(t.numel() for t in ts))

    def flatten(self, ts: TensorTuple) -> torch.Tensor:
        """One new contiguous buffer holding ``ts`` (always a copy: callers update it in place)."""
        return torch.cat([t.detach().reshape(-1) for t in ts])

    def views(self, flat: torch.Tensor) -> TensorTuple:
        """Views of ``flat`` shaped like the tuple (no copy)."""
        return tuple(p.view(s) for p, s in zip(flat.split(self.numels), self.shapes, strict=True))


def flat_problem(
    matvec: MatVec, b: TensorTuple, solver: str, flat: bool = True
) -> tuple[MatVec, TensorTuple, Callable[[TensorTuple], TensorTuple]]:
    """``A x = b`` on one flat buffer: ``(flat matvec, (b_flat,), x_flat -> x)``.

    Args:
        matvec: ``v -> A v`` on tuples shaped like ``b``.
        b: Right-hand side (detached).
        solver: Name for error messages (a matvec output that does not match ``b``).
        flat: False keeps the tuple (the per-tensor path, for comparison).

    Returns:
        The problem unchanged (identity unpacking) when ``flat`` is False, ``b`` is already flat
        or its tensors cannot share one buffer.
    """
    layout = FlatLayout.of(b) if flat and not is_flat(b) else None
    if layout is None:
        return matvec, b, lambda x: x

    def flat_matvec(v: TensorTuple) -> TensorTuple:
        return (layout.flatten(tuple(apply_matvec(matvec, layout.views(v[0]), b, solver))),)

    return flat_matvec, (layout.flatten(b),), lambda x: layout.views(x[0])
