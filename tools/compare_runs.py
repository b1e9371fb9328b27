#!/usr/bin/env python
r"""Compare a baseline and a treatment (e.g. BiSSL) over seeds: mean +- std, difference, 95% CI.

    python tools/compare_runs.py --baseline 'output/ft_base_s*/results.json' \
        --treatment 'output/ft_bissl_s*/results.json' --out output/compare_voc

Each group is results.json files of single runs (globs are expanded here, so quote them), or one
summary of tools/aggregate_seeds.py. Per metric: mean +- sample std of both groups, the
difference treatment - baseline and its Welch confidence interval (unequal variances,
Welch-Satterthwaite degrees of freedom), and "resolved" when the interval excludes 0. Writes
OUT.md (the table), OUT.png (means with std, differences with their intervals) and OUT.json.
With fewer than 2 runs in a group there is no interval.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
from pathlib import Path

from bissl_det.utils.cli import describe
from bissl_det.utils.provenance import sha256_file, utc_now
from bissl_det.utils.stats import Difference, flatten_metrics, summarise, welch_difference


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


def load_group(patterns: list[str]) -> tuple[dict, list[dict], dict[str, list[float]], object]:
    """(summary, input records, per-run values, units) of one group."""
    paths = expand(patterns)
    records = [json.loads(p.read_text()) for p in paths]
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
        return summary, inputs, {}, records[0].get("units")
    runs = [flatten_metrics(r) for r in records]
    values = {k: [run[k] for run in runs] for k in runs[0]}
    return summarise(runs), inputs, values, records[0].get("units")


def unit_of(units, metric: str) -> str:
    if isinstance(units, dict):
        return units.get(metric.split("/")[-1], units.get(metric, ""))
    return units or ""


def compare(baseline: dict, treatment: dict, confidence: float) -> dict[str, Difference | None]:
    common = [k for k in baseline if k in treatment]
    if not common:
        raise SystemExit(f"no metric in common: {sorted(baseline)} vs {sorted(treatment)}")
    return {k: welch_difference(baseline[k], treatment[k], confidence) for k in common}


def markdown(names, summaries, diffs, units, confidence: float) -> str:
    pct = f"{confidence:.0%}"
    lines = [
        f"| metric | {names[0]} (mean +- std, n) | {names[1]} (mean +- std, n) | "
        f"difference | {pct} CI (Welch) | resolved |",
        "|---|---|---|---|---|---|",
    ]
    for key, d in diffs.items():
        unit = unit_of(units, key)
        label = f"{key} ({'%' if unit == 'percent' else unit})" if unit else key
        cells = [
            f"{s[key]['mean']:.2f} +- {s[key]['std']:.2f} ({int(s[key]['n'])})" for s in summaries
        ]
        diff = summaries[1][key]["mean"] - summaries[0][key]["mean"]
        if d is None:
            ci, resolved = "- (need >= 2 runs per group)", "-"
        else:
            ci = f"[{d.low:+.2f}, {d.high:+.2f}] (df {d.df:.1f})"
            resolved = "yes" if d.resolved else "no"
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {diff:+.2f} | {ci} | {resolved} |")
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
            runs = values[g].get(k, [])
            left.scatter(runs, [y] * len(runs), s=10, color="grey", zorder=3)
    left.set_yticks(range(len(keys)), keys)
    left.set_xlabel("metric value (dots: single runs)")
    left.legend(fontsize=8)
    for i, k in enumerate(keys):
        d = diffs[k]
        diff = summaries[1][k]["mean"] - summaries[0][k]["mean"]
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
    right.set_xlabel(f"{names[1]} - {names[0]}\n{confidence:.0%} Welch CI (green: excludes 0)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = describe(argparse.ArgumentParser(), __doc__)
    parser.add_argument("--baseline", nargs="+", required=True, metavar="GLOB")
    parser.add_argument("--treatment", nargs="+", required=True, metavar="GLOB")
    parser.add_argument("--names", nargs=2, default=("baseline", "BiSSL"), metavar="NAME")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--out", type=Path, required=True, help="OUT.md, OUT.png, OUT.json")
    args = parser.parse_args(argv)
    if not 0 < args.confidence < 1:
        raise SystemExit(f"--confidence {args.confidence}: must be in (0, 1)")
    groups = [load_group(args.baseline), load_group(args.treatment)]
    summaries = [g[0] for g in groups]
    diffs = compare(*summaries, args.confidence)
    units = groups[0][3] if groups[0][3] is not None else groups[1][3]
    table = markdown(args.names, summaries, diffs, units, args.confidence)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    md, png, js = (args.out.with_name(args.out.name + ext) for ext in (".md", ".png", ".json"))
    md.write_text(f"# {args.names[1]} vs {args.names[0]}\n\n{table}")
    plot(args.names, summaries, diffs, [g[2] for g in groups], png, args.confidence)
    report = {
        "names": list(args.names),
        "confidence": args.confidence,
        "units": units,
        "metrics": {
            k: {
                args.names[0]: summaries[0][k],
                args.names[1]: summaries[1][k],
                "difference": summaries[1][k]["mean"] - summaries[0][k]["mean"],
                "interval": None if d is None else [d.low, d.high],
                "welch_df": None if d is None or math.isinf(d.df) else d.df,
                "resolved": None if d is None else d.resolved,
            }
            for k, d in diffs.items()
        },
        "inputs": {args.names[0]: groups[0][1], args.names[1]: groups[1][1]},
        "created": utc_now(),
    }
    js.write_text(json.dumps(report, indent=2) + "\n")
    print(table, end="")
    print(f"wrote {md}, {png}, {js}")
    return report


if __name__ == "__main__":
    main()
