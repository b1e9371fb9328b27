"""One run per OUTPUT_DIR: a second run is refused, naming the holder; a killed run frees it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bissl_det.runtime.run_lock import (
    LOCK_NAME,
    OutputDirInUse,
    lock_output_dir,
    remove_stray_temp_files,
)
from tests.helpers import REPO, TINY_C4, TRAIN_BISSL

import pytest

from .runs import ENV, run

# A process that holds a folder's lock until it is killed (it imports only the lock module).
HOLDER = f"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("run_lock", "{REPO}/bissl_det/runtime/run_lock.py")
run_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_lock)
run_lock.lock_output_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """A live process holding tmp_path/run's lock."""
    out = tmp_path / "run"
    out.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    assert process.stdout.readline().strip() == "locked"
    yield out, process
    process.kill()
    process.wait()


@pytest.mark.e2e
def test_second_run_is_refused_naming_folder_and_holder(holder):
    out, process = holder
    with pytest.raises(OutputDirInUse) as err:
        lock_output_dir(out)
    message = str(err.value)
    assert f"OUTPUT_DIR {out} is in use by another run" in message
    assert f"pid {process.pid} on host {socket.gethostname()} since " in message
    assert str(out) in message.split(": ", 1)[1]  # the holder's command line


@pytest.mark.e2e
@pytest.mark.slow
def test_a_real_second_tool_run_stops_before_writing(holder, demo_workdir):
    out, process = holder
    before = sorted(p.name for p in out.iterdir())
    command = [sys.executable, str(TRAIN_BISSL), "--config-file", str(TINY_C4)]
    second = run([*command, "OUTPUT_DIR", str(out)], demo_workdir, timeout=120)
    assert second.returncode == 1, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"OutputDirInUse: OUTPUT_DIR {out} is in use by another run" in second.stderr
    assert f"pid {process.pid}" in second.stderr
    # Not even a log file or config.yaml was written into the holder's folder.
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.e2e
def test_lock_is_free_once_the_holder_is_killed(holder):
    out, process = holder
    process.send_signal(signal.SIGKILL)
    process.wait()
    start = time.monotonic()
    lock = lock_output_dir(out)  # at once: the kernel released the dead process's lock
    assert time.monotonic() - start < 1.0
    assert f'"pid": {os.getpid()}' in (out / LOCK_NAME).read_text()
    lock.release()
    assert (out / LOCK_NAME).read_text() == ""


@pytest.mark.e2e
def test_same_process_reuses_its_lock_and_others_see_it(tmp_path):
    """Runs one after another in one process (tests) share the folder; other processes do not."""
    lock = lock_output_dir(tmp_path)
    assert lock_output_dir(tmp_path) is lock
    probe = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("run_lock", "{REPO}/bissl_det/runtime/run_lock.py")
run_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_lock)
try:
    run_lock.lock_output_dir(sys.argv[1])
    print("got it")
except run_lock.OutputDirInUse:
    print("refused")
"""

    def other_process() -> str:
        command = [sys.executable, "-c", probe, str(tmp_path)]
        return subprocess.run(command, capture_output=True, text=True, env=ENV).stdout.strip()

    assert other_process() == "refused"
    lock.release()
    assert other_process() == "got it"  # and it ended, so the folder is free again
    lock_output_dir(tmp_path).release()


def test_stray_temporary_files_are_removed_at_start(in_demo_workdir, tmp_path):
    from bissl_det.runtime.setup import setup

    from detectron2.engine import default_argument_parser

    out = tmp_path / "out"
    out.mkdir()
    strays = [".model_0000003.pth.tmp4242", ".last_checkpoint.tmp", ".lower_backbone.pth.x1y2.tmp"]
    kept = ["model_0000003.pth", "last_checkpoint", "notes.tmp.txt", "metrics.json"]
    for name in strays + kept:
        (out / name).write_text("x")
    args = default_argument_parser().parse_args(
        ["--config-file", str(TINY_C4), "OUTPUT_DIR", str(out)]
    )
    setup(args, tool="train_bissl")
    left = {p.name for p in out.iterdir()}
    assert not left & set(strays) and set(kept) <= left
    log = (out / "log.txt").read_text()  # the run's own log says what was removed
    for name in strays:
        assert f"Removed {out / name}: a temporary file of an interrupted write" in log
    assert remove_stray_temp_files(out) == []


@pytest.mark.e2e
def test_setup_takes_the_lock(in_demo_workdir, holder):
    from bissl_det.runtime.setup import setup

    from detectron2.engine import default_argument_parser

    out, _ = holder
    args = default_argument_parser().parse_args(
        ["--config-file", str(TINY_C4), "OUTPUT_DIR", str(out)]
    )
    with pytest.raises(OutputDirInUse, match=str(out)):
        setup(args)
    assert not (out / "log.txt").exists()


def test_lock_file_name_is_not_a_stray(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")
    assert remove_stray_temp_files(tmp_path) == []
    assert Path(tmp_path / LOCK_NAME).exists()
