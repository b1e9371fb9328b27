"""The signals that stop a run, and DataLoader workers that leave them to the training process.

A scheduler signals every process of a job (Slurm's ``--signal=USR2@...``, the SIGTERM at a
time limit or on preemption), a terminal every process of its group (SIGINT). A DataLoader
worker killed by one of them makes the training process's next batch fail before it can stop
at a step boundary with a checkpoint; and torch's own SIGTERM handler in a worker dies unless
the signal comes from its parent. So workers ignore these signals (:func:`ignore_in_workers`).
Their parent still ends them when it must (torch's shutdown of a stuck worker, multiprocessing's
at exit): its ``terminate()`` sends :data:`WORKER_END_SIGNAL`, which no scheduler sends, in place
of SIGTERM. The sender of a SIGTERM cannot tell the two apart reliably: a spawned worker has
threads from its imports (OpenBLAS's pool) that may receive it before any mask is set.
The training process stops, and its workers end with it. The stop itself is
:mod:`bissl_det.runtime.signals`.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
from collections.abc import Callable
from multiprocessing import context, popen_fork, popen_forkserver, popen_spawn_posix
from typing import Any

from torch.utils.data import DataLoader

# SIGUSR2: submitit's (and Slurm's --signal) warning; SIGUSR1: the tools' own stop request.
INTERRUPT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
# The exit status of a tool stopped by one of them after its checkpoint (EX_TEMPFAIL: try again).
EXIT_INTERRUPTED = 75
# How a parent ends its loader workers: a real-time signal no scheduler or terminal sends
# (glibc's SIGRTMIN already skips the ones it reserves).
WORKER_END_SIGNAL = signal.SIGRTMIN + 3


def ignore_interrupt_signals() -> None:
    """This process (a loader worker) ignores :data:`INTERRUPT_SIGNALS` and ends, cleanly as
    torch's own handler does, on :data:`WORKER_END_SIGNAL` (whichever thread receives it)."""
    for signum in INTERRUPT_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(WORKER_END_SIGNAL, lambda *_: os._exit(0))


class _EndsWithItsOwnSignal:
    """A worker's Popen whose ``terminate()`` (torch's and multiprocessing's way to end a worker)
    sends :data:`WORKER_END_SIGNAL`: the worker ignores SIGTERM."""

    def terminate(self) -> None:
        self._send_signal(WORKER_END_SIGNAL)


class _ForkPopen(_EndsWithItsOwnSignal, popen_fork.Popen):
    pass


class _SpawnPopen(_EndsWithItsOwnSignal, popen_spawn_posix.Popen):
    pass


class _ForkserverPopen(_EndsWithItsOwnSignal, popen_forkserver.Popen):
    pass


# Module-level classes: spawn and forkserver pickle the process object by name.
class _ForkWorker(context.ForkProcess):
    _Popen = staticmethod(_ForkPopen)


class _SpawnWorker(context.SpawnProcess):
    _Popen = staticmethod(_SpawnPopen)


class _ForkserverWorker(context.ForkServerProcess):
    _Popen = staticmethod(_ForkserverPopen)


class _ForkWorkers(context.ForkContext):
    Process = _ForkWorker


class _SpawnWorkers(context.SpawnContext):
    Process = _SpawnWorker


class _ForkserverWorkers(context.ForkServerContext):
    Process = _ForkserverWorker


_WORKER_CONTEXTS = {"fork": _ForkWorkers, "spawn": _SpawnWorkers, "forkserver": _ForkserverWorkers}


def _init_ignoring(init: Callable[[int], Any] | None, worker_id: int) -> None:
    # After torch's worker set-up (which installs its SIGTERM handler), before the data.
    ignore_interrupt_signals()
    if init is not None:
        init(worker_id)


def ignore_in_workers(loader):
    """``loader`` (a DataLoader, or detectron2's AspectRatioGroupedDataset around one) whose
    worker processes ignore :data:`INTERRUPT_SIGNALS`, then run its own ``worker_init_fn``, and
    are ended by their parent with :data:`WORKER_END_SIGNAL`.

    A module-level function in a partial: picklable for any start method (fork or spawn).
    """
    inner = getattr(loader, "dataset", None)
    target = loader if isinstance(loader, DataLoader) else inner
    if isinstance(target, DataLoader) and target.num_workers > 0:
        init = target.worker_init_fn
        if not (isinstance(init, functools.partial) and init.func is _init_ignoring):
            target.worker_init_fn = functools.partial(_init_ignoring, init)
        chosen = target.multiprocessing_context or multiprocessing.get_context()
        workers = _WORKER_CONTEXTS[chosen.get_start_method()]
        if not isinstance(chosen, workers):
            target.multiprocessing_context = workers()
    return loader
