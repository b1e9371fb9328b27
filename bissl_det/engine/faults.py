"""Numerical-fault guard shared by the trainers: stop loudly, with a diagnostic checkpoint."""

from __future__ import annotations

import math

import torch


class FaultChecks:
    """Mixin for trainers with ``cfg``, ``iter`` and ``checkpointer``.

    A NaN/Inf loss, gradient norm or solver residual never continues silently (no nan_to_num):
    the state is saved as ``model_nonfinite_<unit><iter>.pth`` and a FloatingPointError names
    the level, the iteration and the step.
    """

    unit = "iteration"  # what ``iter`` counts, for messages

    def check_finite(self, value: torch.Tensor | float, what: str, level: str, step: int) -> None:
        number = float(value.detach() if torch.is_tensor(value) else value)
        if not math.isfinite(number):
            self.fail_nonfinite(f"non-finite {what} ({number})", level, step)

    def fail_nonfinite(self, message: str, level: str, step: int) -> None:
        name = f"model_nonfinite_{self.unit}{self.iter:07d}"
        self.checkpointer.save(name, iteration=self.iter)
        raise FloatingPointError(
            f"{message} at the {level} level, {self.unit} {self.iter}, step {step}; diagnostic "
            f"checkpoint: {self.cfg.OUTPUT_DIR}/{name}.pth"
        )

    def clip_and_check(self, params, max_norm: float, level: str, step: int) -> float:
        """Clip the gradient norm (max_norm > 0) and stop on a non-finite norm; returns it."""
        grads = [p for p in params if p.grad is not None]
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in grads]))
        self.check_finite(norm, "gradient norm", level, step)
        return float(norm)
