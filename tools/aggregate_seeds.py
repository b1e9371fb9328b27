#!/usr/bin/env python
"""Mean and standard deviation of metrics over several runs (seeds).

    python tools/aggregate_seeds.py output/ft_seed*/results.json --out output/ft_summary.json

Each input is a results.json of tools/finetune_det.py ({dataset: {AP, AP50, AP75}}) or of
tools/eval_cls.py; every numeric leaf is aggregated (sample std, ddof = 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def flatten(tree: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def aggregate(results: list[dict]) -> dict[str, dict[str, float]]:
    """{metric: {"mean", "std", "n"}} over runs; metrics must be present in every run."""
    if not results:
        raise ValueError("no results to aggregate")
    runs = [flatten(r) for r in results]
    keys = set(runs[0])
    for i, run in enumerate(runs[1:], start=1):
        if set(run) != keys:
            raise ValueError(f"run {i} has metrics {sorted(set(run) ^ keys)} that run 0 lacks/has")
    return {
        key: {
            "mean": statistics.fmean(r[key] for r in runs),
            "std": statistics.stdev([r[key] for r in runs]) if len(runs) > 1 else 0.0,
            "n": len(runs),
        }
        for key in sorted(keys)
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json files")
    parser.add_argument("--out", type=Path, help="write the summary as JSON here")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        raise SystemExit(f"results files not found: {missing}")
    summary = aggregate([json.loads(p.read_text()) for p in args.results])
    for key, stats in summary.items():
        print(f"{key:40s} {stats['mean']:8.2f} +- {stats['std']:.2f}  (n={stats['n']})")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
