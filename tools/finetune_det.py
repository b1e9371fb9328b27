#!/usr/bin/env python
r"""Fine-tune and evaluate a Faster R-CNN detector from a backbone checkpoint (Detectron2).

    python tools/finetune_det.py --config-file configs/finetune/voc_R50_C4.yaml --num-gpus 8 \
        MODEL.WEIGHTS output/bissl_voc/lower_backbone.pth OUTPUT_DIR output/ft_voc SEED 1

MODEL.WEIGHTS: a BiSSL export (lower_backbone.pth), a pretext export, or any checkpoint converted
by tools/convert_checkpoint.py; every ResNet tensor is checked to be loaded, and a file that
would leave one at its random value (an unconverted torchvision/MoCo file, a BiSSL or pretraining
run's model_final.pth) is refused with the converter command. Writes
OUTPUT_DIR/results.json with AP, AP50 and AP75 per test set; tools/aggregate_seeds.py averages
several seeds.
"""

import logging
from pathlib import Path

import bissl_det  # noqa: F401  (compatibility shims + registrations, before detectron2 is used)
from bissl_det.engine.checkpointer import AtomicCheckpointer
from bissl_det.engine.finetune import FinetuneTrainer, check_initial_weights, summarise
from bissl_det.runtime.launch import launch_from_args
from bissl_det.runtime.records import write_results
from bissl_det.runtime.run_identity import add_overwrite_flag
from bissl_det.runtime.setup import setup
from bissl_det.utils.cli import describe
from bissl_det.utils.provenance import utc_now

from detectron2.engine import default_argument_parser
from detectron2.utils import comm

logger = logging.getLogger("bissl_det.finetune_det")


def main(args):
    start = utc_now()
    cfg = setup(args, tool="finetune_det")
    if args.eval_only:
        model = FinetuneTrainer.build_model(cfg)
        # Our checkpointer: its reader never unpickles code (Detectron2's .pkl reader would).
        checkpointer = AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        if not (args.resume and checkpointer.has_checkpoint()):
            # Evaluation needs every tensor of a trained detector, not only a backbone.
            check_initial_weights(model, cfg.MODEL.WEIGHTS, whole_model=True)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = FinetuneTrainer.test(cfg, model)
    else:
        trainer = FinetuneTrainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
        # DefaultTrainer.train returns them only with TEST.EXPECTED_RESULTS; the final EvalHook ran.
        results = trainer._last_eval_results
    if comm.is_main_process():
        metrics = summarise(list(cfg.DATASETS.TEST), results)
        out = Path(cfg.OUTPUT_DIR) / "results.json"
        write_results(out, metrics, cfg, start_time=start, config_file=args.config_file)
        logger.info("Results %s written to %s", metrics, out)
    return results


if __name__ == "__main__":
    args = add_overwrite_flag(describe(default_argument_parser(), __doc__)).parse_args()
    launch_from_args(main, args)
