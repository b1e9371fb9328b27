"""Interruptions are safe: a signal stops a run at a step boundary with a checkpoint and exit code
75, and ``--resume`` reaches the uninterrupted run's weights bit for bit."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bissl_det.runtime.signals import (
    EXIT_INTERRUPTED,
    GracefulInterrupt,
    TrainingInterrupted,
    interrupt_immediately,
    with_graceful_interrupt,
)
from tests.helpers import REPO

import pytest
import torch
from detectron2.engine import HookBase, TrainerBase, hooks
from detectron2.utils import comm

from .runs import ENV, STAGES, assert_same_weights, bissl_command, reference_run, run, start

# ---- A real tool, a real signal, a real --resume ----------------------------------------------

# No periodic checkpoint: the one written at the signal is the only resume point.
ONLY_FINAL = ["BISSL.CHECKPOINT_PERIOD", "0"]


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_is_bit_identical(demo_workdir, tmp_path, tmp_path_factory):
    out_a = tmp_path / "interrupted"
    victim = start(bissl_command(out_a) + ONLY_FINAL, demo_workdir)
    deadline = time.monotonic() + 180
    metrics = out_a / "metrics.json"
    while not (metrics.exists() and metrics.read_text().strip()):  # stage 0 is done
        assert victim.poll() is None, "the run ended before its first stage was written"
        assert time.monotonic() < deadline, "no stage finished in time"
        time.sleep(0.01)
    victim.send_signal(signal.SIGTERM)
    log, _ = victim.communicate(timeout=180)
    assert victim.returncode == EXIT_INTERRUPTED, log[-3000:]
    tag = (out_a / "last_checkpoint").read_text().strip()
    stopped = int(tag.removeprefix("model_").removesuffix(".pth"))
    assert 0 <= stopped < STAGES - 1, f"stopped after stage {stopped}: make the run longer"
    assert f"interrupted by SIGTERM after iteration {stopped}: checkpoint" in log
    assert f"--resume continues from iteration {stopped + 1} (exit code 75)" in log
    # An interrupted run never leaves a result that looks final.
    assert not (out_a / "model_final.pth").exists()
    assert not (out_a / "lower_backbone.pth").exists()

    resumed = run(bissl_command(out_a, "--resume") + ONLY_FINAL, demo_workdir, timeout=180)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"Starting training from iteration {stopped + 1}" in (out_a / "log.txt").read_text()
    # Uninterrupted, with a checkpoint every stage: writing them changes no weight either.
    out_b = reference_run(tmp_path_factory, demo_workdir)
    for name in ("model_final.pth", "lower_backbone.pth"):
        assert_same_weights(out_a / name, out_b / name)


# ---- A whole process tree signalled at once, as Slurm and a terminal do it --------------------

# Two gloo processes, each with a detection loader worker (a deterministic mapping: no random
# flip, one size, so that the resume is exact with workers); the spawned resource tracker too.
TREE = ["--num-gpus", "2"]
TREE_OPTS = [*ONLY_FINAL, "DATALOADER.NUM_WORKERS", "1", "INPUT.RANDOM_FLIP", "none"]


def process_group(pgid: int) -> list[int]:
    """The pids of process group ``pgid`` (field 5 of /proc/<pid>/stat)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        state, _, group = stat[stat.rindex(")") + 2 :].split()[:3]
        if int(group) == pgid and state != "Z":
            pids.append(int(proc.name))
    return pids


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return f"{pid} (ended)"


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize(
    "signals",
    [(signal.SIGUSR2, signal.SIGTERM), (signal.SIGTERM,)],
    ids=["USR2-then-TERM", "TERM"],
)
def test_every_process_signalled_checkpoints_exits_75_and_resumes_exactly(
    demo_workdir, tmp_path, tmp_path_factory, signals
):
    out = tmp_path / "interrupted"
    victim = start(bissl_command(out, *TREE) + TREE_OPTS, demo_workdir, new_session=True)
    deadline = time.monotonic() + 600
    metrics = out / "metrics.json"
    while not (metrics.exists() and metrics.read_text().strip()):  # stage 0 is done
        assert victim.poll() is None, victim.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no stage finished in time"
        time.sleep(0.01)
    tree = process_group(victim.pid)
    # launcher, resource tracker, 2 workers, 1 loader worker each
    assert len(tree) >= 6, tree
    signalled = time.monotonic()
    for signum in signals:
        os.killpg(victim.pid, signum)  # every process of the group, as Slurm signals a step
        time.sleep(0.2)
    log, _ = victim.communicate(timeout=600)
    seconds = time.monotonic() - signalled
    assert victim.returncode == EXIT_INTERRUPTED, log[-3000:]
    # Loader workers and the resource tracker end once they see their parent gone (seconds).
    left = process_group(victim.pid)
    while left and time.monotonic() < signalled + seconds + 30:
        time.sleep(0.2)
        left = process_group(victim.pid)
    assert not left, f"processes of the tree outlived it: {[_command(pid) for pid in left]}"
    print(
        f"{len(tree)} processes signalled {[s.name for s in signals]}: exit 75 in {seconds:.1f} s"
    )
    assert "Traceback" not in log and "killed by signal" not in log, log[-3000:]
    tag = (out / "last_checkpoint").read_text().strip()
    stopped = int(tag.removeprefix("model_").removesuffix(".pth"))
    assert 0 <= stopped < STAGES - 1, f"stopped after stage {stopped}: make the run longer"
    assert f"after iteration {stopped}: checkpoint" in (out / "log.txt").read_text()
    assert not (out / "model_final.pth").exists()

    # One run at a time: two processes each already fill a 2-core CI machine.
    resumed = run(bissl_command(out, *TREE, "--resume") + TREE_OPTS, demo_workdir, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    ref_out = reference_run(tmp_path_factory, demo_workdir, TREE, TREE_OPTS)  # both signal sets
    assert f"Starting training from iteration {stopped + 1}" in (out / "log.txt").read_text()
    for name in ("model_final.pth", "lower_backbone.pth"):
        assert_same_weights(out / name, ref_out / name)


# ---- The same path in process, for SIGUSR1 (Slurm's warning) and SIGINT (Ctrl-C) ---------------


class SignalAt(HookBase):
    """Send this process ``signum`` as step ``iteration`` starts."""

    def __init__(self, iteration: int, signum: int):
        self.iteration, self.signum = iteration, signum

    def before_step(self) -> None:
        if self.trainer.iter == self.iteration:
            os.kill(os.getpid(), self.signum)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGINT], ids=["SIGUSR1", "SIGINT"])
