"""The empirical Fisher of the last ``m`` lower-step pretext gradients, with a Woodbury solve.

``F = (1/m) sum_i g_i g_i^T`` (``G = [g_1 ... g_m]``, one column per gradient) is PSD with rank
at most ``m``, so the damped system is solved exactly with an ``m x m`` system (Woodbury):

    (I + s F)^-1 b = b - G (m/s I + G^T G)^-1 G^T b.

This replaces the iterative solve and costs no Hessian products (as in BiSSLight, the BiSSL
authors' follow-up). The Gram matrix ``G^T G`` is kept up to date incrementally: each append costs
one row of dot products with the stored history.

Where the history lives: one preallocated ``(m, n)`` matrix (``n`` = number of backbone
parameters) on ``device``: ``m * n * 4`` bytes in float32, about 2 GB for a ResNet-50 at
``m = 20``. On the CPU (the default, as in BiSSLight) it costs no accelerator memory but every
append copies one gradient to the host and every product or solve reads the whole history in host
memory; ``device=None`` keeps it on the gradients' device (fast, 2 GB of accelerator memory).
The gradients appended are already averaged over processes, so every rank holds the same history
and no product needs communication.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .curvature import Curvature
from .krylov import TensorTuple

__all__ = ["EmpiricalFisherCurvature"]


class EmpiricalFisherCurvature(Curvature):
    """``F = (1/m) sum g_i g_i^T`` over a ring buffer of the last ``history_size`` gradients.

    Lives across stages (``release()`` keeps the history). With ``history_size <= N_L`` (lower
    steps per stage) every stage's lower steps refill the ring before the stage solves, so a run
    resumed at a stage boundary needs no saved history; otherwise save :meth:`state_dict`.

    Args:
        history_size: ``m``, the number of gradients kept (>= 1).
        device: Where the history lives (default the CPU); None: the gradients' own device.
    """

    def __init__(self, history_size: int = 20, device: str | torch.device | None = "cpu") -> None:
        super().__init__(all_reduce=None)
        if not (isinstance(history_size, int) and history_size >= 1):
            raise ValueError(
                f"EmpiricalFisherCurvature: history_size must be >= 1, got {history_size}"
            )
        self.history_size = history_size
        self.device = None if device is None else torch.device(device)
        self.appended = 0  # gradients appended so far (the ring holds the last history_size)
        self._slots: torch.Tensor | None = None  # (m, n), row k = the gradient in slot k
        self._gram: torch.Tensor | None = None  # (m, m) float64, entries <g_i, g_j>
        self._shapes: tuple[torch.Size, ...] = ()

    # ---- History ----------------------------------------------------------------------------

    def __len__(self) -> int:
        """Gradients currently held: ``min(appended, history_size)``."""
        return min(self.appended, self.history_size)

    def _flatten(self, ts: Sequence[torch.Tensor], who: str) -> torch.Tensor:
        shapes = tuple(t.shape for t in ts)
        if shapes != self._shapes:
            raise ValueError(
                f"EmpiricalFisherCurvature.{who}: got tensors of shapes "
                f"{[tuple(s) for s in shapes]}, the history holds "
                f"{[tuple(s) for s in self._shapes]}"
            )
        if self.device is None and self._slots.device != ts[0].device:
            # The gradients' device, whatever a checkpoint was loaded onto (a resume maps to
            # the CPU): moved once, not read across devices at every product.
            self._slots, self._gram = self._slots.to(ts[0].device), self._gram.to(ts[0].device)
        flat = torch.cat([t.detach().reshape(-1) for t in ts])
        return flat.to(self._slots.device, self._slots.dtype)

    def _unflatten(self, flat: torch.Tensor, like: Sequence[torch.Tensor]) -> TensorTuple:
        parts = flat.split([t.numel() for t in like])
        return tuple(p.view_as(t).to(t.device, t.dtype) for p, t in zip(parts, like, strict=True))

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
            device = grads[0].device if self.device is None else self.device
            numel = sum(g.numel() for g in grads)
            m = self.history_size
            self._slots = torch.zeros(m, numel, dtype=grads[0].dtype, device=device)
            self._gram = torch.zeros(m, m, dtype=torch.float64, device=device)
            self._shapes = tuple(g.shape for g in grads)
        flat = self._flatten(grads, "append")
        if not torch.isfinite(flat).all():
            raise FloatingPointError("EmpiricalFisherCurvature.append: non-finite gradient")
        slot = self.appended % self.history_size
        self._slots[slot].copy_(flat)
        self.appended += 1
        held = len(self)
        # One new row (and column) of the Gram matrix; the other entries are unchanged.
        dots = (self._slots[:held] @ self._slots[slot]).to(torch.float64)
        self._gram[slot, :held] = dots
        self._gram[:held, slot] = dots

    def history(self) -> list[TensorTuple]:
        """The held gradients, oldest first (copies on the history's device)."""
        m, held = self.history_size, len(self)
        oldest = self.appended % m if self.appended > m else 0
        sizes = [math.prod(s) for s in self._shapes]
        out = []
        for k in range(held):
            parts = self._slots[(oldest + k) % m].split(sizes)
            out.append(tuple(p.view(s).clone() for p, s in zip(parts, self._shapes, strict=True)))
        return out

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
        return self._slots[:held], self._gram[:held, :held]

    # ---- The matrix --------------------------------------------------------------------------

    def _local_matvec(self, v: TensorTuple) -> TensorTuple:
        rows, _ = self._held("matvec")
        flat = self._flatten(v, "matvec")
        coefficients = (rows @ flat) / rows.shape[0]
        return self._unflatten(coefficients @ rows, v)

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
        flat = self._flatten(b, "solve_damped")
        # (m/s I + G^T G)^-1 by eigendecomposition: nearly parallel gradients make the Gram
        # matrix rank-deficient, and its rounding (float32 dots) can then leave eigenvalues
        # slightly below 0, which Cholesky would refuse; they are 0 in exact arithmetic.
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        inverse = 1.0 / (rows.shape[0] / scale + eigenvalues.clamp_min(0.0))
        rhs = (rows @ flat).to(torch.float64)
        coefficients = eigenvectors @ (inverse * (eigenvectors.T @ rhs))
        return self._unflatten(flat - coefficients.to(rows.dtype) @ rows, b)

    # ---- Checkpointing ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The history, for a checkpoint (large: ``m`` gradients; see the class docstring)."""
        return {
            "history_size": self.history_size,
            "appended": self.appended,
            "slots": self._slots,
            "gram": self._gram,
            "shapes": [tuple(s) for s in self._shapes],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (onto this object's ``device``; with None, onto the
        gradients' device at the next append, product or solve)."""
        if state["history_size"] != self.history_size:
            raise ValueError(
                f"EmpiricalFisherCurvature: checkpoint history_size {state['history_size']} != "
                f"configured {self.history_size}"
            )
        self.appended = int(state["appended"])
        self._shapes = tuple(torch.Size(s) for s in state["shapes"])
        slots, gram = state["slots"], state["gram"]
        if slots is not None and self.device is not None:
            slots, gram = slots.to(self.device), gram.to(self.device)
        self._slots, self._gram = slots, gram
