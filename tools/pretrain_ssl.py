#!/usr/bin/env python
"""Conventional SimCLR/BYOL pretraining of the Detectron2 ResNet (step 1 of the BiSSL pipeline).

    python tools/pretrain_ssl.py --config-file configs/pretrain/simclr_R50.yaml \
        OUTPUT_DIR output/pretrain_simclr

Writes OUTPUT_DIR/pretext_backbone.pth: MODEL.WEIGHTS of tools/train_bissl.py,
tools/finetune_det.py and tools/eval_cls.py. --resume continues from the last checkpoint
(same data order and augmentations with NUM_WORKERS 0).
"""

import bissl_det  # noqa: F401  (compatibility shims + registrations, before detectron2 is used)
from bissl_det.engine.launch import launch_from_args
from bissl_det.engine.pretrain import PretrainTrainer
from bissl_det.engine.setup import setup

from detectron2.engine import default_argument_parser


def main(args):
    cfg = setup(args)
    trainer = PretrainTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if args.eval_only:
        raise ValueError("--eval-only: pretraining has no evaluation; use tools/eval_cls.py")
    trainer.train()
    return trainer


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch_from_args(main, args)
