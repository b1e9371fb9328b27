"""The search's outputs: OUTPUT_DIR/search_results.json and the best trial's config."""

from __future__ import annotations

from pathlib import Path

import optuna
from detectron2.config import CfgNode
from optuna.trial import TrialState

from ..checkpoint.io import atomic_write_text
from ..runtime.records import write_results
from .objectives import SearchTask, with_params
from .study import COUNTED

RESULTS_FILE = "search_results.json"
BEST_CONFIG_FILE = "best_config.yaml"


def _trial_record(trial: optuna.trial.FrozenTrial) -> dict:
    return {
        "number": trial.number,
        "state": trial.state.name,
        "value": trial.value,
        "params": trial.params,
        "error": trial.user_attrs.get("error"),
        "owner": trial.user_attrs.get("owner"),
        "duration_s": trial.duration.total_seconds() if trial.duration else None,
    }


def _test_command(cfg: CfgNode, task: SearchTask, best_config: Path, linear_probe: bool) -> str:
    if task.name == "classification":
        probe = " --linear-probe" if linear_probe else ""
        return f"python tools/eval_cls.py --config-file {best_config}{probe} --seeds 5"
    return f"python tools/finetune_det.py --config-file {best_config} --num-gpus 8 SEED 1"


def write_search_report(
    cfg: CfgNode,
    study: optuna.Study,
    task: SearchTask,
    *,
    n_trials: int,
    storage: Path,
    split_sizes: dict[str, int] | None = None,
    linear_probe: bool = False,
) -> dict:
    """Write (atomically: several workers may finish together) and return the results; the best
    counted trial's config goes to best_config.yaml, ready for the separate test-split step."""
    trials = study.get_trials(deepcopy=False)
    scored = [t for t in trials if t.state == TrialState.COMPLETE]
    out_dir = Path(cfg.OUTPUT_DIR)
    results: dict = {
        "task": task.name,
        "study_name": study.study_name,
        "storage": str(storage.resolve()),
        "direction": "maximize",
        "metric": f"validation {task.metric}",
        "search_space": {
            k: {"low": lo, "high": hi, "log": True} for k, (lo, hi) in task.ranges.items()
        },
        "protocol": "linear_probe" if linear_probe else "finetune",
        "validation_split": split_sizes,
        "n_trials_requested": n_trials,
        "n_counted": sum(t.state in COUNTED for t in trials),
        "states": {s.name: sum(t.state == s for t in trials) for s in TrialState},
        "best": None,
        "trials": [_trial_record(t) for t in trials],
    }
    if scored:
        best = max(scored, key=lambda t: t.value)
        best_cfg = with_params(cfg, best.params, out_dir / "test_of_best")
        best_path = out_dir / BEST_CONFIG_FILE
        atomic_write_text(best_cfg.dump(), best_path)
        results["best"] = {
            "number": best.number,
            "params": best.params,
            "value": best.value,
            "config": str(best_path),
            "test_step": _test_command(cfg, task, best_path, linear_probe),
        }
    # Provenance (commit, config, weights, versions) as every tool's results carry it.
    return write_results(out_dir / RESULTS_FILE, results, cfg, units="percent")
