#!/usr/bin/env python
r"""Conventional SimCLR/BYOL pretraining of the Detectron2 ResNet (step 1 of the BiSSL pipeline).

    python tools/pretrain_ssl.py --config-file configs/pretrain/simclr_R50.yaml \
        OUTPUT_DIR output/pretrain_simclr

Writes OUTPUT_DIR/pretext_backbone.pth: MODEL.WEIGHTS of tools/train_bissl.py,
tools/finetune_det.py and tools/eval_cls.py. --resume continues from the last checkpoint
(same data order and augmentations with NUM_WORKERS 0).
"""

import bissl_det  # noqa: F401  (compatibility shims + registrations, before detectron2 is used)
from bissl_det.engine.pretrain import PretrainTrainer
from bissl_det.runtime.launch import launch_from_args
from bissl_det.runtime.records import write_results
from bissl_det.runtime.run_identity import add_overwrite_flag
from bissl_det.runtime.setup import setup
from bissl_det.utils.cli import describe
from bissl_det.utils.provenance import utc_now

from detectron2.engine import default_argument_parser
from detectron2.utils import comm

# The loss averaged over the last steps (at most this many) is the run's summary figure.
FINAL_WINDOW = 20
UNITS = {
    "final_pretext_loss": "SimCLR: nats (NT-Xent); BYOL: 2 - 2 cos, in [0, 4]",
    "steps": "optimiser steps",
}


def main(args):
    start = utc_now()
    cfg = setup(args, tool="pretrain_ssl")
    trainer = PretrainTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if args.eval_only:
        raise ValueError("--eval-only: pretraining has no evaluation; use tools/eval_cls.py")
    trainer.train()
    if comm.is_main_process():
        loss = trainer.storage.history("pretext_loss")
        results = {
            "final_pretext_loss": loss.avg(FINAL_WINDOW),
            "steps": trainer.max_iter,
            "export": f"{cfg.OUTPUT_DIR}/pretext_backbone.pth",
        }
        out = f"{cfg.OUTPUT_DIR}/results.json"
        write_results(out, results, cfg, UNITS, start_time=start, config_file=args.config_file)
    return trainer


if __name__ == "__main__":
    args = add_overwrite_flag(describe(default_argument_parser(), __doc__)).parse_args()
    launch_from_args(main, args)
