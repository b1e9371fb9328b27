"""The signals that stop a run, and DataLoader workers that leave them to the training process.

A scheduler signals every process of a job (Slurm's ``--signal=USR2@...``, the SIGTERM at a
time limit or on preemption), a terminal every process of its group (SIGINT). A DataLoader
worker killed by one of them makes the training process's next batch fail before it can stop
at a step boundary with a checkpoint; and torch's own SIGTERM handler in a worker dies unless
the signal comes from its parent. So workers ignore these signals (:func:`ignore_in_workers`),
except a SIGTERM from their parent: torch's shutdown (and multiprocessing's at exit) ends
workers with it, and a worker that ignored it would hang its parent's exit. The training process
stops, and its workers end with it. The stop itself is :mod:`bissl_det.engine.signals`.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader

# SIGUSR2: submitit's (and Slurm's --signal) warning; SIGUSR1: the tools' own stop request.
INTERRUPT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
# The exit status of a tool stopped by one of them after its checkpoint (EX_TEMPFAIL: try again).
EXIT_INTERRUPTED = 75


def ignore_interrupt_signals() -> None:
    """This process (a loader worker) ignores :data:`INTERRUPT_SIGNALS`, but ends on a SIGTERM
    sent by its parent, as torch's own worker handler does.

    Call it before the process starts threads: SIGTERM is blocked in this thread (and so in the
    threads it starts), and a thread waits for it with the sender's pid (a Python handler
    cannot see who sent a signal).
    """
    for signum in INTERRUPT_SIGNALS:
        if signum != signal.SIGTERM:
            signal.signal(signum, signal.SIG_IGN)
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def end_on_parents_sigterm() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)  # like torch's handler: a clean end, not a crash to report

    threading.Thread(target=end_on_parents_sigterm, name="sigterm-from-parent", daemon=True).start()


def _init_ignoring(init: Callable[[int], Any] | None, worker_id: int) -> None:
    # After torch's worker set-up (which installs its SIGTERM handler), before the data.
    ignore_interrupt_signals()
    if init is not None:
        init(worker_id)


def ignore_in_workers(loader):
    """``loader`` (a DataLoader, or detectron2's AspectRatioGroupedDataset around one) whose
    worker processes ignore :data:`INTERRUPT_SIGNALS`, then run its own ``worker_init_fn``.

    A module-level function in a partial: picklable for any start method (fork or spawn).
    """
    inner = getattr(loader, "dataset", None)
    target = loader if isinstance(loader, DataLoader) else inner
    if isinstance(target, DataLoader) and target.num_workers > 0:
        init = target.worker_init_fn
        if not (isinstance(init, functools.partial) and init.func is _init_ignoring):
            target.worker_init_fn = functools.partial(_init_ignoring, init)
    return loader
