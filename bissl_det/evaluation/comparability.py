"""Which results may be averaged or compared: the provenance check of aggregate_seeds/compare_runs.

Seeds of one experiment differ only in their seed. Within a group (the files averaged
together) every results file must therefore agree on

* the tool that wrote it, and its config: every value but SEED, paths of the run and
  settings that do not change results (:data:`IGNORED_CONFIG`); recorded by
  :func:`~bissl_det.runtime.records.provenance` as ``config_values``;
* the data: training and test sets, their sizes (``provenance.data``);
* the initial weights (sha256 of MODEL.WEIGHTS);
* the metrics it reports.

Two groups compared with each other must agree on the test data and the metrics. A difference
is refused naming the file and both values; ``allow_mix`` (the tools' ``--allow-mix``) accepts
config, data and weights differences deliberately, and the output records them. Metrics that
one file lacks are always refused (nothing can be averaged over them). Files without provenance
(written by hand, or by older versions) are compared on what they hold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config.values import values_except
from ..utils.results import read_runs, runs_of

__all__ = [
    "IGNORED_CONFIG",
    "IncomparableResultsError",
    "check_comparison",
    "check_group",
    "config_values",
]

# Config keys that may differ between seeds of one experiment.
IGNORED_CONFIG = (
    "SEED",
    "OUTPUT_DIR",
    "VERSION",
    "GLOBAL.*",
    "CUDNN_BENCHMARK",
    "MODEL.DEVICE",
    "MODEL.WEIGHTS",  # compared by content (sha256), not path
    "*NUM_WORKERS",
    "*PERIOD",
)
_SHOWN = 8


class IncomparableResultsError(ValueError):
    """Results files that must not be averaged or compared; names the file and the difference."""


def config_values(cfg: Mapping) -> dict[str, Any]:
    """The config values that must agree between seeds of one experiment (JSON-ready)."""
    return values_except(cfg, IGNORED_CONFIG)


def _tool(provenance: Mapping) -> str | None:
    command = provenance.get("command")
    return Path(command[1]).name if isinstance(command, list) and len(command) > 1 else None


def _differs(label: str, a: Any, b: Any) -> str | None:
    if a is None or b is None or a == b:  # not recorded on one side: nothing to compare
        return None
    return f"{label}: {b!r} here, {a!r} in the first file"


def _config_differences(a: Mapping | None, b: Mapping | None) -> list[str]:
    if not isinstance(a, Mapping) or not isinstance(b, Mapping):
        return []
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    shown = [f"config {k}: {b.get(k)!r} here, {a.get(k)!r} in the first file" for k in keys]
    return shown[:_SHOWN] + ([f"and {len(keys) - _SHOWN} more keys"] if len(keys) > _SHOWN else [])


def _metrics(path: Path, record: Mapping) -> set[str]:
    return set().union(*(run.metrics for run in runs_of(path, record)))


def _read(paths: Sequence[str | Path]) -> list[tuple[Path, dict]]:
    records = []
    for path in map(Path, paths):
        try:
            record, _ = read_runs(path)
        except ValueError as err:
            raise IncomparableResultsError(str(err)) from None
        records.append((path, record))
    return records


def _metric_problem(first: tuple[Path, dict], other: tuple[Path, dict]) -> str | None:
    (path_a, a), (path_b, b) = first, other
    ours, theirs = _metrics(path_a, a), _metrics(path_b, b)
    if ours == theirs:
        return None
    return (
        f"{path_b} reports other metrics than {path_a}: missing {sorted(ours - theirs)}, "
        f"extra {sorted(theirs - ours)}"
    )


def _provenance_differences(first: Mapping, other: Mapping, within: bool) -> list[str]:
    a, b = first.get("provenance") or {}, other.get("provenance") or {}
    data_a, data_b = a.get("data") or {}, b.get("data") or {}
    found = [
        _differs("test data", data_a.get("test"), data_b.get("test")),
        _differs("classification data", data_a.get("classification"), data_b.get("classification")),
    ]
    if within:
        found += [
            _differs("tool", _tool(a), _tool(b)),
            _differs("training data", data_a.get("train"), data_b.get("train")),
            _differs("pretext data", data_a.get("pretext"), data_b.get("pretext")),
            _differs(
                "MODEL.WEIGHTS (sha256)",
                (a.get("weights") or {}).get("sha256"),
                (b.get("weights") or {}).get("sha256"),
            ),
        ]
        found += _config_differences(a.get("config_values"), b.get("config_values"))
    return [f for f in found if f]


def _verdict(problems: list[str], allow_mix: bool, what: str) -> dict:
    if problems and not allow_mix:
        raise IncomparableResultsError(
            f"{what} are not comparable: {'; '.join(problems)}. Average and compare only runs "
            "that differ in their seed, or pass --allow-mix to mix them deliberately (recorded "
            "in the output)"
        )
    return {"allowed_mix": bool(problems), "differences": problems}


def check_group(paths: Sequence[str | Path], allow_mix: bool = False) -> dict:
    """Refuse results files that are not seeds of one experiment (see the module docstring).

    Returns:
        ``{"allowed_mix": bool, "differences": [...]}`` for the output's record.

    Raises:
        IncomparableResultsError: names the file that differs from the first and how.
    """
    records = _read(paths)
    problems = []
    for path, record in records[1:]:
        metric = _metric_problem(records[0], (path, record))
        if metric:
            raise IncomparableResultsError(metric)
        problems += [f"{path}: {d}" for d in _provenance_differences(records[0][1], record, True)]
    return _verdict(problems, allow_mix, f"the runs of {records[0][0]} and the others")


def check_comparison(
    baseline: Sequence[str | Path], treatment: Sequence[str | Path], allow_mix: bool = False
) -> dict:
    """Each group checked by :func:`check_group`; between the groups, the test data and the
    metrics must agree. Returns ``{"baseline": ..., "treatment": ..., "between": ...}``."""
    verdict = {
        "baseline": check_group(baseline, allow_mix),
        "treatment": check_group(treatment, allow_mix),
    }
    first, other = _read([baseline[0]])[0], _read([treatment[0]])[0]
    if not (_is_summary(first[1]) or _is_summary(other[1])):
        metric = _metric_problem(first, other)
        if metric:
            raise IncomparableResultsError(metric)
    problems = [f"{other[0]}: {d}" for d in _provenance_differences(first[1], other[1], False)]
    verdict["between"] = _verdict(problems, allow_mix, "the baseline and treatment groups")
    return verdict


def _is_summary(record: Mapping) -> bool:
    """An aggregate_seeds summary (checked when it was made), not a run."""
    return "metrics" in record and "inputs" in record and "provenance" not in record
