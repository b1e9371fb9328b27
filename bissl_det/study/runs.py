"""The runs of a study, and running them once: each a tool of tools/ as a subprocess.

A run is finished when its folder holds ``study_run.json``, written only after the tool exited 0:
the tool's arguments, the sha256 of every input file (the backbone it starts from, its config
files) and of its product (the file it exists to make). A rerun of the study skips a run whose
record matches all of these today, and whose product's provenance (results files) names the
same weights; anything else (a killed run leaves no record, a changed config or backbone) is run
again: a killed run of the same command resumes from its checkpoint (the tools that can), any
other folder is moved aside first. Runs of one phase are independent and may run in parallel
(``jobs``).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint.io import atomic_write_text
from ..utils.distributed import cores_each
from ..utils.provenance import sha256_file, utc_now

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
RECORD = "study_run.json"
STARTED = "study_run_started.json"
LAUNCH_LOG = "launches.log"
# Tools that continue from their last checkpoint when a killed run is started again.
RESUMABLE = ("pretrain_ssl", "train_bissl", "finetune_det")


@dataclass
class Run:
    """One tool invocation of the study.

    Attributes:
        key: Unique name, e.g. "bissl/control/pair_0".
        tool: Name of a script in tools/.
        args: The tool's arguments (without OUTPUT_DIR, which is ``output_dir``).
        output_dir: The run's OUTPUT_DIR.
        product: File name in ``output_dir`` the run exists to make.
        inputs: Files whose content the run depends on (weights, configs).
        phase: Runs of a phase start after every run of the earlier phases finished.
        weights: The input that is the run's MODEL.WEIGHTS (checked against its provenance).
    """

    key: str
    tool: str
    args: list[str]
    output_dir: Path
    product: str
    inputs: list[str] = field(default_factory=list)
    phase: int = 0
    weights: str = ""

    @property
    def product_path(self) -> Path:
        return self.output_dir / self.product

    def tool_args(self) -> list[str]:
        resume = ["--resume"] if self.tool in RESUMABLE else []
        return [*resume, *self.args, "OUTPUT_DIR", str(self.output_dir)]

    def command(self, submit_args: Sequence[str] | None = None) -> list[str]:
        """The command line: the tool itself, or tools/submit.py waiting for its job."""
        if submit_args is None:
            return [sys.executable, str(REPO_ROOT / "tools" / f"{self.tool}.py"), *self.tool_args()]
        submit = [sys.executable, str(REPO_ROOT / "tools" / "submit.py"), self.tool, "--wait"]
        return [*submit, *submit_args, *self.tool_args()]


def _input_hashes(run: Run) -> dict[str, str | None]:
    return {path: sha256_file(path) for path in run.inputs}


def finished(run: Run) -> dict | None:
    """The run's record if it finished with today's arguments, inputs and product; else None."""
    path = run.output_dir / RECORD
    if not path.is_file() or not run.product_path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if record.get("tool") != run.tool or record.get("args") != run.tool_args():
        return None
    if record.get("inputs") != _input_hashes(run):
        return None
    if record.get("product_sha256") != sha256_file(run.product_path):
        return None
    if run.weights and run.product.endswith(".json"):
        # The result's own provenance must name the backbone this study gives it today.
        provenance = json.loads(run.product_path.read_text()).get("provenance", {})
        if provenance.get("weights", {}).get("sha256") != sha256_file(run.weights):
            return None
    return record


class RunFailed(RuntimeError):
    """A tool exited non-zero (the message names the run and its log)."""


def threads_per_run(jobs: int) -> dict[str, str]:
    """The environment for ``jobs`` runs side by side on this machine: each gets its share of
    the cores (torch gives every process all of them, and OpenMP threads beyond the cores spin:
    measured a third of the CPU time in the kernel, stages 2-3x slower with 2 jobs on 2 cores).
    ``OMP_NUM_THREADS`` set by the user stands."""
    threads = cores_each(jobs)
    return dict(os.environ) if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}


def launch(
    run: Run,
    study_dir: Path,
    submit_args: Sequence[str] | None = None,
    env: dict[str, str] | None = None,
) -> dict:
    """Run the tool (in ``env``, default this process's), wait, and write the record (only on
    success). Returns the record."""
    _clear_other_runs(run)
    run.output_dir.mkdir(parents=True, exist_ok=True)
    started = {"tool": run.tool, "args": run.tool_args(), "inputs": _input_hashes(run)}
    atomic_write_text(json.dumps(started, indent=2) + "\n", run.output_dir / STARTED)
    command = run.command(submit_args)
    log_path = run.output_dir / "study_tool.log"
    with _LAUNCH_LOCK, open(study_dir / LAUNCH_LOG, "a") as f:
        f.write(f"{utc_now()}\t{run.key}\t{' '.join(command)}\n")
    logger.info("study: running %s (log %s)", run.key, log_path)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd(), env=env
        )
        # wait4: this child's CPU time (and that of the processes it waited for: its workers).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(True)[-15:])
        raise RunFailed(
            f"study run {run.key} failed (exit {proc.returncode}): {' '.join(command)}\n"
            f"log {log_path}, last lines:\n{tail}"
        )
    if not run.product_path.is_file():
        raise RunFailed(f"study run {run.key} exited 0 but wrote no {run.product_path}")
    record = {
        "tool": run.tool,
        "args": run.tool_args(),
        "command": command,
        "inputs": _input_hashes(run),
        "product": str(run.product_path),
        "product_sha256": sha256_file(run.product_path),
        # Under --submit these are the waiting submit.py's, not the job's: wall time only.
        "cpu_s": None if submit_args is not None else usage.ru_utime + usage.ru_stime,
        "wall_s": wall,
        "finished": utc_now(),
    }
    atomic_write_text(json.dumps(record, indent=2) + "\n", run.output_dir / RECORD)
    return record


_LAUNCH_LOCK = threading.Lock()


def _clear_other_runs(run: Run) -> None:
    """Keep a killed start of this very run (its tool resumes from its checkpoint); move the
    folder of anything else (a finished run with other inputs, another command) aside."""
    folder = run.output_dir
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    (folder / RECORD).unlink(missing_ok=True)
    try:
        started = json.loads((folder / STARTED).read_text())
    except (OSError, json.JSONDecodeError):
        started = None
    same = started == {"tool": run.tool, "args": run.tool_args(), "inputs": _input_hashes(run)}
    if same and run.tool in RESUMABLE:
        return
    stale = folder.with_name(f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    logger.warning("study: %s holds another run; moved to %s", folder, stale)
    folder.rename(stale)


def run_all(
    runs: Sequence[Run],
    study_dir: Path,
    jobs: int = 1,
    submit: Callable[[Run], Sequence[str]] | None = None,
    on_done: Callable[[Run, dict, bool], None] | None = None,
) -> dict[str, dict]:
    """Every run not yet finished, phase by phase; returns {key: record}.

    ``submit``: a run's tools/submit.py arguments (each run a job); None runs the tools here.

    Raises:
        RunFailed: the first failed run of a phase (after the phase's other runs ended).
    """
    records: dict[str, dict] = {}
    study_dir.mkdir(parents=True, exist_ok=True)
    for phase in sorted({r.phase for r in runs}):
        todo = []
        for run in (r for r in runs if r.phase == phase):
            record = finished(run)
            if record is None:
                todo.append(run)
            else:
                records[run.key] = record
                if on_done:
                    on_done(run, record, False)
        env = None if submit else threads_per_run(min(jobs, len(todo)))
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = {
                pool.submit(launch, run, study_dir, submit(run) if submit else None, env): run
                for run in todo
            }
            errors = []
            for future, run in futures.items():
                try:
                    records[run.key] = future.result()
                    if on_done:
                        on_done(run, records[run.key], True)
                except RunFailed as e:
                    errors.append(e)
        if errors:
            raise errors[0]
    return records
