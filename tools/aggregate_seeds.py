#!/usr/bin/env python
"""Mean and standard deviation of metrics over several runs (seeds), with the inputs recorded.

    python tools/aggregate_seeds.py output/ft_voc_s*/results.json --out output/ft_voc_summary.json

Each input is a results.json of tools/finetune_det.py ({dataset: {AP, AP50, AP75}}),
tools/train_bissl.py or tools/eval_cls.py; every numeric leaf is aggregated (sample std,
ddof = 1), "units" and "provenance" are not. The summary JSON holds {"metrics": {metric: {mean,
std, n}}, "units", "inputs": [{path, sha256, seed, git commit}], "seeds"}. To compare two groups
(baseline vs BiSSL) with a confidence interval, use tools/compare_runs.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bissl_det.utils.cli import describe
from bissl_det.utils.provenance import sha256_file, utc_now
from bissl_det.utils.stats import flatten_metrics, summarise


def read_runs(paths: list[Path]) -> tuple[list[dict], list[dict], object]:
    """(results, input records, common units) of results.json files; errors name the file."""
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"results files not found: {missing}")
    results, inputs, units = [], [], {}
    for path in paths:
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}: not valid JSON ({e})") from None
        results.append(record)
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
    return results, inputs, json.loads(first)


def aggregate(results: list[dict]) -> dict[str, dict[str, float]]:
    """{metric: {"mean", "std", "n"}} over runs; metrics must be present in every run."""
    return summarise([flatten_metrics(r) for r in results])


def main(argv: list[str] | None = None) -> dict:
    parser = describe(argparse.ArgumentParser(), __doc__)
    parser.add_argument("results", nargs="+", type=Path, help="results.json files")
    parser.add_argument("--out", type=Path, help="write the summary as JSON here")
    args = parser.parse_args(argv)
    results, inputs, units = read_runs(args.results)
    summary = aggregate(results)
    for key, stats in summary.items():
        print(f"{key:40s} {stats['mean']:8.2f} +- {stats['std']:.2f}  (n={stats['n']})")
    seeds = [i["seed"] for i in inputs]
    if None not in seeds and len(set(seeds)) < len(seeds):
        print(f"warning: repeated seeds {seeds}: these runs are not independent")
    if args.out:
        record = {
            "metrics": summary,
            "units": units,
            "inputs": inputs,
            "seeds": seeds,
            "created": utc_now(),
        }
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
