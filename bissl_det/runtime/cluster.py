"""Run any tool as a (Slurm) cluster job through submitit, requeued with ``--resume``.

One submitit task per node: it starts the tool as a subprocess with ``--num-gpus G
--num-machines N --machine-rank <node> --dist-url tcp://<node 0>:<port>``, and the tool's own
launcher (``bissl_det.runtime.launch``) starts the G processes of that node. So a cluster run is
exactly the manual multi-machine run (docs/pipeline.md), the launcher forwards signals to its
workers, and the same path runs on CPU (gloo) for tests. One task per GPU would need a
second, submitit-specific process-group set-up next to the launcher.

Signals, in the order they act:

1. Before the time limit, and on preemption, Slurm sends submitit's signal (SIGUSR2, from
   ``--signal=USR2@<signal delay>``) to every process of the job step: the submitit task,
   the tool's launcher, its workers and their data-loader workers. On node 0, submitit calls
   :meth:`ToolJob.checkpoint`: it sends SIGUSR1 to the tool, whose launcher forwards it to
   the workers; they (which got the SIGUSR2 themselves too) stop together after the current
   step, write ``model_<iter>.pth`` and exit with 75 (``bissl_det.runtime.signals``); loader
   workers ignore the signals (``bissl_det.utils.preemption``). ``checkpoint`` waits for that
   (at most the signal delay minus a margin), then returns this job with ``--resume`` added,
   and submitit requeues it. Other nodes' tasks do nothing: every worker stops at the step
   all of them agree on.
2. SIGTERM and SIGCONT to a task are only logged by submitit (it waits for its own signal);
   the tool processes stop cleanly on a SIGTERM that reaches them too, and a SIGTERM after
   the SIGUSR2 changes nothing (the first signal's checkpoint is written).
3. A requeued job starts the tool again with ``--resume``: it continues from that checkpoint.

Keep ``SUBMITIT_PREEMPT_SIGNAL`` unset: submitit's SIGUSR2 is also one the tools handle.

Resources (:func:`default_resources`): one task per node gets ``--cpus-per-task`` = GPUs per
node x (loader workers per process + 1) and ``--mem`` = GPUs per node x (MEM_GB_PER_PROCESS +
MEM_GB_PER_LOADER_WORKER x loader workers), the loader workers read from the config;
``tools/submit.py --cpus-per-task / --mem`` override them.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

from ..utils.preemption import EXIT_INTERRUPTED

REPO_ROOT = Path(__file__).resolve().parents[2]
# Tools with detectron2's launch flags (--num-gpus ... --dist-url) and --resume.
DISTRIBUTED_TOOLS = ("train_bissl", "finetune_det", "pretrain_ssl")
STOP_SIGNAL = signal.SIGUSR1  # the tools' "stop at the next step" signal
RESERVED_FLAGS = ("--num-gpus", "--num-machines", "--machine-rank", "--dist-url")

logger = logging.getLogger(__name__)


def tool_path(tool: str) -> Path:
    """tools/<tool>.py; an unknown name is an error naming the tools that exist."""
    path = REPO_ROOT / "tools" / f"{tool.removesuffix('.py')}.py"
    if not path.is_file():
        known = sorted(p.stem for p in (REPO_ROOT / "tools").glob("*.py") if p.stem[0] != "_")
        raise ValueError(f"unknown tool {tool!r}: one of {known}")
    return path


# Rendezvous ports: below Linux's ephemeral range (32768-60999, which the OS hands out to
# outgoing connections, so a port there may be taken at any time), above the common services
# (< 10000), and away from torchrun's default 29500.
PORT_BASE, PORT_SPAN = 17000, 10000
# Memory per node (GB) per training process and per data-loader worker of it.
MEM_GB_PER_PROCESS = 8
MEM_GB_PER_LOADER_WORKER = 2


def job_port(job_id: str, base: int = PORT_BASE, span: int = PORT_SPAN) -> int:
    """A rendezvous port from the job id (17000-26999): two jobs sharing node 0 do not pick the
    same one, and none falls in the ephemeral range."""
    number = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return base + number % span


def _exit_code(process: subprocess.Popen) -> int | None:
    """The process's exit code once it has ended, else None.

    Not ``Popen.poll()``: :meth:`ToolJob.checkpoint` runs in submitit's signal handler, which
    interrupts ``Popen.wait()`` in :meth:`ToolJob.__call__`; ``wait()`` holds the lock that
    ``poll()`` needs, and ``poll()`` then answers None even for a child that has exited (each
    preempted job waited out the whole grace period).
    """
    if process.returncode is None:
        try:
            pid, status = os.waitpid(process.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere: its code is in returncode, if anywhere
            return process.returncode
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode


class ToolJob:
    """The submitted callable: one tool on one node, requeued with ``--resume`` on preemption.

    Args:
        tool: Name in tools/ (``train_bissl``, ``finetune_det``, ...).
        tool_args: The tool's own arguments (without the launch flags, which come from the job).
        gpus_per_node: Processes the tool's launcher starts on each node (``--num-gpus``).
        workdir: Directory the tool runs in (relative config and data paths resolve there).
        port: Rendezvous port of node 0; None derives one from the job id.
        stop_grace_s: How long :meth:`checkpoint` waits for the tool to stop by itself.
    """

    def __init__(
        self,
        tool: str,
        tool_args: list[str],
        gpus_per_node: int = 1,
        workdir: str | None = None,
        port: int | None = None,
        stop_grace_s: float = 100.0,
    ):
        self.tool = tool_path(tool).stem
        reserved = [a for a in tool_args if a.split("=")[0] in RESERVED_FLAGS]
        if reserved:
            raise ValueError(f"{reserved}: set by the job (use --nodes / --gpus-per-node)")
        self.tool_args = list(tool_args)
        self.gpus_per_node = gpus_per_node
        self.workdir = workdir or os.getcwd()
        self.port, self.stop_grace_s = port, stop_grace_s
        self._process: subprocess.Popen | None = None

    def command(self, num_nodes: int, node: int, master: str, job_id: str) -> list[str]:
        """The tool's command line on ``node`` of ``num_nodes`` (node 0's host: ``master``)."""
        command = [sys.executable, str(tool_path(self.tool))]
        if self.tool in DISTRIBUTED_TOOLS:
            port = self.port or job_port(job_id)
            command += ["--num-gpus", str(self.gpus_per_node), "--num-machines", str(num_nodes)]
            command += ["--machine-rank", str(node), "--dist-url", f"tcp://{master}:{port}"]
        elif num_nodes > 1 or self.gpus_per_node > 1:
            raise ValueError(f"tools/{self.tool}.py runs in one process: use 1 node x 1 GPU")
        return command + self.tool_args

    def __call__(self) -> int:
        import submitit

        env = submitit.JobEnvironment()
        command = self.command(env.num_nodes, env.node, env.hostnames[0], str(env.job_id))
        logger.info("node %d/%d: %s", env.node, env.num_nodes, " ".join(command))
        print(f"[submit] node {env.node}/{env.num_nodes}: {' '.join(command)}", flush=True)
        self._process = subprocess.Popen(command, cwd=self.workdir)
        code = self._process.wait()
        if code == EXIT_INTERRUPTED:
            raise RuntimeError(
                f"tools/{self.tool}.py was interrupted (exit {code}) without submitit's requeue "
                "signal: resubmit the same command with --resume"
            )
        if code != 0:
            raise RuntimeError(f"tools/{self.tool}.py failed with exit code {code}")
        return code

    def stop_tool(self) -> int | None:
        """SIGUSR1 to the running tool; wait for it to checkpoint and exit. Its exit code."""
        process = self._process
        if process is None or _exit_code(process) is not None:
            return None if process is None else process.returncode
        process.send_signal(STOP_SIGNAL)
        deadline = time.monotonic() + self.stop_grace_s
        while _exit_code(process) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if _exit_code(process) is None:
            print("[submit] the tool did not stop in time: resuming from its last checkpoint")
        return process.returncode

    def resumed(self) -> ToolJob:
        """The same job, continuing from the tool's last checkpoint."""
        args = self.tool_args
        if self.tool in DISTRIBUTED_TOOLS and "--resume" not in args:
            args = ["--resume", *args]  # before the KEY VALUE overrides
        return ToolJob(
            self.tool, args, self.gpus_per_node, self.workdir, self.port, self.stop_grace_s
        )

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's requeue hook (node 0, on its signal): stop the tool, requeue resumed."""
        import submitit

        code = self.stop_tool()
        print(f"[submit] tool stopped (exit {code}); requeueing with --resume", flush=True)
        return submitit.helpers.DelayedSubmission(self.resumed())

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_process"] = None  # a process handle does not travel to the requeued job
        return state


