"""Hyper-parameter search as parallel Optuna trials on a shared journal file (tools/search.py)."""

from .objectives import SearchTask, search_task
from .run import SearchOptions, run_search, work, worker_devices
from .study import fail_stale_trials, open_study, run_trials

__all__ = [
    "SearchOptions",
    "SearchTask",
    "fail_stale_trials",
    "open_study",
    "run_search",
    "run_trials",
    "search_task",
    "work",
    "worker_devices",
]
