"""Process-group helpers that stay differentiable (twice) and are no-ops in a single process.

The pretext losses gather embeddings from every process, and BiSSL differentiates those losses
twice (Hessian-vector products). DDP cannot do double backward, so gradients and Hessian-vector
products are averaged by hand with :func:`all_reduce_mean_`.

Scaling convention (why a plain mean over processes is right). Let process ``r`` compute
``loss_r`` = mean over its local anchors, with candidates gathered by :func:`gather_with_grad`,
and let the global loss be ``L = mean_r loss_r`` (equal anchor counts per process). The backward
of the gather all-reduces (sums) the incoming gradient, so the gradient each process computes is
``W * dL/dtheta`` restricted to the paths through its own data (``W`` = world size); the sum of
those contributions over processes is ``W * dL/dtheta``, so an all-reduce *mean* gives
``dL/dtheta`` exactly. The same argument applies one level up: every process differentiates
``<grad loss_r, v>`` (its own, un-averaged gradient) once more; the all-reduces in the graph make
each process receive its share of ``d/dtheta sum_r <grad loss_r, v> = W * H v``, and the all-reduce
mean of the results is the Hessian-vector product ``H v`` of the global loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_reduce_grads_",
    "all_reduce_mean",
    "all_reduce_mean_",
    "gather_with_grad",
    "is_distributed",
    "rank",
    "world_size",
]

# Flattened buffers are cut at this many bytes: one collective per bucket instead of one per tensor,
# without allocating a second full copy of a large model at once.
_BUCKET_BYTES = 64 * 1024 * 1024


def is_distributed() -> bool:
    """Whether a default process group is initialised (False if torch.distributed is absent)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Rank of this process in the default group; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum).

    As a linear map on the stacked per-process tensors it is symmetric (every output is the sum
    of every input), so its backward is itself; writing the backward with ``apply`` keeps it
    differentiable for any order.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return _AllReduceSum.apply(grad.contiguous())


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward = all-reduce-sum of the gradient, then the local slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.start = dist.get_rank() * x.shape[0]
        ctx.length = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        # Built from differentiable ops only, so double backward works (HVPs of the global loss).
        summed = _AllReduceSum.apply(grad.contiguous())
        return summed.narrow(0, ctx.start, ctx.length)


def gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` from every process along dim 0, keeping autograd (twice differentiable).

    Every process must pass a tensor of the same shape (all-gather needs equal sizes). The result
    holds process ``r``'s rows at ``[r * n, (r + 1) * n)``. Identity without a process group.

    Args:
        t: Local tensor, shape ``(n, ...)``.

    Returns:
        Tensor of shape ``(world_size * n, ...)``.
    """
    if world_size() == 1:
        return t
    return _GatherWithGrad.apply(t)


def _buckets(tensors: Sequence[Tensor]) -> list[list[int]]:
    """Group tensor indices by (device, dtype), cut into buckets of at most ``_BUCKET_BYTES``."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    buckets: list[list[int]] = []
    for indices in groups.values():
        current: list[int] = []
        size = 0
        for i in indices:
            nbytes = tensors[i].numel() * tensors[i].element_size()
            if current and size + nbytes > _BUCKET_BYTES:
                buckets.append(current)
                current, size = [], 0
            current.append(i)
            size += nbytes
        if current:
            buckets.append(current)
    return buckets


def all_reduce_mean_(tensors: Sequence[Tensor]) -> None:
    """Average tensors over processes in place (flattened into buckets, one collective each).

    Every process must pass tensors of the same shapes, dtypes and order. No-op in one process.

    Args:
        tensors: Tensors to overwrite with their mean over processes.
    """
    for i, t in enumerate(tensors):
        if not (t.is_floating_point() or t.is_complex()):
            raise TypeError(
                f"all_reduce_mean_: tensor {i} has dtype {t.dtype}; a mean needs floats"
            )
    n = world_size()
    if n == 1 or len(tensors) == 0:
        return
    for bucket in _buckets(tensors):
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(n)
        offset = 0
        for i in bucket:
            t = tensors[i]
            numel = t.numel()
            with torch.no_grad():
                t.copy_(flat[offset : offset + numel].view_as(t))
            offset += numel


def all_reduce_mean(tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Out-of-place :func:`all_reduce_mean_`: returns detached averaged copies, inputs untouched."""
    out = tuple(t.detach().clone() for t in tensors)
    all_reduce_mean_(out)
    return out


def all_reduce_grads_(params: Iterable[torch.nn.Parameter]) -> None:
    """Average ``.grad`` over processes for every parameter that has one (in place).

    Every process must have gradients for the same parameters (true when all run the same graph).
    """
    all_reduce_mean_([p.grad for p in params if p.grad is not None])