def test_pretraining_stops_at_the_step_and_resumes_exactly(in_demo_workdir, tmp_path, signum):
    from tests.helpers import tiny_config
    from tests.tools.test_pretrain_ssl import DEMO, TINY, pretrainer

    opts = [*TINY, "PRETRAIN.ITERS", "4", "PRETRAIN.CHECKPOINT_PERIOD", "0"]
    straight = pretrainer(tiny_config(DEMO["byol"], tmp_path / "straight", *opts))
    straight.train()

    cfg = tiny_config(DEMO["byol"], tmp_path / "split", *opts)
    first = pretrainer(cfg)
    first.register_hooks([SignalAt(1, signum)])
    handler = signal.getsignal(signum)
    name = signal.Signals(signum).name
    with pytest.raises(TrainingInterrupted, match=f"{name} after iteration 1") as err:
        first.train()
    assert signal.getsignal(signum) is handler, "the run's handler outlived its training loop"
    out = tmp_path / "split"
    assert err.value.checkpoint == str(out / "model_0000001.pth")
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (out / "model_final.pth").exists() and not (out / "pretext_backbone.pth").exists()

    # The resumed run must not depend on the fresh process's RNG.
    second = pretrainer(cfg, resume=True, seed=123)
    assert second.start_iter == 2
    second.train()
    expected = straight.model.state_dict()
    for key, value in second.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


def test_a_trainer_without_checkpoints_stops_at_the_step_too():
    class Counting(TrainerBase):
        def run_step(self) -> None:
            self.steps = self.iter + 1

    trainer = Counting()
    trainer.register_hooks([*with_graceful_interrupt([]), SignalAt(2, signal.SIGUSR1)])
    with pytest.raises(TrainingInterrupted, match="after iteration 2; this trainer keeps no") as e:
        trainer.train(0, 10)
    assert trainer.steps == 3 and e.value.checkpoint is None


def test_signal_outside_a_training_loop_stops_at_once():
    handler = signal.getsignal(signal.SIGTERM)
    stop = pytest.raises(TrainingInterrupted, match="SIGTERM outside a training step")
    with stop, interrupt_immediately():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # not reached: the handler raises first
    assert signal.getsignal(signal.SIGTERM) is handler


def test_forked_children_leave_the_stop_to_their_parent():
    """DataLoader workers are forked with the parent's handlers; they must not act on them."""
    with interrupt_immediately():
        pid = os.fork()
        if pid == 0:  # the child: a signal to it must not raise here
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
            except BaseException:
                os._exit(3)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_hook_goes_before_the_writers():
    timer, writer = hooks.IterationTimer(), hooks.PeriodicWriter([])
    ordered = with_graceful_interrupt([timer, writer])
    assert ordered[0] is timer and isinstance(ordered[1], GracefulInterrupt)
    assert ordered[2] is writer
    assert isinstance(with_graceful_interrupt([timer])[-1], GracefulInterrupt)


