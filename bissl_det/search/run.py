"""Run a search: worker processes (one per GPU) or separate jobs pulling trials of one study.

``run_search(cfg, options)`` with ``options.workers`` = N starts N processes, worker k seeing
only GPU k (CUDA_VISIBLE_DEVICES); with 1 it works in this process, which is also how separate
jobs (Slurm array tasks) join one study: same ``--study-name`` and ``--storage``, ``--workers 1``
and its own OUTPUT_DIR each (the run lock allows one run per folder; every job's report shows the
whole study). Rerunning the command resumes the study: completed trials are kept, interrupted
ones are marked FAIL and replaced, and the budget ``options.trials`` may grow.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.utils.logger import setup_logger

from ..data.detection import register_from_config
from ..runtime.logs import LOGGERS, use_colour
from ..runtime.run_identity import identity_keys
from ..runtime.signals import INTERRUPT_SIGNALS, TrainingInterrupted, handling, signal_name
from .objectives import SearchTask, build_objective, search_task
from .report import write_search_report
from .study import (
    build_sampler,
    check_study_identity,
    counted_trials,
    fail_stale_trials,
    log_uniform_space,
    open_study,
    run_trials,
)

logger = logging.getLogger(__name__)

STORAGE_FILE = "search.journal"


@dataclass(frozen=True)
class SearchOptions:
    """What tools/search.py's flags set; ``storage`` "" means OUTPUT_DIR/search.journal."""

    trials: int
    study_name: str
    workers: int = 1
    storage: str = ""
    sampler: str = "random"
    linear_probe: bool = False
    fail_running: bool = False


def storage_path(cfg: CfgNode, options: SearchOptions) -> Path:
    return Path(options.storage or Path(cfg.OUTPUT_DIR) / STORAGE_FILE)


def worker_devices(num_workers: int) -> list[str | None]:
    """One visible GPU per worker (its CUDA_VISIBLE_DEVICES), or None for CPU workers."""
    if not torch.cuda.is_available():
        return [None] * num_workers
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d for d in visible.split(",") if d] if visible else None
    ids = ids or [str(i) for i in range(torch.cuda.device_count())]
    if num_workers > len(ids):
        raise ValueError(
            f"--workers {num_workers}: only {len(ids)} GPU(s) visible ({','.join(ids)}); "
            "a trial runs on one device"
        )
    return ids[:num_workers]


# What a trial trains on and how long: a study continued with other values would mix trials.
STUDY_DATA = ("DATASETS.TRAIN", "CLS.FORMAT", "CLS.TRAIN_ROOT", "CLS.CLASSES")
STUDY_SCHEDULE = (
    "SOLVER.MAX_ITER",
    "SOLVER.STEPS",
    "SOLVER.WARMUP_ITERS",
    "SOLVER.IMS_PER_BATCH",
    "INPUT.MIN_SIZE_TRAIN",
    "CLS.SOLVER.ITERS",
    "CLS.SOLVER.EPOCHS",
    "CLS.SOLVER.IMS_PER_BATCH",
    "CLS.IMAGE_SIZE",
    "CLS.SEARCH.VAL_FRACTION",
    "DET_SEARCH.VAL_FRACTION",
)


def _identity(cfg: CfgNode, task: SearchTask, options: SearchOptions) -> dict:
    values = identity_keys(cfg)
    data = {k: values[k] for k in STUDY_DATA if k in values}
    data["DATASETS.CUSTOM"] = [  # the training sets' definitions (folders, files, classes)
        entry for entry in values.get("DATASETS.CUSTOM", []) if entry["NAME"] in cfg.DATASETS.TRAIN
    ]
    return {
        "task": task.name,
        "metric": task.metric,
        "ranges": {k: list(v) for k, v in task.ranges.items()},
        "protocol": "linear_probe" if options.linear_probe else "finetune",
        "weights": cfg.MODEL.WEIGHTS,
        "seed": cfg.SEED,
        "data": data,
        "schedule": {k: values[k] for k in STUDY_SCHEDULE if k in values},
    }


