"""Fault handling shared by the trainers: stop loudly, on every process, with a diagnostic file.

Multi-process runs: a fault that one process sees must stop all of them, or the others wait in
their next collective until it times out.

* Non-finite losses: each process puts its finiteness into a flag row (one entry per rank) that
  is averaged together with the gradients it all-reduces anyway (:meth:`FaultChecks.fault_flags`,
  :meth:`FaultChecks.stop_on_flagged`): every process learns of the fault at the same point,
  without an extra collective, and all stop together; rank 0 writes the diagnostic checkpoint
  and the others wait for it, so the file every process names exists.
* Values already equal on every process (gradient norms after the all-reduce, the implicit
  gradient solver's residuals) stop every process directly, at the same point.
* Anything else raised on one process only (a data error, out of memory, Detectron2's own
  "Inf/NaN" check): :meth:`FaultChecks.stopping_every_rank` writes that process's own diagnostic
  checkpoint and raises :class:`StepFailedError` naming it; the process exits, which breaks its
  peers' pending collectives (gloo: at once; NCCL: after $BISSL_DIST_TIMEOUT,
  utils/distributed.py), or the launcher terminates them; each of them names its own file.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch
from detectron2.utils import comm

from ..utils.distributed import ReplicaMismatchError, agreed_flags, flagged_ranks


class DivergenceError(FloatingPointError):
    """Training diverged; the diagnostic checkpoint is written and named in the message."""


class StepFailedError(RuntimeError):
    """An exception on this process during a step; the message names the level, the step and
    this process's diagnostic checkpoint (the original exception is the ``__cause__``)."""


class FaultChecks:
    """Mixin for trainers with ``cfg``, ``iter`` and an :class:`AtomicCheckpointer`.

    A NaN/Inf loss, gradient norm or solver residual never continues silently (no nan_to_num):
    the state is saved as ``model_nonfinite_<unit><iter>.pth`` (never tagged as the resume
    point; it records the level, stage and step) and a :class:`DivergenceError` names them.
    """

    unit = "iteration"  # what ``iter`` counts, for messages
    # (level, step) being run: what an exception on one process is reported at.
    where: tuple[str, int] = ("", 0)

    def check_finite(self, value: torch.Tensor | float, what: str, level: str, step: int) -> None:
        """Stop if ``value`` is NaN/Inf. For values equal on every process (or one process):
        a local value goes through :meth:`fault_flags` instead."""
        number = float(value.detach() if torch.is_tensor(value) else value)
        if not math.isfinite(number):
            self.fail_nonfinite(f"non-finite {what} ({number})", level, step, agreed=True)

    def fault_flags(self, value: torch.Tensor) -> torch.Tensor:
        """A flag row, set at this rank if ``value`` (a local loss) is NaN/Inf, to be averaged
        with the next all-reduce and read by :meth:`stop_on_flagged` (no host sync here)."""
        flags = agreed_flags(False, value.device)
        flags[comm.get_rank()] = (~torch.isfinite(value.detach().float())).float().reshape(())
        return flags

    def stop_on_flagged(
        self, flags: torch.Tensor, value: torch.Tensor, what: str, level: str, step: int
    ) -> None:
        """After ``flags`` (of ``value``, this process's loss) were averaged over processes:
        stop every process if any process's flag was set."""
        ranks = flagged_ranks(flags)
        if not ranks:
            return
        message = f"non-finite {what}"
        if not torch.isfinite(value.detach()).all():
            message += f" ({float(value.detach())})"
        if comm.get_world_size() > 1:
            message += f" on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
        self.fail_nonfinite(message, level, step, agreed=True)

    def fail_nonfinite(self, message: str, level: str, step: int, agreed: bool = False) -> None:
        """Write the diagnostic checkpoint and raise :class:`DivergenceError`.

        ``agreed``: every process calls this at the same point (rank 0 writes, the others wait
        for the file); otherwise only this process knows, and writes its own file.
        """
        name = f"model_nonfinite_{self.unit}{self.iter:07d}"
        diagnostic = {"message": message, "level": level, self.unit: self.iter, "step": step}
        if agreed or comm.get_world_size() == 1:
            self.checkpointer.save_diagnostic(name, iteration=self.iter, diagnostic=diagnostic)
            comm.synchronize()  # no process names the file before rank 0 has written it
        else:
            name += f"_rank{comm.get_rank()}"
            self.checkpointer.save_diagnostic(
                name, this_process=True, iteration=self.iter, diagnostic=diagnostic
            )
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

    @contextlib.contextmanager
    def stopping_every_rank(self) -> Iterator[None]:
        """Around a step: an exception raised here (on this process only, perhaps) becomes a
        :class:`StepFailedError` naming the level, the step and a diagnostic checkpoint that
        this process writes itself (``model_fault_<unit><iter>_rank<r>.pth``)."""
        try:
            yield
        except (DivergenceError, StepFailedError, ReplicaMismatchError):
            raise
        except Exception as err:
            self.fail_exception(err)

    def fail_exception(self, err: Exception) -> None:
        level, step = self.where
        rank = comm.get_rank()
        name = f"model_fault_{self.unit}{self.iter:07d}_rank{rank}"
        path = os.path.join(self.cfg.OUTPUT_DIR, f"{name}.pth")
        diagnostic = {
            "message": f"{type(err).__name__}: {err}",
            "level": level,
            self.unit: self.iter,
            "step": step,
            "rank": rank,
        }
        try:
            self.checkpointer.save_diagnostic(
                name, this_process=True, iteration=self.iter, diagnostic=diagnostic
            )
            saved = f"diagnostic checkpoint: {path}"
        except Exception as save_err:  # the fault may be the disk itself
            saved = f"no diagnostic checkpoint ({type(save_err).__name__}: {save_err})"
        hint = ""
        if comm.get_world_size() > 1:
            hint = (
                " (an error inside a collective usually means another process failed first: "
                "see its log, log.txt.rank<N> in OUTPUT_DIR)"
            )
        raise StepFailedError(
            f"{type(err).__name__} on rank {rank} at the {level} level, {self.unit} {self.iter}, "
            f"step {step}: {err}; {saved}{hint}"
        ) from err

    def clip_and_check(self, params, max_norm: float, level: str, step: int) -> float:
        """Clip the gradient norm (max_norm > 0) and stop on a non-finite norm; returns it.

        The gradients are all-reduced first: the norm, and the decision, are every process's.
        """
        grads = [p for p in params if p.grad is not None]
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in grads]))
        self.check_finite(norm, "gradient norm", level, step)
        return float(norm)
