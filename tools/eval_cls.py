#!/usr/bin/env python
r"""Classification transfer of a backbone on the test split: full fine-tuning or a linear probe.

    python tools/eval_cls.py --config-file configs/cls/voc07_R50.yaml \
        --linear-probe --seeds 3 MODEL.WEIGHTS output/pretrain/pretext_backbone.pth

--logistic-probe: the deterministic linear probe (L2 logistic regression by L-BFGS on frozen,
un-augmented features; CLS.PROBE); one run, identical on rerun.
--seeds N: N runs (seeds SEED..SEED+N-1), mean and std. lr and weight decay are
CLS.SOLVER.BASE_LR / WEIGHT_DECAY: to select them on a validation split, run tools/search.py
first and pass its best_config.yaml here. Writes OUTPUT_DIR/cls_results.json and, per seed,
OUTPUT_DIR/seed_<seed>/ (metrics.json, TensorBoard events, plots). Single process.
"""

import bissl_det  # noqa: F401  (compatibility shims + registrations, before detectron2 is used)
from bissl_det.engine.cls_eval import run_cls_eval
from bissl_det.runtime.launch import launch_from_args
from bissl_det.runtime.records import write_results
from bissl_det.runtime.run_identity import add_overwrite_flag
from bissl_det.runtime.setup import setup
from bissl_det.utils.cli import describe
from bissl_det.utils.provenance import utc_now

from detectron2.engine import default_argument_parser


def argument_parser():
    parser = add_overwrite_flag(describe(default_argument_parser(), __doc__))
    parser.add_argument(
        "--linear-probe",
        action="store_true",
        help="train only the linear layer; backbone weights and BN statistics stay frozen",
    )
    parser.add_argument(
        "--logistic-probe",
        action="store_true",
        help="the deterministic linear probe: L2 logistic regression by L-BFGS (float64) on "
        "frozen, un-augmented features, L2 chosen on a validation split (CLS.PROBE)",
    )
    parser.add_argument("--seeds", type=int, default=1, help="runs to average (mean, std)")
    return parser


# Accuracies and mAP are percentages; the other numbers are counts and hyper-parameters.
UNITS = {"top1": "percent", "mean_per_class_acc": "percent", "mAP": "percent"}


def main(args):
    start = utc_now()
    cfg = setup(args, tool="eval_cls")
    results = run_cls_eval(
        cfg, seeds=args.seeds, linear_probe=args.linear_probe, logistic_probe=args.logistic_probe
    )
    # run_cls_eval wrote OUTPUT_DIR/cls_results.json; the same record, with units and provenance.
    out = f"{cfg.OUTPUT_DIR}/cls_results.json"
    write_results(out, results, cfg, units=UNITS, start_time=start, config_file=args.config_file)
    return results


if __name__ == "__main__":
    args = argument_parser().parse_args()
    launch_from_args(main, args)
