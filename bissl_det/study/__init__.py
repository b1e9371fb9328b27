"""Controlled studies of BiSSL (tools/study.py): arms, pairs, evaluation, paired statistics."""

from .config import load_study_config, study_defaults
from .plan import StudyPlan
from .report import collect, write_report
from .runs import Run, RunFailed, finished, run_all

__all__ = [
    "Run",
    "RunFailed",
    "StudyPlan",
    "collect",
    "finished",
    "load_study_config",
    "run_all",
    "study_defaults",
    "write_report",
]
