#!/usr/bin/env python
"""Classification transfer of a backbone on the test split: full fine-tuning or a linear probe.

    python tools/eval_cls.py --config-file configs/cls/voc07_R50.yaml \
        --linear-probe --seeds 3 MODEL.WEIGHTS output/pretrain/pretext_backbone.pth

--seeds N: N runs (seeds SEED..SEED+N-1), mean and std. lr and weight decay are
CLS.SOLVER.BASE_LR / WEIGHT_DECAY: to select them on a validation split, run tools/search.py
first and pass its best_config.yaml here. Writes OUTPUT_DIR/cls_results.json and, per seed,
OUTPUT_DIR/seed_<seed>/ (metrics.json, TensorBoard events, plots). Single process.
"""

import bissl_det  # noqa: F401  (compatibility shims + registrations, before detectron2 is used)
from bissl_det.engine.cls_eval import run_cls_eval
from bissl_det.engine.launch import launch_from_args
from bissl_det.engine.setup import setup

from detectron2.engine import default_argument_parser


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--linear-probe",
        action="store_true",
        help="train only the linear layer; backbone weights and BN statistics stay frozen",
    )
    parser.add_argument("--seeds", type=int, default=1, help="runs to average (mean, std)")
    return parser


def main(args):
    cfg = setup(args)
    return run_cls_eval(cfg, seeds=args.seeds, linear_probe=args.linear_probe)


if __name__ == "__main__":
    args = argument_parser().parse_args()
    launch_from_args(main, args)