def loader_workers(cfg, tool: str) -> int:
    """Data-loader worker processes per training process of ``tool`` with ``cfg``."""
    pretext = cfg.BISSL.PRETEXT_DATA.NUM_WORKERS
    downstream = cfg.DATALOADER.NUM_WORKERS if cfg.DATASETS.TRAIN else cfg.CLS.NUM_WORKERS
    per_tool = {
        "train_bissl": pretext + downstream,  # both levels' loaders run at once
        "pretrain_ssl": pretext,
        "finetune_det": cfg.DATALOADER.NUM_WORKERS,
        "eval_cls": cfg.CLS.NUM_WORKERS,
    }
    return per_tool.get(tool, 0)


def default_resources(gpus_per_node: int, workers_per_process: int) -> dict[str, int]:
    """``cpus_per_task`` and ``mem_gb`` of one task per node running ``gpus_per_node``
    processes with ``workers_per_process`` loader workers each."""
    return {
        "cpus_per_task": gpus_per_node * (workers_per_process + 1),
        "mem_gb": gpus_per_node
        * (MEM_GB_PER_PROCESS + MEM_GB_PER_LOADER_WORKER * workers_per_process),
    }


def build_executor(
    job_dir: str,
    nodes: int,
    gpus_per_node: int,
    timeout_min: int,
    cluster: str | None = None,
    partition: str | None = None,
    cpus_per_task: int | None = None,
    mem_gb: int | None = None,
    account: str | None = None,
    qos: str | None = None,
    signal_delay_s: int = 120,
    name: str = "bissl_det",
):
    """submitit's AutoExecutor (Slurm where ``sbatch`` exists, else local), one task per node."""
    import submitit

    executor = submitit.AutoExecutor(folder=job_dir, cluster=cluster)
    params: dict[str, Any] = {
        "nodes": nodes,
        "tasks_per_node": 1,
        "gpus_per_node": gpus_per_node,
        "timeout_min": timeout_min,
        "name": name,
        "slurm_signal_delay_s": signal_delay_s,
    }
    optional = {
        "cpus_per_task": cpus_per_task,
        "mem_gb": mem_gb,
        "slurm_partition": partition,
        "slurm_account": account,
        "slurm_qos": qos,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    executor.update_parameters(**params)
    return executor
