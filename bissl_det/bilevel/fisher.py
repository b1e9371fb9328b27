"""The empirical Fisher of the last ``m`` lower-step pretext gradients, with a Woodbury solve.

``F = (1/m) sum_i g_i g_i^T`` (``G = [g_1 ... g_m]``, one column per gradient) is PSD with rank
at most ``m``, so the damped system is solved exactly with an ``m x m`` system (Woodbury):

    (I + s F)^-1 b = b - G (m/s I + G^T G)^-1 G^T b.

This replaces the iterative solve and costs no Hessian products (as in BiSSLight, the BiSSL
authors' follow-up). The Gram matrix ``G^T G`` is kept up to date incrementally: each append costs
one row of dot products with the stored history.

Where the history lives: one preallocated ``(m, n)`` matrix (``n`` = number of backbone
parameters) on ``device``: ``m * n * 4`` bytes in float32, about 1.9 GB for a ResNet-50 at
``m = 20``. On the CPU (the default, as in BiSSLight) it costs no accelerator memory; with the
gradients on CUDA it is pinned (page-locked), so the copies run at full bus speed. ``device=None``
keeps it on the gradients' device (fast, accelerator memory).

Sharded across processes (the default with more than one): the gradients appended are already
averaged over processes, identical on every rank, so rank ``r`` keeps only its slice of the
coordinates, ``ceil(n / world)`` columns: ``1/world`` of the memory and of the copies. The Gram
matrix is the all-reduced sum of the slices' dot products (``m`` numbers per append); a product
or a solve all-reduces its ``m`` coefficients and all-gathers the slices of the result (``n``
numbers). A checkpoint gathers the whole history onto rank 0 (:meth:`gathered_for_checkpoint`),
so a saved history is the same with any number of processes and a resume is exact.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..utils.distributed import rank, world_size
from .curvature import Curvature
from .krylov import TensorTuple

__all__ = ["EmpiricalFisherCurvature"]


def _collective_device() -> torch.device:
    """Where collectives run: NCCL needs CUDA tensors, gloo takes CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class EmpiricalFisherCurvature(Curvature):
    """``F = (1/m) sum g_i g_i^T`` over a ring buffer of the last ``history_size`` gradients.

    Lives across stages (``release()`` keeps the history). With ``history_size <= N_L`` (lower
    steps per stage) every stage's lower steps refill the ring before the stage solves, so a run
    resumed at a stage boundary needs no saved history; otherwise save :meth:`state_dict`.

    Args:
        history_size: ``m``, the number of gradients kept (>= 1).
        device: Where the history lives (default the CPU); None: the gradients' own device.
        sharded: With several processes, each keeps ``1/world`` of the coordinates (see the
            module docstring); every rank must then call ``append``, ``matvec``,
            ``solve_damped`` and ``history`` together. False: every rank holds it all.
    """

    def __init__(
        self,
        history_size: int = 20,
        device: str | torch.device | None = "cpu",
        sharded: bool = True,
    ) -> None:
        super().__init__(all_reduce=None)
        if not (isinstance(history_size, int) and history_size >= 1):
            raise ValueError(
                f"EmpiricalFisherCurvature: history_size must be >= 1, got {history_size}"
            )
        self.history_size = history_size
        self.device = None if device is None else torch.device(device)
        self.sharded = sharded
        self.appended = 0  # gradients appended so far (the ring holds the last history_size)
        self._slots: torch.Tensor | None = None  # (m, width), row k = slot k's columns here
        self._gram: torch.Tensor | None = None  # (m, m) float64, entries <g_i, g_j>
        self._shapes: tuple[torch.Size, ...] = ()
        self._numel = 0  # n
        self._world, self._start, self._stop = 1, 0, 0  # this rank's columns [start, stop)
        self._gathered: torch.Tensor | None = None  # the whole history, while saving

    # ---- Layout and placement -----------------------------------------------------------------

    def _lay_out(self, shapes: tuple[torch.Size, ...]) -> int:
        """Set the shapes and this rank's columns; returns the slots' width."""
        self._shapes = tuple(shapes)
        self._numel = sum(math.prod(s) for s in shapes)
        self._world = world_size() if self.sharded else 1
        width = -(-self._numel // self._world)  # ceil: equal slices (the last one padded)
        self._start = min(rank() * width if self._world > 1 else 0, self._numel)
        self._stop = min(self._start + width, self._numel)
        return width

    def _place(self, like: torch.Tensor) -> None:
        """Follow the gradients' device (``device=None``: a resume loads onto the CPU), or pin a
        CPU history for gradients on CUDA: moved once, not at every product."""
        if self.device is None and self._slots.device != like.device:
            self._slots, self._gram = self._slots.to(like.device), self._gram.to(like.device)
        elif self._slots.device.type == "cpu" and like.is_cuda and not self._slots.is_pinned():
            self._slots, self._gram = self._slots.pin_memory(), self._gram.pin_memory()

    def _columns(
        self, ts: Sequence[torch.Tensor], who: str, check_finite: bool = False
    ) -> torch.Tensor:
        """This rank's columns of ``ts`` flattened, on the history's device and dtype."""
        shapes = tuple(t.shape for t in ts)
        if shapes != self._shapes:
            raise ValueError(
                f"EmpiricalFisherCurvature.{who}: got tensors of shapes "
                f"{[tuple(s) for s in shapes]}, the history holds "
                f"{[tuple(s) for s in self._shapes]}"
            )
        self._place(ts[0])
        flat = torch.cat([t.detach().reshape(-1) for t in ts])
        # Every rank sees the whole (identical) gradient: all of them refuse it alike.
        if check_finite and not torch.isfinite(flat).all():
            raise FloatingPointError(f"EmpiricalFisherCurvature.{who}: non-finite gradient")
        return flat[self._start : self._stop].to(self._slots.device, self._slots.dtype)

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over the ranks sharing the history (identity unsharded)."""
        if self._world == 1:
            return t
        on = _collective_device()
        summed = t.to(on)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed.to(t.device)

    def _gather(self, columns: torch.Tensor, like: Sequence[torch.Tensor]) -> TensorTuple:
        """Every rank's columns of one vector assembled into tensors shaped like ``like``."""
        if self._world > 1:
            width = self._slots.shape[1]
            part = torch.zeros(width, dtype=columns.dtype, device=like[0].device)
            part[: columns.numel()] = columns
            on = _collective_device()
            whole = torch.empty(self._world * width, dtype=columns.dtype, device=on)
            dist.all_gather(list(whole.chunk(self._world)), part.to(on))
            columns = whole[: self._numel]
        parts = columns.split([math.prod(s) for s in self._shapes])
        return tuple(
            p.view(t.shape).to(t.device, t.dtype) for p, t in zip(parts, like, strict=True)
        )

    # ---- History ----------------------------------------------------------------------------

    def __len__(self) -> int:
        """Gradients currently held: ``min(appended, history_size)``."""
        return min(self.appended, self.history_size)

    def append(self, grads: Sequence[torch.Tensor]) -> None:
        """Add one gradient (copied), dropping the oldest once ``history_size`` are held.

        Args:
            grads: The lower step's pretext gradient w.r.t. the backbone, one tensor per
                parameter, already averaged over processes (identical on every rank).
        """
        grads = tuple(grads)
        if not grads:
            raise ValueError("EmpiricalFisherCurvature.append: empty gradient tuple")
        if self._slots is None:
            width = self._lay_out(tuple(g.shape for g in grads))
            device = grads[0].device if self.device is None else self.device
            pin = device.type == "cpu" and grads[0].is_cuda
            m = self.history_size
            self._slots = torch.zeros(m, width, dtype=grads[0].dtype, device=device, pin_memory=pin)
            self._gram = torch.zeros(m, m, dtype=torch.float64, device=device, pin_memory=pin)
        columns = self._columns(grads, "append", check_finite=True)
        slot = self.appended % self.history_size
        self._slots[slot, : columns.numel()].copy_(columns)
        self.appended += 1
        held = len(self)
        # One new row (and column) of the Gram matrix; the other entries are unchanged.
        dots = self._sum((self._slots[:held] @ self._slots[slot]).to(torch.float64))
        self._gram[slot, :held] = dots
        self._gram[:held, slot] = dots

    def history(self) -> list[TensorTuple]:
        """The held gradients, oldest first (copies; collective when sharded)."""
        m, held = self.history_size, len(self)
        oldest = self.appended % m if self.appended > m else 0
        like = tuple(
            torch.empty(s, dtype=self._slots.dtype, device=self._slots.device) for s in self._shapes
        )
        own = self._stop - self._start
        return [
            tuple(t.clone() for t in self._gather(self._slots[(oldest + k) % m, :own], like))
            for k in range(held)
        ]

    def clear(self) -> None:
        """Forget the history (the buffer stays allocated)."""
        self.appended = 0
        if self._gram is not None:
            self._gram.zero_()

    def _held(self, who: str) -> tuple[torch.Tensor, torch.Tensor]:
        held = len(self)
        if held == 0:
            raise RuntimeError(
                f"EmpiricalFisherCurvature.{who}: the history is empty; append lower-step "
                "gradients first"
            )
        return self._slots[:held, : self._stop - self._start], self._gram[:held, :held]

    # ---- The matrix --------------------------------------------------------------------------

    def _local_matvec(self, v: TensorTuple) -> TensorTuple:
        rows, _ = self._held("matvec")
        x = self._columns(v, "matvec")
        coefficients = self._sum((rows @ x).to(torch.float64)) / rows.shape[0]
        return self._gather(coefficients.to(rows.dtype) @ rows, v)

    @property
    def has_exact_solve(self) -> bool:
        return True

    def solve_damped(self, b: TensorTuple, scale: float) -> TensorTuple:
        """``(I + scale F)^-1 b`` exactly, by Woodbury (an ``m x m`` symmetric solve).

        Args:
            b: Right-hand side, shaped like the appended gradients (any device/dtype).
            scale: ``s > 0``; the implicit gradient uses ``1 / (lam + delta)``.
        """
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(
                f"EmpiricalFisherCurvature.solve_damped: scale must be > 0, got {scale}"
            )
        rows, gram = self._held("solve_damped")
        x = self._columns(b, "solve_damped")
        # (m/s I + G^T G)^-1 by eigendecomposition: nearly parallel gradients make the Gram
        # matrix rank-deficient, and its rounding (float32 dots) can then leave eigenvalues
        # slightly below 0, which Cholesky would refuse; they are 0 in exact arithmetic.
        # Every rank holds the same Gram matrix (all-reduced), so all solve alike.
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        inverse = 1.0 / (rows.shape[0] / scale + eigenvalues.clamp_min(0.0))
        rhs = self._sum((rows @ x).to(torch.float64))
        coefficients = eigenvectors @ (inverse * (eigenvectors.T @ rhs))
        return self._gather(x - coefficients.to(rows.dtype) @ rows, b)

    # ---- Checkpointing ----------------------------------------------------------------------

    @contextlib.contextmanager
    def gathered_for_checkpoint(self) -> Iterator[None]:
        """Collective: rank 0 holds the whole history while the block runs (a checkpoint's
        save), so :meth:`state_dict` there is the same as with one process."""
        if self._world == 1 or self._slots is None:
            yield
            return
        width, on = self._slots.shape[1], _collective_device()
        whole = torch.empty(self.history_size, self._numel, dtype=self._slots.dtype)
        for k in range(self.history_size):  # one row at a time: no whole copy on the device
            parts = None
            if rank() == 0:
                parts = [
                    torch.empty(width, dtype=whole.dtype, device=on) for _ in range(self._world)
                ]
            dist.gather(self._slots[k].to(on), parts, dst=0)
            if parts is not None:
                whole[k] = torch.cat(parts)[: self._numel].cpu()
        self._gathered = whole if rank() == 0 else None
        try:
            yield
        finally:
            self._gathered = None

    def state_dict(self) -> dict[str, Any]:
        """The history, for a checkpoint (large: ``m`` gradients; see the class docstring).

        Sharded, outside :meth:`gathered_for_checkpoint` (or on a rank other than 0 inside it),
        only this rank's columns, marked ``columns``; such a state loads only where it came from.
        """
        slots, columns = self._slots, None
        if self._gathered is not None:
            slots = self._gathered
        elif self._world > 1 and slots is not None:
            slots, columns = slots[:, : self._stop - self._start], (self._start, self._stop)
        return {
            "history_size": self.history_size,
            "appended": self.appended,
            "slots": slots,
            "gram": self._gram,
            "shapes": [tuple(s) for s in self._shapes],
            "columns": columns,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (onto this object's ``device``; with None, onto the
        gradients' device at the next append, product or solve), keeping this rank's columns."""
        if state["history_size"] != self.history_size:
            raise ValueError(
                f"EmpiricalFisherCurvature: checkpoint history_size {state['history_size']} != "
                f"configured {self.history_size}"
            )
        slots, gram = state["slots"], state["gram"]
        if slots is None:
            self.appended, self._slots, self._gram = int(state["appended"]), None, None
            return
        width = self._lay_out(tuple(torch.Size(s) for s in state["shapes"]))
        columns = state.get("columns")
        if columns is not None and tuple(columns) != (self._start, self._stop):
            raise ValueError(
                f"EmpiricalFisherCurvature: the checkpoint holds columns {tuple(columns)} of the "
                f"history (one process's shard), this process needs "
                f"({self._start}, {self._stop}); save with gathered_for_checkpoint"
            )
        own = slots if columns is not None else slots[:, self._start : self._stop]
        device = slots.device if self.device is None else self.device
        self._slots = torch.zeros(self.history_size, width, dtype=slots.dtype, device=device)
        self._slots[:, : own.shape[1]] = own.to(device)
        self._gram = gram.to(device)
        self.appended = int(state["appended"])
