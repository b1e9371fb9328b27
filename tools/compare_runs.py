#!/usr/bin/env python
r"""Compare a baseline and a treatment (e.g. BiSSL) over seeds: mean +- std, difference, 95% CI.

    python tools/compare_runs.py --baseline 'output/ft_base_s*/results.json' \
        --treatment 'output/ft_bissl_s*/results.json' --out output/compare_voc

Each group is results files of any tool (globs are expanded here, so quote them): a
results.json is one run, an eval_cls.py cls_results.json one run per evaluation seed; or one
summary of tools/aggregate_seeds.py. Per metric: mean +- sample std of both groups ("n/a" for a
single run), the difference treatment - baseline and its confidence interval, and "resolved"
when the interval excludes 0. The interval is Welch's (unequal variances, Welch-Satterthwaite
degrees of freedom), or with --paired the paired t interval of the per-seed differences (runs
matched by seed, each seed once per group; the same numbers as scipy.stats.ttest_rel), with the
number of pairs that would resolve the observed difference. Writes OUT.md (the table), OUT.png
(means with std, differences with their intervals) and OUT.json. With fewer than 2 runs (pairs)
in a group there is no interval.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
from dataclasses import dataclass
from pathlib import Path

from bissl_det.evaluation.comparability import check_comparison
from bissl_det.utils.cli import describe
from bissl_det.utils.provenance import sha256_file, utc_now
from bissl_det.utils.results import Run, read_runs
from bissl_det.utils.stats import (
    Difference,
    PairedDifference,
    format_mean_std,
    paired_difference,
    summarise,
    welch_difference,
)


def expand(patterns: list[str]) -> list[Path]:
    """Paths of ``patterns`` (globs expanded, sorted); a pattern matching nothing is an error."""
    paths: list[Path] = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not found or not Path(found[0]).is_file():
            raise SystemExit(f"no results file matches {pattern!r}")
        paths += [Path(p) for p in found]
    return paths


def is_summary(record: dict) -> bool:
    stats = record.get("metrics", record)
    return bool(stats) and all(
        isinstance(v, dict) and {"mean", "std", "n"} <= set(v) for v in stats.values()
    )


@dataclass
class Group:
    """One side of the comparison: its summary, inputs, runs and units."""

    summary: dict
    inputs: list[dict]
    runs: list[Run]
    units: object

    def values(self, metric: str) -> list[float]:
        return [run.metrics[metric] for run in self.runs if metric in run.metrics]


def load_group(patterns: list[str]) -> Group:
    """The runs of ``patterns`` (every tool's results files), or one aggregate_seeds summary."""
    paths = expand(patterns)
    records, runs = [], []
    for path in paths:
        try:
            record, found = read_runs(path)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        records.append(record)
        runs += found
    inputs = [
        {
            "path": str(p.resolve()),
            "sha256": sha256_file(p),
            "seed": r.get("provenance", {}).get("seed"),
        }
        for p, r in zip(paths, records, strict=True)
    ]
    if len(records) == 1 and is_summary(records[0]):
        summary = records[0].get("metrics", records[0])
        return Group(summary, inputs, [], records[0].get("units"))
    try:
        summary = summarise([run.metrics for run in runs])
    except ValueError as e:
        raise SystemExit(f"{patterns}: {e}") from None
    return Group(summary, inputs, runs, records[0].get("units"))


def paired_values(baseline: Group, treatment: Group, metric: str) -> tuple[list, list, list]:
    """(seeds, baseline values, treatment values) matched by seed; refuses what cannot pair."""
    by_seed = []
    for name, group in (("baseline", baseline), ("treatment", treatment)):
        if not group.runs:
            raise SystemExit(f"--paired: the {name} is a summary; give its results files")
        seeds = [run.seed for run in group.runs]
        if None in seeds or len(set(seeds)) < len(seeds):
            raise SystemExit(f"--paired: the {name}'s runs need distinct seeds, got {seeds}")
        by_seed.append({run.seed: run.metrics[metric] for run in group.runs})
    if set(by_seed[0]) != set(by_seed[1]):
        raise SystemExit(
            f"--paired: seeds differ, baseline {sorted(by_seed[0])} vs treatment "
            f"{sorted(by_seed[1])}"
        )
    seeds = sorted(by_seed[0])
    return seeds, [by_seed[0][s] for s in seeds], [by_seed[1][s] for s in seeds]


def unit_of(units, metric: str) -> str:
    if isinstance(units, dict):
        return units.get(metric.split("/")[-1], units.get(metric, ""))
    return units or ""


def compare(
    baseline: Group, treatment: Group, confidence: float, paired: bool
) -> dict[str, Difference | PairedDifference | None]:
    common = [k for k in baseline.summary if k in treatment.summary]
    if not common:
        raise SystemExit(
            f"no metric in common: {sorted(baseline.summary)} vs {sorted(treatment.summary)}"
        )
    if paired:
        return {
            k: paired_difference(*paired_values(baseline, treatment, k)[1:], confidence)
            for k in common
        }
    return {
        k: welch_difference(baseline.summary[k], treatment.summary[k], confidence) for k in common
    }


def markdown(names, summaries, diffs, units, confidence: float, paired: bool) -> str:
    pct = f"{confidence:.0%}"
    test = "paired t" if paired else "Welch"
    extra = " | pairs to resolve" if paired else ""
    lines = [
        f"| metric | {names[0]} (mean +- std, n) | {names[1]} (mean +- std, n) | "
        f"difference | {pct} CI ({test}) | resolved{extra} |",
        "|---|---|---|---|---|---|" + ("---|" if paired else ""),
    ]
    for key, d in diffs.items():
        unit = unit_of(units, key)
        label = f"{key} ({'%' if unit == 'percent' else unit})" if unit else key
        cells = [f"{format_mean_std(s[key])} ({int(s[key]['n'])})" for s in summaries]
        diff = summaries[1][key]["mean"] - summaries[0][key]["mean"]
        more = ""
        if d is None:
            ci, resolved = f"- (need >= 2 {'pairs' if paired else 'runs per group'})", "-"
            more = " | -" if paired else ""
        else:
            ci = f"[{d.low:+.2f}, {d.high:+.2f}] (df {d.df:.1f})"
            resolved = "yes" if d.resolved else "no"
            if paired:
                diff = d.diff
                more = f" | {d.pairs_to_resolve if d.pairs_to_resolve else 'never'}"
        lines.append(
            f"| {label} | {cells[0]} | {cells[1]} | {diff:+.2f} | {ci} | {resolved}{more} |"
        )
    return "\n".join(lines) + "\n"


def plot(names, summaries, diffs, values, out: Path, confidence: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(diffs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.6 * len(keys) + 2.4))
    for g, (name, summary) in enumerate(zip(names, summaries, strict=True)):
        ys = [i + (g - 0.5) * 0.3 for i in range(len(keys))]
        means = [summary[k]["mean"] for k in keys]
        stds = [summary[k]["std"] for k in keys]
        left.errorbar(means, ys, xerr=stds, fmt="o", capsize=3, label=f"{name} (mean +- std)")
        for y, k in zip(ys, keys, strict=True):
            runs = values[g](k)
            left.scatter(runs, [y] * len(runs), s=10, color="grey", zorder=3)
    left.set_yticks(range(len(keys)), keys)
    left.set_xlabel("metric value (dots: single runs)")
    left.legend(fontsize=8)
    for i, k in enumerate(keys):
        d = diffs[k]
        # Welch: the difference of means; paired: the mean of the differences (the centre).
        diff = summaries[1][k]["mean"] - summaries[0][k]["mean"] if d is None else d.diff
        if d is None:
            right.plot([diff], [i], "x", color="black")
        else:
            colour = "tab:green" if d.resolved else "tab:grey"
            right.errorbar(
                [diff],
                [i],
                xerr=[[diff - d.low], [d.high - diff]],
                fmt="o",
                capsize=4,
                color=colour,
            )
    right.axvline(0.0, color="black", linewidth=1, linestyle="--")
    right.set_yticks(range(len(keys)), keys)
    right.set_xlabel(f"{names[1]} - {names[0]}\n{confidence:.0%} CI (green: excludes 0)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = describe(argparse.ArgumentParser(), __doc__)
    parser.add_argument("--baseline", nargs="+", required=True, metavar="GLOB")
    parser.add_argument("--treatment", nargs="+", required=True, metavar="GLOB")
    parser.add_argument("--names", nargs=2, default=("baseline", "BiSSL"), metavar="NAME")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument(
        "--paired", action="store_true", help="pair runs by seed: paired t interval (ttest_rel)"
    )
    parser.add_argument("--out", type=Path, required=True, help="OUT.md, OUT.png, OUT.json")
    parser.add_argument(
        "--allow-mix",
        action="store_true",
        help="compare runs whose config, data or weights differ within a group, or whose test "
        "data differ between groups (recorded in OUT.json)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.confidence < 1:
        raise SystemExit(f"--confidence {args.confidence}: must be in (0, 1)")
    try:  # comparable groups only, unless told otherwise; names the file that differs
        provenance_check = check_comparison(
            expand(args.baseline), expand(args.treatment), allow_mix=args.allow_mix
        )
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    groups = [load_group(args.baseline), load_group(args.treatment)]
    summaries = [g.summary for g in groups]
    diffs = compare(*groups, args.confidence, args.paired)
    units = groups[0].units if groups[0].units is not None else groups[1].units
    table = markdown(args.names, summaries, diffs, units, args.confidence, args.paired)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    md, png, js = (args.out.with_name(args.out.name + ext) for ext in (".md", ".png", ".json"))
    md.write_text(f"# {args.names[1]} vs {args.names[0]}\n\n{table}")
    plot(args.names, summaries, diffs, [g.values for g in groups], png, args.confidence)
    report = {
        "names": list(args.names),
        "confidence": args.confidence,
        "test": "paired_t" if args.paired else "welch",
        "units": units,
        "metrics": {
            k: {
                args.names[0]: summaries[0][k],
                args.names[1]: summaries[1][k],
                "difference": summaries[1][k]["mean"] - summaries[0][k]["mean"],
                "interval": None if d is None else [d.low, d.high],
                "welch_df": None if d is None or args.paired or math.isinf(d.df) else d.df,
                "resolved": None if d is None else d.resolved,
                **(_paired_fields(groups, k, d) if args.paired else {}),
            }
            for k, d in diffs.items()
        },
        "inputs": {args.names[0]: groups[0].inputs, args.names[1]: groups[1].inputs},
        "provenance_check": provenance_check,
        "created": utc_now(),
    }
    js.write_text(json.dumps(report, indent=2) + "\n")
    print(table, end="")
    print(f"wrote {md}, {png}, {js}")
    return report


def _paired_fields(groups: list[Group], metric: str, d: PairedDifference | None) -> dict:
    seeds = paired_values(*groups, metric)[0]
    if d is None:
        return {"seeds": seeds, "n_pairs": len(seeds)}
    return {
        "seeds": seeds,
        "n_pairs": d.n,
        "paired_difference": d.diff,
        "paired_std": d.std,
        "t_stat": d.t_stat,
        "p_value": d.p_value,
        "pairs_to_resolve": d.pairs_to_resolve,
    }


if __name__ == "__main__":
    main()
