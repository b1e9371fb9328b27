#!/usr/bin/env python
"""Mean and standard deviation of metrics over several runs (seeds), with the inputs recorded.

    python tools/aggregate_seeds.py output/ft_voc_s*/results.json --out output/ft_voc_summary.json

Each input is a results.json of tools/finetune_det.py ({dataset: {AP, AP50, AP75}}) or
tools/train_bissl.py (one run each), or a cls_results.json of tools/eval_cls.py (one run per
evaluation seed); every numeric leaf of a run is aggregated (sample std, ddof = 1; "n/a" for a
single run), "units" and "provenance" are not. The summary JSON holds {"metrics": {metric: {mean,
std, n}}, "units", "inputs": [{path, sha256, seed, git commit}], "seeds"}. To compare two groups
(baseline vs BiSSL) with a confidence interval, use tools/compare_runs.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bissl_det.evaluation.comparability import check_group
from bissl_det.utils.cli import describe
from bissl_det.utils.provenance import sha256_file, utc_now
from bissl_det.utils.results import Run
from bissl_det.utils.results import read_runs as read_file_runs
from bissl_det.utils.stats import format_mean_std, summarise


def read_runs(paths: list[Path]) -> tuple[list[Run], list[dict], object]:
    """(runs, input records, common units) of results files; errors name the file."""
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"results files not found: {missing}")
    all_runs, inputs, units = [], [], {}
    for path in paths:
        try:
            record, runs = read_file_runs(path)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        all_runs += runs
        prov = record.get("provenance", {})
        inputs.append(
            {
                "path": str(path.resolve()),
                "sha256": sha256_file(path),
                "seed": prov.get("seed"),
                "git_commit": prov.get("git", {}).get("commit"),
            }
        )
        units[str(path)] = json.dumps(record.get("units"), sort_keys=True)
    if len(set(units.values())) > 1:
        raise SystemExit(f"inputs state different units: {units}")
    first = next(iter(units.values()))
    return all_runs, inputs, json.loads(first)


def aggregate(runs: list[Run]) -> dict[str, dict[str, float]]:
    """{metric: {"mean", "std", "n"}} over runs; metrics must be present in every run."""
    try:
        return summarise([run.metrics for run in runs])
    except ValueError as e:
        raise SystemExit(f"{sorted({run.path for run in runs})}: {e}") from None


def main(argv: list[str] | None = None) -> dict:
    parser = describe(argparse.ArgumentParser(), __doc__)
    parser.add_argument("results", nargs="+", type=Path, help="results.json files")
    parser.add_argument("--out", type=Path, help="write the summary as JSON here")
    parser.add_argument(
        "--allow-mix",
        action="store_true",
        help="average runs whose config, data or weights differ (recorded in the output)",
    )
    args = parser.parse_args(argv)
    try:  # seeds of one experiment only, unless told otherwise; names the file that differs
        provenance_check = check_group(args.results, allow_mix=args.allow_mix)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    runs, inputs, units = read_runs(args.results)
    summary = aggregate(runs)
    for key, stats in summary.items():
        print(f"{key:40s} {format_mean_std(stats):>20s}  (n={stats['n']})")
    seeds = [run.seed for run in runs]
    if None not in seeds and len(set(seeds)) < len(seeds):
        print(f"warning: repeated seeds {seeds}: these runs are not independent")
    if args.out:
        record = {
            "metrics": summary,
            "units": units,
            "inputs": inputs,
            "seeds": seeds,
            "provenance_check": provenance_check,
            "created": utc_now(),
        }
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
