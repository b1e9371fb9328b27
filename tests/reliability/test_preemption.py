"""Loader workers leave preemption signals to the training process, a second signal while
stopping changes nothing, and a forwarder replays signals that came before its children."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from bissl_det.runtime.signals import SignalForwarder, TrainingInterrupted, interrupt_immediately
from bissl_det.utils.preemption import INTERRUPT_SIGNALS, ignore_in_workers

import pytest
import torch
from torch.utils.data import DataLoader, Dataset


class _Slow(Dataset):
    def __len__(self) -> int:
        return 10_000

    def __getitem__(self, index: int) -> int:
        time.sleep(0.01)
        return index


def _seeded(worker_id: int) -> None:  # the loader's own init still runs after the signals'
    torch.manual_seed(1234 + worker_id)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.e2e
@pytest.mark.parametrize("context", ["fork", "spawn", "forkserver"])
def test_loader_workers_ignore_signals_from_others_but_end_on_their_parents(context):
    loader = DataLoader(
        _Slow(), num_workers=1, worker_init_fn=_seeded, multiprocessing_context=context
    )
    assert ignore_in_workers(ignore_in_workers(loader)) is loader
    assert loader.worker_init_fn.args == (_seeded,)  # wrapped once
    assert loader.multiprocessing_context.get_start_method() == context
    batches = iter(loader)
    assert int(next(batches)) == 0
    worker = batches._workers[0]
    # From another process (kill(1)), as a scheduler signals every process of a job. A spawned
    # worker has threads of its own imports (OpenBLAS's pool) that may receive them: repeat.
    for _ in range(5):
        for signum in INTERRUPT_SIGNALS:
            name = signal.Signals(signum).name
            subprocess.run(["kill", f"-{name}", str(worker.pid)], check=True)
    time.sleep(1.0)
    assert worker.is_alive(), f"the loader worker died (exit {worker.exitcode})"
    assert [int(next(batches)) for _ in range(3)] == [1, 2, 3]
    # Its parent's terminate() (torch's and multiprocessing's way to end workers) still ends it.
    worker.terminate()
    worker.join(timeout=10)
    assert not _alive(worker.pid) and worker.exitcode == 0


@pytest.mark.e2e
def test_without_the_wrapper_a_loader_worker_dies_of_a_schedulers_sigterm():
    """The failure the wrapper prevents (torch's own worker handler re-raises SIGTERM)."""
    # The forked worker inherits this process's handler: make it the default one, whatever an
    # earlier test in this process left installed; and torch's SIGCHLD handler in this process
    # would raise on the death this test causes.
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        batches = iter(DataLoader(_Slow(), num_workers=1, multiprocessing_context="fork"))
        next(batches)
    finally:
        signal.signal(signal.SIGTERM, previous)
    worker = batches._workers[0]
    on_child = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)
        worker.join(timeout=10)
        assert worker.exitcode == -signal.SIGTERM
        batches._shutdown_workers()
    finally:
        signal.signal(signal.SIGCHLD, on_child)


def test_a_second_signal_while_stopping_does_not_raise_again():
    caught = []
    with interrupt_immediately():
        try:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(1)  # not reached
        except TrainingInterrupted as e:
            os.kill(os.getpid(), signal.SIGTERM)  # e.g. Slurm's SIGTERM after its SIGUSR2
            time.sleep(0.05)
            caught.append(str(e))
    assert len(caught) == 1 and "SIGUSR2" in caught[0]
    # A fresh context raises again.
    with pytest.raises(TrainingInterrupted, match="SIGUSR1"), interrupt_immediately():
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(1)


@pytest.mark.e2e
def test_forwarder_replays_signals_received_before_its_child_started(tmp_path):
    marker = tmp_path / "got"
    child = (
        "import signal, sys, time; from pathlib import Path\n"
        "def got(s, f):\n"
        f"    Path({str(marker)!r}).write_text(signal.Signals(s).name); sys.exit(0)\n"
        "signal.signal(signal.SIGUSR2, got)\n"
        f"Path({str(marker)!r} + '.ready').write_text('1')\n"
        "time.sleep(30)\n"
    )
    with SignalForwarder() as forwarder:
        os.kill(os.getpid(), signal.SIGUSR2)  # before the child exists
        process = subprocess.Popen([sys.executable, "-c", child])
        deadline = time.monotonic() + 60
        while not (tmp_path / "got.ready").exists():
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.02)
        forwarder.add([process.pid])
        assert process.wait(timeout=30) == 0
    assert forwarder.received == [signal.SIGUSR2]
    assert marker.read_text() == "SIGUSR2"
