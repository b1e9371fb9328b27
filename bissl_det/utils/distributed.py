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

import os
from collections.abc import Iterable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "ReplicaMismatchError",
    "agreed_flags",
    "all_reduce_grads_",
    "all_reduce_mean",
    "all_reduce_mean_",
    "broadcast_buffers_",
    "broadcast_module_",
    "broadcast_tensors_",
    "check_replicas_identical",
    "collective_timeout",
    "flagged_ranks",
    "gather_with_grad",
    "is_distributed",
    "rank",
    "world_size",
]

# Flattened buffers are cut at this many bytes: one collective per bucket instead of one per tensor,
# without allocating a second full copy of a large model at once.
_BUCKET_BYTES = 64 * 1024 * 1024


def cores_each(processes: int) -> int | None:
    """CPU threads for each of ``processes`` processes side by side on this machine: its cores
    shared out (torch gives every process all of them, and OpenMP threads beyond the cores spin).
    None when ``OMP_NUM_THREADS`` is set: the user decided."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, len(os.sched_getaffinity(0)) // max(1, processes))


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
    """Differentiable all-reduce (sum), in reverse and forward mode.

    As a linear map on the stacked per-process tensors it is symmetric (every output is the sum
    of every input), so its backward is itself; writing the backward with ``apply`` keeps it
    differentiable for any order. Being linear, its forward-mode derivative is itself too.
    """

    @staticmethod
    def forward(x: Tensor) -> Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return _AllReduceSum.apply(grad.contiguous())

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        return _AllReduceSum.forward(tangent)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward = all-reduce-sum of the gradient, then the local slice;
    forward mode = the all-gather of the tangents (for the "forward" Gauss-Newton products)."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:  # type: ignore[override]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        (x,) = inputs
        ctx.start = dist.get_rank() * x.shape[0]
        ctx.length = x.shape[0]

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        # Built from differentiable ops only, so double backward works (HVPs of the global loss).
        summed = _AllReduceSum.apply(grad.contiguous())
        return summed.narrow(0, ctx.start, ctx.length)

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        return _GatherWithGrad.forward(tangent)


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


def all_reduce_grads_(params: Iterable[torch.nn.Parameter], *extra: Tensor) -> None:
    """Average ``.grad`` over processes for every parameter that has one (in place).

    Every process must have gradients for the same parameters (true when all run the same graph).
    ``extra`` float tensors (e.g. :func:`agreed_flags`' flags) are averaged in the same
    collectives.
    """
    all_reduce_mean_([*(p.grad for p in params if p.grad is not None), *extra])


# ---- Identical replicas ------------------------------------------------------------------------


def _unique_tensors(module: nn.Module, parameters: bool = True) -> list[Tensor]:
    """The module's parameters (optional) and buffers, each once (tied tensors are shared)."""
    seen: set[int] = set()
    tensors = []
    for t in (*(module.parameters() if parameters else ()), *module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            tensors.append(t)
    return tensors


@torch.no_grad()
def broadcast_tensors_(tensors: Sequence[Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` with process ``src``'s values (bucketed: one collective per bucket).

    Any dtype; every process must pass tensors of the same shapes, dtypes and order.
    """
    if world_size() == 1 or len(tensors) == 0:
        return
    for bucket in _buckets(tensors):
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in bucket])
        dist.broadcast(flat, src)
        offset = 0
        for i in bucket:
            t = tensors[i]
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_module_(module: nn.Module, src: int = 0) -> None:
    """Copy ``src``'s parameters and buffers to every process, as DDP does when it wraps a model.

    Call after the model is built and loaded (or resumed): random initialisation draws from
    per-rank seeds, and a partial load leaves the rest random. No-op in one process.
    """
    broadcast_tensors_(_unique_tensors(module), src)


def broadcast_buffers_(module: nn.Module, src: int = 0) -> None:
    """Copy ``src``'s buffers to every process (BN running statistics, which each process
    updates from its own batches), as DDP does before each forward (``broadcast_buffers``)."""
    broadcast_tensors_(_unique_tensors(module, parameters=False), src)


class ReplicaMismatchError(RuntimeError):
    """The processes' copies of a model differ: a multi-process run would train different models."""


def _checksums(tensors: Sequence[Tensor]) -> Tensor:
    """Per tensor: its sum in float64, one pass without a copy (equal tensors give equal sums on
    every process of one job: same device type, shapes and reduction order; drifted copies
    practically never sum to the same float64). NaN/Inf become fixed sentinels, so replicas that
    are equally broken compare equal."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    device = tensors[0].device
    sums = torch.stack([t.sum(dtype=torch.float64).to(device) for t in tensors])
    return torch.nan_to_num(sums, nan=1.5e308, posinf=1.6e308, neginf=-1.6e308)


@torch.no_grad()
def check_replicas_identical(module: nn.Module, where: str = "") -> None:
    """Stop every process if any floating-point parameter or buffer differs across processes.

    One all-reduce (MAX of the per-tensor checksums and of their negatives: max == -max(-x) ==
    min) of two float64 numbers per tensor. Collective: every process must call it at the same
    point; all of them raise together. No-op in one process.

    Raises:
        ReplicaMismatchError: names the first differing tensor and how many differ.
    """
    if world_size() == 1:
        return
    names, tensors = [], []
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        if t.is_floating_point():
            names.append(name)
            tensors.append(t.detach())
    local = _checksums(tensors)
    device = tensors[0].device if tensors else torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    both = torch.cat((local, -local)).to(device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    high, low = both[: len(local)], -both[len(local) :]
    differ = (high != low).nonzero().flatten().tolist()
    if differ:
        raise ReplicaMismatchError(
            f"{where}the model's copies differ across the {world_size()} processes in "
            f"{len(differ)} of {len(names)} floating-point tensors, first {names[differ[0]]!r}: "
            "the processes no longer train the same model (a tensor updated on one process only, "
            "or a parameter never broadcast from rank 0)"
        )


# ---- Faults seen by one process ----------------------------------------------------------------


def agreed_flags(fault: bool, device: torch.device | str = "cpu") -> Tensor:
    """A float row with one entry per process: 1 at this process's rank if ``fault``.

    Averaged over processes with other tensors (:func:`all_reduce_mean_`, or ``extra`` of
    :func:`all_reduce_grads_`), it tells every process which processes saw a fault, without a
    collective of its own; :func:`flagged_ranks` reads it.
    """
    flags = torch.zeros(world_size(), device=device)
    flags[rank()] = float(fault)
    return flags


def flagged_ranks(flags: Tensor) -> list[int]:
    """The ranks whose entry of averaged :func:`agreed_flags` is set."""
    return (flags > 0).nonzero().flatten().tolist()


# Environment variable: seconds a collective waits for a peer before it fails.
TIMEOUT_ENV = "BISSL_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600


def collective_timeout() -> timedelta:
    """How long a collective waits for the other processes: $BISSL_DIST_TIMEOUT seconds
    (default 10 minutes). A process that died or hangs stops its peers after this long; it must
    exceed the longest rank-0-only work the others wait for at a barrier (a checkpoint write,
    a COCO evaluation)."""
    value = os.environ.get(TIMEOUT_ENV, "")
    if not value:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"${TIMEOUT_ENV} = {value!r}: give the timeout in seconds (> 0)")
    return timedelta(seconds=seconds)