def work(cfg: CfgNode, options: SearchOptions, worker_index: int = 0) -> int:
    """One worker: build the objective, pull trials until the budget is met; returns trials run."""
    task = search_task(cfg)
    storage = storage_path(cfg, options)
    probe = open_study(storage, options.study_name)
    # Distinct streams per worker and per resume, reproducible for one worker.
    seed = np.random.SeedSequence([max(cfg.SEED, 0), worker_index, len(probe.trials)])
    study = open_study(
        storage, options.study_name, build_sampler(options.sampler, int(seed.generate_state(1)[0]))
    )
    objective = build_objective(cfg, task, options.linear_probe)
    if "validation_split" not in study.user_attrs:
        study.set_user_attr("validation_split", objective.split_sizes)
    space = log_uniform_space(task.ranges)
    return run_trials(study, space, objective, options.trials, f"{storage}.ask")


def _worker_process(
    index: int, device: str | None, threads: int, cfg: CfgNode, options: SearchOptions
) -> None:
    if device is not None:  # before anything initialises CUDA in this fresh process
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    elif "OMP_NUM_THREADS" not in os.environ:  # CPU workers share the cores
        torch.set_num_threads(threads)
    log_file = str(Path(cfg.OUTPUT_DIR) / f"log_worker{index}.txt")
    for name in LOGGERS:
        setup_logger(log_file, distributed_rank=0, color=use_colour(), name=name)
    register_from_config(cfg)  # this process's catalog knows only the built-in datasets
    logger.info("search worker %d on %s", index, f"GPU {device}" if device else "CPU")
    work(cfg, options, index)


def _run_worker_processes(cfg: CfgNode, options: SearchOptions) -> None:
    devices = worker_devices(options.workers)
    threads = max(1, (os.cpu_count() or 1) // options.workers)
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(
            target=_worker_process, args=(k, device, threads, cfg, options), name=f"search-{k}"
        )
        for k, device in enumerate(devices)
    ]
    for p in procs:
        p.start()

    received = []

    def forward(signum, frame):  # e.g. a preempted job: every worker marks its trial FAIL
        received.append(signal_name(signum))
        if signum != signal.SIGINT:  # a terminal's Ctrl-C reaches the workers by itself
            for p in procs:
                if p.is_alive():
                    p.terminate()

    with handling(INTERRUPT_SIGNALS, forward):
        for p in procs:
            p.join()
    if received:
        raise TrainingInterrupted(
            f"search interrupted by {received[0]}: running trials are marked FAIL; rerun the "
            "same command to resume the study"
        )
    failed = {p.name: p.exitcode for p in procs if p.exitcode != 0}
    if failed:
        raise RuntimeError(
            f"search workers failed (exit codes {failed}): see {cfg.OUTPUT_DIR}/log_worker*.txt"
        )


def run_search(cfg: CfgNode, options: SearchOptions) -> dict:
    """Run (or resume) the study to ``options.trials`` counted trials; write and return the
    report (OUTPUT_DIR/search_results.json) and best_config.yaml."""
    if options.trials < 1:
        raise ValueError(f"--trials {options.trials}: need at least 1")
    if options.workers < 1:
        raise ValueError(f"--workers {options.workers}: need at least 1")
    if not options.study_name:
        raise ValueError("--study-name is empty")
    task = search_task(cfg)
    storage = storage_path(cfg, options)
    study = open_study(storage, options.study_name)
    check_study_identity(study, _identity(cfg, task, options))
    fail_stale_trials(study, all_running=options.fail_running)
    logger.info(
        "study %r in %s: %d of %d trials counted; %d worker(s)",
        options.study_name,
        storage,
        len(counted_trials(study)),
        options.trials,
        options.workers,
    )
    try:
        if options.workers == 1:
            work(cfg, options)
        else:
            _run_worker_processes(cfg, options)
    finally:  # also after a failure: the report shows what is done
        report = write_search_report(
            cfg,
            study,
            task,
            n_trials=options.trials,
            storage=storage,
            split_sizes=study.user_attrs.get("validation_split"),
            linear_probe=options.linear_probe,
        )
    best = report["best"]
    logger.info(
        "best of %d counted trials: %s (validation %s %s %%); test it with: %s",
        report["n_counted"],
        best and best["params"],
        task.metric,
        best and f"{best['value']:.2f}",
        best and best["test_step"],
    )
    return report
