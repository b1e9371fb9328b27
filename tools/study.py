#!/usr/bin/env python
r"""Run a controlled study of BiSSL and report what is resolved.

    python tools/study.py --config-file configs/study/fashion_mnist.yaml [--jobs 2] \
        [--submit] [KEY VALUE ...]

The study file (bissl_det/study/config.py documents every key) names the pretext backbone
(trained once, or given), the arms (the pretext backbone as is, the compute-matched control
BISSL.COUPLING decoupled, BiSSL estimators, first-order x = g, x = 0, ...), the pairs (one SEED
each, shared by the arms of a pair) and the evaluation (fine-tuning with N seeds and lr/wd from
tools/search.py on a validation split; the deterministic linear probe). Each run is an existing
tool (pretrain_ssl, train_bissl, search, eval_cls, finetune_det) started as a subprocess, or with
--submit as a job of tools/submit.py (SUBMIT), --jobs at a time per phase. A rerun skips
finished runs (checked by their record and provenance) and redoes killed ones. Writes
OUTPUT_DIR/study.json, report.md, study_*.png and launches.log (one line per started run);
--dry-run prints the runs without starting any.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import bissl_det  # noqa: F401  (compatibility shims, before detectron2 is used)
from bissl_det.study import RunFailed, StudyPlan, collect, finished, load_study_config, run_all
from bissl_det.study.config import StudyConfigError, check_study_inputs
from bissl_det.study.report import write_report
from bissl_det.utils.cli import describe


def argument_parser() -> argparse.ArgumentParser:
    parser = describe(argparse.ArgumentParser(allow_abbrev=False), __doc__)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="the study file")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time within a phase")
    parser.add_argument(
        "--submit", action="store_true", help="run each tool as a job of tools/submit.py"
    )
    parser.add_argument("--dry-run", action="store_true", help="list the runs, start none")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    return parser


def main(argv: list[str] | None = None) -> dict | None:
    args = argument_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_study_config(args.config_file, args.opts)
    except (StudyConfigError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs}: must be >= 1")
    plan = StudyPlan(cfg)
    out = Path(cfg.OUTPUT_DIR)
    if args.dry_run:
        for run in plan.runs:
            state = "done" if finished(run) else "to run"
            print(f"[phase {run.phase}] {run.key:40s} {state:7s} {' '.join(run.command())}")
        return None
    try:
        check_study_inputs(cfg, args.config_file)
    except StudyConfigError as e:
        raise SystemExit(f"error: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_config.yaml").write_text(cfg.dump())

    def submit(run) -> list[str]:
        return [str(a) for a in cfg.SUBMIT.get(run.tool, cfg.SUBMIT.DEFAULT)]

    try:
        records = run_all(plan.runs, out, jobs=args.jobs, submit=submit if args.submit else None)
    except RunFailed as e:
        raise SystemExit(f"error: {e}") from None
    settings = (
        f"Study file `{args.config_file}`, overrides `{' '.join(args.opts) or 'none'}`; the "
        f"merged study config is `study_config.yaml`, every run's command is in "
        f"`launches.log` and its own `study_run.json`."
    )
    study = collect(plan, records)
    write_report(study, out, settings)
    print((out / "report.md").read_text())
    return study


if __name__ == "__main__":
    main()
