#!/usr/bin/env python
"""Search lr and weight decay with parallel Optuna trials, scored on a validation split.

    python tools/search.py --config-file configs/cls/voc07_R50.yaml --linear-probe \
        --trials 64 --workers 8 MODEL.WEIGHTS output/pretrain/pretext_backbone.pth

A classification config (ResNetClassifier) searches CLS.SOLVER.BASE_LR / WEIGHT_DECAY in
CLS.SEARCH.LR_RANGE / WD_RANGE as tools/eval_cls.py trains; a detection config
(GeneralizedRCNN) searches SOLVER.BASE_LR / WEIGHT_DECAY in DET_SEARCH.* as
tools/finetune_det.py fine-tunes. Trials train on the training data minus a held-out split and
are scored there; the test split is never read. --workers N: N processes, one GPU each.
Several jobs (e.g. a Slurm array) may share a study: same --study-name and --storage on a shared
disk, --workers 1 and an OUTPUT_DIR of its own each (one run per folder). Rerunning resumes
the study; --trials may grow. Writes OUTPUT_DIR/search_results.json and best_config.yaml; test
the best with eval_cls.py / finetune_det.py --config-file OUTPUT_DIR/best_config.yaml (a
separate, explicit step).
"""

import logging
import sys
from pathlib import Path

import bissl_det  # noqa: F401  (compatibility shims + registrations, before detectron2 is used)
from bissl_det.data.tasks import standalone_task
from bissl_det.runtime.run_identity import add_overwrite_flag
from bissl_det.runtime.setup import load_config, setup
from bissl_det.runtime.signals import EXIT_INTERRUPTED, TrainingInterrupted
from bissl_det.search import SearchOptions, run_search
from bissl_det.search.study import SAMPLERS
from bissl_det.utils.cli import describe

from detectron2.engine import default_argument_parser


def argument_parser():
    parser = add_overwrite_flag(describe(default_argument_parser(), __doc__))
    parser.add_argument("--trials", type=int, required=True, help="counted trials in the study")
    parser.add_argument(
        "--workers", type=int, default=1, help="parallel worker processes (one GPU each)"
    )
    parser.add_argument(
        "--study-name", default="", help="default: the config file's name (+ -linear_probe)"
    )
    parser.add_argument(
        "--storage",
        default="",
        help="journal file shared by all workers (OUTPUT_DIR/search.journal)",
    )
    parser.add_argument(
        "--sampler", choices=SAMPLERS, default="random", help="random (the authors') or tpe"
    )
    parser.add_argument(
        "--linear-probe", action="store_true", help="classification: search the linear probe"
    )
    parser.add_argument(
        "--fail-running",
        action="store_true",
        help="mark every RUNNING trial FAIL first (only when no worker of the study is alive)",
    )
    return parser


def options_from_args(args) -> SearchOptions:
    name = args.study_name or Path(args.config_file).stem + (
        "-linear_probe" if args.linear_probe else ""
    )
    return SearchOptions(
        trials=args.trials,
        study_name=name,
        workers=args.workers,
        storage=args.storage,
        sampler=args.sampler,
        linear_probe=args.linear_probe,
        fail_running=args.fail_running,
    )


def main(args):
    if args.num_gpus != 1 or args.num_machines != 1:
        raise SystemExit("search.py: a trial uses one device; parallelise with --workers N")
    options = options_from_args(args)
    # The batch-size checks of the tool whose training the trials run.
    task = standalone_task(load_config(args.config_file, args.opts))
    tool = task.train_tool if task is not None else "search"  # search_task names the problem
    return run_search(setup(args, tool=tool), options)


if __name__ == "__main__":
    try:
        main(argument_parser().parse_args())
    except TrainingInterrupted as e:
        logging.getLogger("bissl_det.search").warning("%s", e)
        sys.exit(EXIT_INTERRUPTED)
