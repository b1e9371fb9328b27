"""tools/submit.py: launch flags from the job, requeue with --resume, a real local submitit run
that is preempted (submitit's SIGUSR2) mid-training and resumes to the end."""

from __future__ import annotations

import json
import os
import pickle
import signal
import time
from pathlib import Path

from bissl_det.runtime.cluster import ToolJob, job_port
from tests.helpers import CONFIGS, NARROW_RESNET
from tools.submit import main as submit_main

import pytest

TINY_PRETRAIN = [
    "--config-file", str(CONFIGS / "quick" / "pretrain_simclr_demo.yaml"), *NARROW_RESNET,
    "MODEL.SIMCLR.PROJECTOR_DIMS", "[32, 16]", "BISSL.PRETEXT_DATA.AUG.CROP_SIZE", "32",
    "PRETRAIN.IMS_PER_BATCH", "8", "PRETRAIN.WARMUP_STEPS", "1", "PRETRAIN.LOG_PERIOD", "1",
]  # fmt: skip


def test_launch_flags_come_from_the_job():
    job = ToolJob("train_bissl", ["--config-file", "c.yaml", "SEED", "1"], gpus_per_node=8)
    command = job.command(num_nodes=2, node=1, master="node-a", job_id="4242")
    assert command[2:] == [
        "--num-gpus", "8", "--num-machines", "2", "--machine-rank", "1",
        "--dist-url", f"tcp://node-a:{job_port('4242')}", "--config-file", "c.yaml", "SEED", "1",
    ]  # fmt: skip
    assert command[1].endswith("tools/train_bissl.py")
    assert job_port("4242") == 17000 + 4242 and job_port("abc") == job_port("abc")
    ports = [job_port(str(n)) for n in range(0, 100000, 7)] + [job_port("x" * 9)]
    # Outside Linux's ephemeral ports (32768-60999), above the common services.
    assert all(10000 < port < 32768 and port != 29500 for port in ports)


def test_requeued_job_resumes_once_and_pickles_without_its_process():
    job = ToolJob("finetune_det", ["--config-file", "c.yaml", "SEED", "1"], gpus_per_node=2)
    job._process = object()  # a running tool's handle
    again = job.resumed().resumed()
    assert again.tool_args == ["--resume", "--config-file", "c.yaml", "SEED", "1"]
    assert again.gpus_per_node == 2 and again.workdir == job.workdir
    restored = pickle.loads(pickle.dumps(job))
    assert restored._process is None and restored.tool_args == job.tool_args
    # Tools without --resume are rerun as they were.
    assert ToolJob("compare_runs", ["--out", "x"]).resumed().tool_args == ["--out", "x"]


def test_bad_requests_are_named():
    with pytest.raises(ValueError, match="unknown tool 'train_bisl'"):
        ToolJob("train_bisl", [])
    with pytest.raises(ValueError, match="set by the job"):
        ToolJob("train_bissl", ["--num-gpus", "2"])
    with pytest.raises(ValueError, match="runs in one process"):
        ToolJob("compare_runs", []).command(2, 0, "h", "1")
    with pytest.raises(SystemExit, match="--nodes 0"):
        submit_main(["train_bissl", "--nodes", "0"])


