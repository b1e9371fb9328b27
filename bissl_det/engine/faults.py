"""Numerical-fault guard shared by the trainers: stop loudly, with a diagnostic checkpoint."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch


class DivergenceError(FloatingPointError):
    """Training diverged; the diagnostic checkpoint is written and named in the message."""


class FaultChecks:
    """Mixin for trainers with ``cfg``, ``iter`` and an :class:`AtomicCheckpointer`.

    A NaN/Inf loss, gradient norm or solver residual never continues silently (no nan_to_num):
    the state is saved as ``model_nonfinite_<unit><iter>.pth`` (never tagged as the resume
    point; it records the level, stage and step) and a :class:`DivergenceError` names them.
    """

    unit = "iteration"  # what ``iter`` counts, for messages

    def check_finite(self, value: torch.Tensor | float, what: str, level: str, step: int) -> None:
        number = float(value.detach() if torch.is_tensor(value) else value)
        if not math.isfinite(number):
            self.fail_nonfinite(f"non-finite {what} ({number})", level, step)

    def fail_nonfinite(self, message: str, level: str, step: int) -> None:
        name = f"model_nonfinite_{self.unit}{self.iter:07d}"
        diagnostic = {"message": message, "level": level, self.unit: self.iter, "step": step}
        self.checkpointer.save_diagnostic(name, iteration=self.iter, diagnostic=diagnostic)
        raise DivergenceError(
            f"{message} at the {level} level, {self.unit} {self.iter}, step {step}; diagnostic "
            f"checkpoint: {self.cfg.OUTPUT_DIR}/{name}.pth"
        )

    @contextlib.contextmanager
    def divergence_guard(self, level: str, step: int) -> Iterator[None]:
        """Treat a FloatingPointError raised inside Detectron2 (e.g. its RPN's "Predicted boxes
        or scores contain Inf/NaN") like the project's own checks: diagnostic checkpoint."""
        try:
            yield
        except DivergenceError:
            raise
        except FloatingPointError as err:
            self.fail_nonfinite(f"Detectron2: {err}", level, step)

    def clip_and_check(self, params, max_norm: float, level: str, step: int) -> float:
        """Clip the gradient norm (max_norm > 0) and stop on a non-finite norm; returns it."""
        grads = [p for p in params if p.grad is not None]
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in grads]))
        self.check_finite(norm, "gradient norm", level, step)
        return float(norm)
