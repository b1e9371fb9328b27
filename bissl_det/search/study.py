"""An Optuna study on a shared journal file that many worker processes (or jobs) pull trials from.

Storage: ``optuna.storages.JournalStorage`` on a ``JournalFileBackend``. It is one append-only
file whose writers take a lock made by an atomic symlink/``open(O_EXCL)``, which NFS honours;
SQLite's byte-range locks are known to fail on NFS (corrupt databases), and an RDB server is one
more service to run on a cluster. Journal storage has no heartbeat, so trials of a worker that
died stay RUNNING: :func:`fail_stale_trials` marks those of dead local processes (and, when asked,
all RUNNING ones) FAIL before new work starts.

Budget: a trial counts once it is COMPLETE or PRUNED (PRUNED = diverged: a result, the worst
one); FAIL trials (errors, interrupts) do not count. Workers take the lock, count the trials
that are counted or RUNNING, and ask for a new one only if that is below the budget, so the study
never runs more than ``n_trials`` and a rerun only adds what is missing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import optuna
from optuna.distributions import FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import TrialState

from ..runtime.signals import interrupt_immediately

logger = logging.getLogger(__name__)

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
SAMPLERS = ("random", "tpe")

# objective(params, trial_number) -> value to maximise; FloatingPointError: the run diverged.
Objective = Callable[[dict[str, float], int], float]


def log_uniform_space(ranges: Mapping[str, tuple[float, float]]) -> dict[str, FloatDistribution]:
    """{name: (low, high)} -> log-uniform distributions; ``name`` is the config key (errors)."""
    space = {}
    for key, bounds in ranges.items():
        low, high = (float(b) for b in bounds)
        if not 0.0 < low < high:
            raise ValueError(f"{key} = {tuple(bounds)}: need 0 < low < high (log-uniform range)")
        space[key] = FloatDistribution(low, high, log=True)
    return space


def check_journal_file(path: Path) -> None:
    """Refuse a storage file that is not an Optuna journal (one JSON record per line).

    Optuna would fail on it with a bare JSONDecodeError, or append to someone else's file.
    """
    if not path.exists():
        return
    if not path.is_file():
        raise ValueError(f"search storage {path} is not a file")
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                break  # a record another worker is appending right now
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict) or "op_code" not in record:
                raise ValueError(
                    f"search storage {path} is not an Optuna journal file (line {number} is not "
                    "a journal record): give --storage a journal file of tools/search.py or a "
                    "new path"
                )


def open_study(storage_path: str | Path, study_name: str, sampler=None) -> optuna.Study:
    """Create or load (resume) ``study_name`` in the journal file ``storage_path``."""
    path = Path(storage_path)
    check_journal_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(path)))
    return optuna.create_study(
        study_name=study_name,
        storage=storage,
        sampler=sampler,
        direction="maximize",
        load_if_exists=True,
    )


def check_study_identity(study: optuna.Study, identity: Mapping[str, object]) -> None:
    """Record what the study searches on first use; refuse to mix other settings into it."""
    for key, value in identity.items():
        recorded = study.user_attrs.get(key)
        if recorded is None:
            study.set_user_attr(key, value)
        elif recorded != value:
            raise ValueError(
                f"study {study.study_name!r} was started with {key} = {recorded!r}, this run has "
                f"{value!r}: use another --study-name or --storage"
            )


def build_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """ "random" (the authors' random search) or "tpe" (constant liar: parallel-safe)."""
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    raise ValueError(f"--sampler {name!r}: use one of {SAMPLERS}")


def _owner() -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def fail_stale_trials(study: optuna.Study, all_running: bool = False) -> list[int]:
    """Mark FAIL the RUNNING trials of dead processes of this host (or every RUNNING trial).

    Only call ``all_running=True`` when no other worker of the study is alive.
    """
    host, failed = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("owner") or {}
        local_dead = owner.get("host") == host and not _process_alive(int(owner.get("pid", -1)))
        if all_running or local_dead:
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            failed.append(trial.number)
    if failed:
        logger.warning("Marked trials %s FAIL (interrupted earlier, not counted)", failed)
    return failed


def counted_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=COUNTED)


def _ask_within_budget(study, space, n_trials: int, lock) -> optuna.Trial | None:
    lock.acquire()
    try:
        taken = len(study.get_trials(deepcopy=False, states=(*COUNTED, TrialState.RUNNING)))
        if taken >= n_trials:
            return None
        trial = study.ask(space)
        trial.set_user_attr("owner", _owner())
        return trial
    finally:
        lock.release()


def run_trials(
    study: optuna.Study, space: dict, objective: Objective, n_trials: int, lock_path: str
) -> int:
    """Pull trials until the study holds ``n_trials`` counted or running ones; returns how many
    this process ran. A diverged run is PRUNED; any other error marks the trial FAIL and stops
    this worker (re-raised), as does SIGTERM/SIGINT/SIGUSR1 (TrainingInterrupted)."""
    lock = JournalFileOpenLock(lock_path)
    in_main_thread = threading.current_thread() is threading.main_thread()
    ran = 0
    with interrupt_immediately() if in_main_thread else contextlib.nullcontext():
        while (trial := _ask_within_budget(study, space, n_trials, lock)) is not None:
            ran += 1
            logger.info("trial %d: %s", trial.number, trial.params)
            try:
                value = objective(dict(trial.params), trial.number)
            except FloatingPointError as e:
                trial.set_user_attr("error", str(e))
                study.tell(trial, state=TrialState.PRUNED)
                logger.warning("trial %d diverged (PRUNED, the worst result): %s", trial.number, e)
                continue
            except BaseException as e:
                trial.set_user_attr("error", f"{type(e).__name__}: {e}")
                study.tell(trial, state=TrialState.FAIL)
                raise
            if not math.isfinite(value):  # Optuna would mark it FAIL and run another
                trial.set_user_attr("error", f"objective is {value}")
                study.tell(trial, state=TrialState.PRUNED)
                continue
            study.tell(trial, value)
            logger.info("trial %d: value %.4g", trial.number, value)
    return ran