def _task_pids(job_dir: Path) -> list[int]:
    """PIDs of the submitit task processes (python -m submitit.core._submit <job_dir>)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmdline and str(job_dir).encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)


@pytest.mark.slow
def test_local_job_is_preempted_requeued_and_resumes(in_demo_workdir, tmp_path):
    out, jobs, iters = tmp_path / "run", tmp_path / "jobs", 60
    job = submit_main(
        ["pretrain_ssl", *TINY_PRETRAIN, "PRETRAIN.ITERS", str(iters), "OUTPUT_DIR", str(out),
         "--cluster", "local", "--job-dir", str(jobs), "--time", "20"]
    )  # fmt: skip
    metrics = out / "metrics.json"
    _wait_for(
        lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3,
        300,
        "the job did not start training",
    )
    pids = _task_pids(jobs)
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGUSR2)  # what Slurm sends before a time limit / on preemption
    assert job.result() == 0  # the requeued job finished
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == iters
    assert "--resume" in results["provenance"]["command"]
    log = (out / "log.txt").read_text()
    assert "Resuming pretraining at step" in log
    job_log = next(jobs.glob("*_0_log.out")).read_text()
    assert "requeueing with --resume" in job_log
    # The job saw the tool stop (not the end of its grace period) and requeued at once.
    assert "tool stopped (exit 75)" in job_log and "did not stop in time" not in job_log
    # The interruption checkpointed a step before the end; the resumed run reached the end.
    steps = [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()]
    assert steps[-1] == iters - 1 and min(steps) == 0


# ---- Checked here, with the resources it needs, before anything is submitted -------------------

TINY_BISSL = ["--config-file", str(CONFIGS / "quick" / "test_tiny_C4.yaml")]


def _fake_slurm(bin_dir: Path, monkeypatch) -> None:
    """``srun`` and ``sbatch`` on PATH: submitit writes the real sbatch file, nothing runs."""
    bin_dir.mkdir()
    for name, body in (("srun", "exit 0"), ("sbatch", 'echo "Submitted batch job 4242"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def _sbatch_lines(jobs: Path) -> list[str]:
    (script,) = jobs.rglob("*submission.sh")
    return [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]


@pytest.mark.parametrize("flags", [[], ["--skip-data-check"]], ids=["full", "values only"])
def test_bad_config_exits_naming_the_key_and_submits_nothing(tmp_path, monkeypatch, flags):
    _fake_slurm(tmp_path / "bin", monkeypatch)
    jobs = tmp_path / "jobs"
    argv = [
        "train_bissl",
        *TINY_BISSL,
        "BISSL.HYPERGRAD.CURVATURE",
        "hesian",
        "--job-dir",
        str(jobs),
    ]
    with pytest.raises(SystemExit, match="nothing was submitted") as err:
        submit_main([*argv, "--cluster", "slurm", *flags])
    assert "BISSL.HYPERGRAD.CURVATURE" in str(err.value) and "hesian" in str(err.value)
    assert not jobs.exists() or not any(jobs.rglob("*"))


def test_batch_sizes_are_checked_for_the_jobs_processes(in_demo_workdir, tmp_path, monkeypatch):
    _fake_slurm(tmp_path / "bin", monkeypatch)
    jobs = tmp_path / "jobs"
    argv = ["train_bissl", *TINY_BISSL, "--gpus-per-node", "3", "--job-dir", str(jobs)]
    with pytest.raises(SystemExit, match="BISSL.LOWER.IMS_PER_BATCH = 8 is not a multiple of 3"):
        submit_main([*argv, "--cluster", "slurm"])
    assert not jobs.exists() or not any(jobs.rglob("*"))


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("flags", "cpus", "mem"),
    [([], 2 * (5 + 1), 2 * (8 + 2 * 5)), (["--cpus-per-task", "7", "--mem", "99"], 7, 99)],
    ids=["defaults", "overridden"],
)
def test_sbatch_file_carries_cpus_and_memory(
    in_demo_workdir, tmp_path, monkeypatch, flags, cpus, mem
):
    _fake_slurm(tmp_path / "bin", monkeypatch)
    jobs = tmp_path / "jobs"
    workers = ["DATALOADER.NUM_WORKERS", "2", "BISSL.PRETEXT_DATA.NUM_WORKERS", "3"]
    workers += ["BISSL.UPPER.IMS_PER_BATCH", "4"]  # a multiple of 2 nodes x 2 GPUs
    job = submit_main(
        ["train_bissl", *TINY_BISSL, *workers, "--gpus-per-node", "2", "--nodes", "2",
         "--cluster", "slurm", "--job-dir", str(jobs), *flags]
    )  # fmt: skip
    assert job.job_id == "4242"
    lines = _sbatch_lines(jobs)
    assert f"#SBATCH --cpus-per-task={cpus}" in lines
    assert f"#SBATCH --mem={mem}GB" in lines
    assert "#SBATCH --nodes=2" in lines and "#SBATCH --ntasks-per-node=1" in lines
    assert "#SBATCH --gpus-per-node=2" in lines and "#SBATCH --signal=USR2@180" in lines


def test_local_executor_takes_the_same_parameters(tmp_path):
    from bissl_det.runtime.cluster import build_executor, default_resources

    resources = default_resources(gpus_per_node=1, workers_per_process=4)
    assert resources == {"cpus_per_task": 5, "mem_gb": 16}
    executor = build_executor(str(tmp_path), 1, 1, 10, cluster="local", **resources)
    assert executor._executor.parameters["cpus_per_task"] == 5
    assert executor._executor.parameters["mem_gb"] == 16