# ---- Several processes: the launcher forwards, and all ranks stop at the same step -------------


class _RecordingCheckpointer:
    """Writes, per rank, which checkpoint it was asked for."""

    def __init__(self, save_dir: str):
        self.save_dir = save_dir

    def save(self, name: str, iteration: int) -> None:
        Path(self.save_dir, f"{name}.rank{comm.get_rank()}").write_text(str(iteration))


class _ToyTrainer(TrainerBase):
    def __init__(self, out: str, self_signal_rank: int):
        super().__init__()
        self.out, self.self_signal_rank = out, self_signal_rank
        self.checkpointer = _RecordingCheckpointer(out)
        self.register_hooks(with_graceful_interrupt([]))

    def run_step(self) -> None:
        rank = comm.get_rank()
        if self.iter == 0:
            Path(self.out, f"pid{rank}").write_text(str(os.getpid()))
        if self.iter == 3 and rank == self.self_signal_rank:
            os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.02 * (1 + rank))  # the ranks run at different speeds


def toy_main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    _ToyTrainer(args.out, args.self_signal_rank).train(0, 100000)


def toy_launch(out: str, self_signal_rank: int) -> None:
    """What a tool does: launch_from_args(main, args), 2 gloo processes."""
    from bissl_det.runtime.launch import launch_from_args

    args = argparse.Namespace(num_gpus=2, num_machines=1, machine_rank=0, dist_url="auto")
    args.out, args.self_signal_rank = out, self_signal_rank
    launch_from_args(toy_main, args)


@pytest.mark.dist
@pytest.mark.parametrize("target", ["launcher", "one rank"])
def test_all_ranks_stop_at_the_same_step(tmp_path, target):
    self_signal_rank = 1 if target == "one rank" else -1
    code = f"from tests.reliability.test_signals import toy_launch; toy_launch({str(tmp_path)!r}, {self_signal_rank})"  # noqa: E501
    launcher = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=ENV, stderr=subprocess.PIPE, text=True
    )
    pid_files = [tmp_path / "pid0", tmp_path / "pid1"]
    deadline = time.monotonic() + 120
    while not all(p.exists() and p.read_text() for p in pid_files):
        assert launcher.poll() is None, launcher.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.05)
    if target == "launcher":
        time.sleep(0.3)
        launcher.send_signal(signal.SIGTERM)  # the scheduler signals the launcher only
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    saved = sorted(p.name for p in tmp_path.glob("model_*"))
    assert len(saved) == 2, saved
    assert saved[0].removesuffix(".rank0") == saved[1].removesuffix(".rank1"), saved
    if target == "one rank":
        assert saved[0] == "model_0000003.rank0"
    for p in pid_files:  # no worker outlives the launcher
        with pytest.raises(ProcessLookupError):
            os.kill(int(p.read_text()), 0)


# ---- tools/run_demo.py forwards signals to the tool it runs -------------------------------------

FAKE_TOOL = """
import os, signal, sys, time
from pathlib import Path
marker, mode = Path(sys.argv[1]), sys.argv[2]
def checkpoint_and_exit(signum, frame):
    marker.write_text(signal.Signals(signum).name)
    sys.exit(75)
if mode == "checkpoints":
    signal.signal(signal.SIGTERM, checkpoint_and_exit)
Path(f"{marker}.pid").write_text(str(os.getpid()))
while True:
    time.sleep(0.05)
"""


@pytest.mark.e2e  # a tool in another process
@pytest.mark.parametrize(("mode", "exit_code"), [("checkpoints", 75), ("dies", 128 + 15)])
def test_run_demo_forwards_sigterm_to_its_tool(tmp_path, mode, exit_code):
    marker = tmp_path / "marker"
    code = (
        "import sys; sys.path.insert(0, 'tools'); import run_demo; from pathlib import Path; "
        f"run_demo.run('slow', ['-c', {FAKE_TOOL!r}, {str(marker)!r}, {mode!r}], "
        f"Path({str(tmp_path / 'logs')!r}))"
    )
    demo = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=ENV, stderr=subprocess.PIPE, text=True
    )
    pid_file = Path(f"{marker}.pid")
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()):
        assert demo.poll() is None, demo.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    demo.send_signal(signal.SIGTERM)
    _, stderr = demo.communicate(timeout=60)
    assert demo.returncode == exit_code, stderr
    assert "slow interrupted by SIGTERM" in stderr
    if mode == "checkpoints":
        assert marker.read_text() == "SIGTERM"
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
