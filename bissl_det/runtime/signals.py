"""Interruptions are safe: SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 stop a run at a step boundary.

* Inside a training loop, :class:`GracefulInterrupt` (a hook of every trainer) turns
  the signal into a flag; after the current step (all processes agree on the step) it writes
  the checkpoint ``model_<iter>.pth`` that a periodic checkpoint of that step would be, and
  raises :class:`TrainingInterrupted`. ``--resume`` continues from it exactly.
* Outside a loop (start-up, head warm-up, evaluation), :func:`interrupt_immediately` makes the
  same signals raise :class:`TrainingInterrupted` at once: nothing new is on disk then, and
  ``--resume`` continues from the last checkpoint (or starts over).

The tools exit with :data:`EXIT_INTERRUPTED` (75, ``EX_TEMPFAIL`` of sysexits.h: "try again")
after an interruption: never 0, and distinct from a failure's 1.

A whole process tree is signalled at once on a cluster: Slurm's ``--signal=USR2@...`` (what
submitit asks for) and the SIGTERM at the time limit or on preemption reach every process of
the job step, and a terminal's Ctrl-C every process of its group. So:

* every process of a tool handles the same :data:`INTERRUPT_SIGNALS` (SIGUSR2 included: its
  default action would kill a process before the checkpoint); SIGCONT, which Slurm sends
  with SIGTERM, does nothing;
* DataLoader workers ignore them (:func:`bissl_det.utils.preemption.ignore_in_workers`, and
  forked children do not act on inherited handlers, :func:`handling`): only the training
  processes decide, at a step boundary; a worker ends when its parent does;
* parents that start processes (the launcher, ``tools/run_demo.py``) forward the signals with
  :class:`SignalForwarder`, for schedulers that signal the parent only;
* a second signal while a stop is under way (SIGUSR2 then SIGTERM) changes nothing: the
  first one's checkpoint is written and the process exits with 75.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from detectron2.engine import HookBase, hooks
from detectron2.utils import comm

from ..utils.preemption import EXIT_INTERRUPTED, INTERRUPT_SIGNALS

logger = logging.getLogger(__name__)

# TrainingInterrupted instances created in this process: a stop under way ignores more signals.
_stops_started = 0


class TrainingInterrupted(BaseException):  # noqa: N818  (a stop request, like KeyboardInterrupt)
    """A run stopped by a signal, resumable with ``--resume``.

    A BaseException, like KeyboardInterrupt: ``except Exception`` blocks let it through, and
    Detectron2's "Exception during training" traceback is not printed for a requested stop.

    Attributes:
        checkpoint: the checkpoint written at the stop, or None if none was (stopped outside a
            training loop: the last checkpoint, if any, is the resume point).
    """

    def __init__(self, message: str, checkpoint: str | None = None):
        global _stops_started
        super().__init__(message)
        self.checkpoint = checkpoint
        _stops_started += 1


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


@contextlib.contextmanager
def handling(signals: Sequence[int], handler) -> Iterator[None]:
    """Install ``handler(signum, frame)`` for ``signals`` in this process, restore on exit.

    Forked children (DataLoader workers) inherit Python handlers: the handler runs only in the
    installing process; a worker leaves the stop to its parent.
    """
    owner = os.getpid()

    def owned(signum, frame):
        if os.getpid() == owner:
            handler(signum, frame)

    previous = {s: signal.signal(s, owned) for s in signals}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)


def interrupt_immediately(signals: Sequence[int] = INTERRUPT_SIGNALS):
    """Context manager: ``signals`` raise :class:`TrainingInterrupted` at once (tools' default).

    Once a stop is under way in this process (a TrainingInterrupted was raised since entering,
    here or by :class:`GracefulInterrupt`), further signals are only logged: raising again
    would replace the stop, in the middle of its clean-up, by an unhandled exception.
    """
    entered = _stops_started

    def raise_now(signum, frame) -> None:
        if _stops_started != entered:
            logger.info("%s received while stopping: ignored", signal_name(signum))
            return
        raise TrainingInterrupted(
            f"interrupted by {signal_name(signum)} outside a training step: no checkpoint was "
            "written; --resume continues from the last one"
        )

    return handling(signals, raise_now)


class SignalForwarder:
    """Forward ``signals`` received by this process to child processes (by pid).

    For a parent that starts the processes doing the work (the launcher's workers, a demo's
    tool): a scheduler or ``kill`` may signal the parent only. Signals that arrive before a
    child is added are sent to it when it is (:meth:`add`). Use as a context manager: the
    handlers are installed on entry and restored on exit. ``received`` lists the signals.
    """

    def __init__(self, signals: Sequence[int] = INTERRUPT_SIGNALS):
        self.signals = tuple(signals)
        self.received: list[int] = []
        self._pids: list[int] = []
        self._handlers: contextlib.ExitStack | None = None

    def add(self, pids: Iterable[int]) -> None:
        """Forward to ``pids`` from now on; replay the signals received so far to them."""
        pids = list(pids)
        self._pids.extend(pids)
        for signum in self.received:
            _send(pids, signum)

    def _forward(self, signum, frame) -> None:
        self.received.append(signum)
        _send(self._pids, signum)

    def __enter__(self) -> SignalForwarder:
        self._handlers = contextlib.ExitStack()
        self._handlers.enter_context(handling(self.signals, self._forward))
        return self

    def __exit__(self, *exc) -> None:
        self._handlers.close()


def _send(pids: Iterable[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # already ended
            os.kill(pid, signum)


class GracefulInterrupt(HookBase):
    """Stop at the next step boundary on a signal: checkpoint, then :class:`TrainingInterrupted`.

    For any Detectron2 trainer with ``checkpointer`` (``save(name, iteration=...)``, as
    PeriodicCheckpointer uses it) that resumes at ``iteration + 1``; a trainer without one stops
    at the step boundary without a checkpoint. Register it on every process with
    :func:`with_graceful_interrupt`. All processes all-reduce the flag after each step, so
    they stop at the same step even when only one of them received the signal.
    """

    def __init__(self, signals: Sequence[int] = INTERRUPT_SIGNALS):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._handlers: contextlib.ExitStack | None = None

    def _on_signal(self, signum, frame) -> None:
        if self.received is None:
            logger.warning(
                "Received %s: stopping after the current step (checkpoint, then exit %d; "
                "--resume continues)",
                signal_name(signum),
                EXIT_INTERRUPTED,
            )
        self.received = signum

    def before_train(self) -> None:
        self._handlers = contextlib.ExitStack()
        try:
            self._handlers.enter_context(handling(self.signals, self._on_signal))
        except ValueError:  # signal handlers can only be set from the main thread
            logger.warning("Not in the main thread: signals stop this run without a checkpoint")

    def after_step(self) -> None:
        signum = self._agreed_signal()
        if signum is None:
            return
        iteration, stop = self.trainer.iter, signal_name(signum)
        checkpointer = getattr(self.trainer, "checkpointer", None)
        if checkpointer is None:
            raise TrainingInterrupted(
                f"interrupted by {stop} after iteration {iteration}; this trainer keeps no "
                "checkpoint: running it again starts it over"
            )
        name = f"model_{iteration:07d}"
        checkpointer.save(name, iteration=iteration)
        comm.synchronize()  # no process exits (and gets its peers terminated) before the write
        path = os.path.join(checkpointer.save_dir, f"{name}.pth")
        raise TrainingInterrupted(
            f"interrupted by {stop} after iteration {iteration}: checkpoint "
            f"{path}; --resume continues from iteration {iteration + 1}",
            checkpoint=path,
        )

    def after_train(self) -> None:
        if self._handlers is not None:
            self._handlers.close()
            self._handlers = None

    def _agreed_signal(self) -> int | None:
        """The signal any process received (the largest number), the same on every process."""
        if comm.get_world_size() == 1:
            return self.received
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([self.received or 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


def with_graceful_interrupt(hook_list: list[HookBase], **kwargs) -> list[HookBase]:
    """``hook_list`` with a :class:`GracefulInterrupt` just before its PeriodicWriter (or last).

    After every hook that finishes the step (periodic checkpoint, export, evaluation): the
    checkpoint then holds what a periodic one of that step would. Before the writers: the step's
    metrics are written once, by their ``after_train`` (Detectron2's console writer divides by
    zero when asked to write one iteration twice).
    """
    writers = [i for i, h in enumerate(hook_list) if isinstance(h, hooks.PeriodicWriter)]
    position = writers[0] if writers else len(hook_list)
    return [*hook_list[:position], GracefulInterrupt(**kwargs), *hook_list[position:]]
