"""A finished study's numbers: per arm, per pair, paired differences; study.json and report.md.

For each arm, evaluation protocol ("finetune", "probe") and metric:

* a pair's value is the mean over its evaluation seeds (the probe has one run);
* the arm's mean and std over pairs (std "n/a" for one pair);
* the evaluation-seed std (pooled within backbones: sqrt of the mean per-backbone variance) and
  the BiSSL-seed std (the std over pairs of the pair values) separately: the second is the
  spread that evaluation seeds alone never show;
* compute: CPU seconds of the arm's runs (BiSSL run + evaluations, mean per pair) and the
  pretext steps its backbone saw (pretraining + STAGES x LOWER_STEPS).

Comparisons are paired over the pairs (B - A per pair seed; the pretext arm has one value for all
pairs): mean difference, the paired t interval, resolved or not, the pairs that would resolve it.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import yaml

from ..checkpoint.io import atomic_write_text
from ..utils.provenance import utc_now
from ..utils.results import read_runs
from ..utils.stats import paired_difference
from .config import arm_kind, comparisons_of, metrics_of
from .plan import StudyPlan
from .plots import plot_study


def _match(metrics: dict[str, float], name: str, where: str) -> float:
    found = [k for k in metrics if k == name or k.endswith("/" + name)]
    if len(found) != 1:
        raise ValueError(f"{where}: metric {name!r} matches {found} of {sorted(metrics)}")
    return metrics[found[0]]


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def _run_config(run) -> dict:
    path = run.output_dir / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def collect(plan: StudyPlan, records: dict[str, dict]) -> dict:
    """study.json's content from the finished runs' products and records."""
    cfg = plan.cfg
    metrics = metrics_of(cfg)
    pretext_steps = _pretext_steps(plan)
    arms: dict[str, dict] = {}
    for arm in cfg.ARMS:
        name = str(arm["NAME"])
        units = ["backbone"] if arm_kind(arm) == "pretext" else [f"pair_{s}" for s in cfg.PAIRS]
        entry: dict = {"kind": arm_kind(arm), "opts": list(arm.get("OPTS", [])), "scores": {}}
        for evaluation in (e for e in plan.evaluations if e.arm == name):
            per_seed = []
            for product in evaluation.products:
                per_seed += read_runs(product)[1]
            for metric in metrics:
                label = f"{evaluation.protocol}/{metric}"
                values = [_match(r.metrics, metric, r.path) for r in per_seed]
                score = entry["scores"].setdefault(label, {"pairs": {}})
                score["pairs"][evaluation.unit] = {
                    "value": statistics.fmean(values),
                    "eval_seeds": [r.seed for r in per_seed],
                    "eval_values": values,
                }
        for score in entry["scores"].values():
            pair_values = [score["pairs"][u]["value"] for u in units]
            variances = [_std(score["pairs"][u]["eval_values"]) for u in units]
            score["mean"] = statistics.fmean(pair_values)
            score["std"] = _std(pair_values)
            score["n"] = len(pair_values)
            score["eval_seed_std"] = (
                math.sqrt(statistics.fmean(v * v for v in variances))
                if None not in variances
                else None
            )
            score["bissl_seed_std"] = _std(pair_values) if entry["kind"] == "bissl" else None
        entry["compute"] = _compute(plan, name, units, records, pretext_steps, entry["kind"])
        arms[name] = entry
    return {
        "created": utc_now(),
        "task": cfg.TASK,
        "pairs": list(cfg.PAIRS),
        "eval_seeds": int(cfg.EVAL.SEEDS) if cfg.EVAL.FINETUNE else 0,
        "metrics": metrics,
        "confidence": cfg.CONFIDENCE,
        "pretext_weights": plan.pretext_weights,
        "eval_config": plan.eval_config,
        "arms": arms,
        "comparisons": _comparisons(cfg, arms),
    }


def _pretext_steps(plan: StudyPlan) -> int | None:
    pretext = [r for r in plan.runs if r.key == "pretext"]
    if not pretext:
        return None  # given weights: their history is not known here
    return int(_run_config(pretext[0]).get("PRETRAIN", {}).get("ITERS", 0)) or None


def _compute(plan, arm: str, units, records, pretext_steps, kind: str) -> dict:
    cpu, wall = [], []
    for unit in units:
        runs = plan.runs_of(arm, unit)
        seconds = [records[r.key].get("cpu_s") for r in runs]
        cpu.append(None if None in seconds else sum(seconds))
        wall.append(sum(records[r.key]["wall_s"] for r in runs))
    bissl_steps = 0
    if kind == "bissl":
        bissl = _run_config(plan.bissl_runs[(arm, units[0])]).get("BISSL", {})
        bissl_steps = int(bissl.get("STAGES", 0)) * int(bissl.get("LOWER_STEPS", 0))
    return {
        "cpu_s_per_pair": None if None in cpu else statistics.fmean(cpu),
        "wall_s_per_pair": statistics.fmean(wall),
        "pretext_steps": None if pretext_steps is None else pretext_steps + bissl_steps,
        "bissl_lower_steps": bissl_steps,
    }


def _comparisons(cfg, arms: dict) -> list[dict]:
    out = []
    pairs = [f"pair_{s}" for s in cfg.PAIRS]
    for a, b in comparisons_of(cfg):
        for label in arms[a]["scores"]:
            if label not in arms[b]["scores"]:
                continue
            values = [_pair_values(arms[name], label, pairs) for name in (a, b)]
            d = paired_difference(*values, confidence=cfg.CONFIDENCE)
            d95 = paired_difference(*values, confidence=0.95)
            out.append(
                {
                    "a": a,
                    "b": b,
                    "metric": label,
                    "values_a": values[0],
                    "values_b": values[1],
                    "differences": [y - x for x, y in zip(*values, strict=True)],
                    "paired_difference": statistics.fmean(
                        y - x for x, y in zip(*values, strict=True)
                    ),
                    "ci95": None if d95 is None else [d95.low, d95.high],
                    "ci": None if d is None else [d.low, d.high],  # at CONFIDENCE
                    "resolved": None if d is None else d.resolved,  # ci excludes 0
                    "n_pairs": len(pairs),
                    "std_of_differences": None if d is None else d.std,
                    # None where undefined (every pair differs by the same amount): JSON has
                    # no NaN or infinity.
                    "t_stat": None if d is None else _finite(d.t_stat),
                    "p_value": None if d is None else _finite(d.p_value),
                    "pairs_to_resolve": None if d is None else d.pairs_to_resolve,
                }
            )
    return out


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _pair_values(arm: dict, label: str, pairs: list[str]) -> list[float]:
    score = arm["scores"][label]["pairs"]
    if arm["kind"] == "pretext":
        return [score["backbone"]["value"]] * len(pairs)
    return [score[p]["value"] for p in pairs]


def _fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(study: dict, settings: str) -> str:
    lines = [
        "# Study report",
        "",
        f"Task: {study['task']}; pairs (BiSSL seeds): {study['pairs']}; evaluation seeds per "
        f"backbone: {study['eval_seeds']}; confidence {study['confidence']:.0%}. Created "
        f"{study['created']}.",
        "",
        settings,
        "",
        "## Arms",
        "",
        "| arm | metric | mean +- std over pairs (n) | eval-seed std | BiSSL-seed std | "
        "CPU s / pair | pretext steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, arm in study["arms"].items():
        compute = arm["compute"]
        for label, s in arm["scores"].items():
            lines.append(
                f"| {name} | {label} | {s['mean']:.2f} +- {_fmt(s['std'])} ({s['n']}) | "
                f"{_fmt(s['eval_seed_std'])} | {_fmt(s['bissl_seed_std'])} | "
                f"{_fmt(compute['cpu_s_per_pair'], 0)} | {compute['pretext_steps'] or 'n/a'} |"
            )
    lines += [
        "",
        "## Paired comparisons (B - A per pair)",
        "",
        "| A | B | metric | differences per pair | mean | CI | resolved | pairs to resolve |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in study["comparisons"]:
        ci = c["ci"]
        interval = "n/a (1 pair)" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"
        resolved = "n/a" if c["resolved"] is None else ("yes" if c["resolved"] else "no")
        diffs = ", ".join(f"{d:+.2f}" for d in c["differences"])
        needed = c["pairs_to_resolve"] or ("never" if c["resolved"] is not None else "n/a")
        lines.append(
            f"| {c['a']} | {c['b']} | {c['metric']} | {diffs} | {c['paired_difference']:+.2f} | "
            f"{interval} | {resolved} | {needed} |"
        )
    lines += [
        "",
        "'pairs to resolve': the fewest pairs whose interval would exclude 0 if the observed mean "
        "and spread of the differences stayed the same (an estimate, not a promise).",
        "",
        "![arms](study_arms.png)",
        "![differences](study_differences.png)",
        "![compute](study_compute.png)",
        "",
    ]
    return "\n".join(lines)


def write_report(study: dict, out_dir: Path, settings: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(study, indent=2) + "\n", out_dir / "study.json")
    atomic_write_text(markdown(study, settings) + "\n", out_dir / "report.md")
    plot_study(study, out_dir)
