#!/usr/bin/env python
"""BiSSL: head warm-up, then the bilevel stages; exports the lower backbone for fine-tuning.

    python tools/train_bissl.py --config-file configs/bissl/simclr_R50_C4_voc.yaml \
        MODEL.WEIGHTS pretext_backbone.pth OUTPUT_DIR output/bissl_voc

Writes OUTPUT_DIR/lower_backbone.pth (MODEL.WEIGHTS of tools/finetune_det.py), checkpoints of
both levels (--resume continues exactly), metrics.json and plots/*.png.
"""

import json
import logging
from pathlib import Path

import bissl_det  # noqa: F401  (compatibility shims + registrations, before detectron2 is used)
from bissl_det.engine import BilevelTrainer
from bissl_det.engine.launch import launch_from_args
from bissl_det.engine.setup import setup

from detectron2.engine import default_argument_parser
from detectron2.utils import comm

logger = logging.getLogger("bissl_det.train_bissl")


def main(args):
    cfg = setup(args)
    trainer = BilevelTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if args.eval_only:
        results = trainer.evaluate()
    else:
        trainer.train()
        results = trainer.evaluate() if cfg.DATASETS.TEST or cfg.CLS.TEST_ROOT else {}
    if comm.is_main_process():
        out = Path(cfg.OUTPUT_DIR) / "results.json"
        out.write_text(json.dumps(results, indent=2))
        logger.info("Upper-level results: %s (%s)", dict(results), out)
    return results


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch_from_args(main, args)
