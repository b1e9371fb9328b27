"""Runs in the results files of every tool, for aggregation and comparison.

* ``cls_results.json`` of tools/eval_cls.py holds one run per evaluation seed under
  ``"per_seed"`` (``{"seed", "metrics"}``), next to their mean and std: each is a run here.
* Every other results.json (finetune_det, train_bissl, pretrain_ssl) is one run; its numeric
  leaves are its metrics and its seed is ``provenance.seed``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .stats import flatten_metrics

__all__ = ["Run", "read_runs", "runs_of"]


@dataclass(frozen=True)
class Run:
    """One trained model's metrics; ``seed`` pairs it with a run of another group."""

    path: str
    seed: int | None
    metrics: dict[str, float]


def runs_of(path: str | Path, record: Mapping) -> list[Run]:
    """The runs of one results record (see the module docstring)."""
    per_seed = record.get("per_seed")
    if isinstance(per_seed, list):
        if not per_seed:
            raise ValueError(f"{path}: 'per_seed' is empty")
        return [
            Run(str(path), entry.get("seed"), flatten_metrics(entry["metrics"]))
            for entry in per_seed
        ]
    seed = record.get("provenance", {}).get("seed")
    return [Run(str(path), seed, flatten_metrics(record))]


def read_runs(path: str | Path) -> tuple[dict, list[Run]]:
    """(the record, its runs) of a results file; errors name the file."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: a results file holds a JSON object, not {type(record).__name__}")
    return record, runs_of(path, record)
