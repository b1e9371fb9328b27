#!/usr/bin/env python
r"""BiSSL: head warm-up, then the bilevel stages; exports the lower backbone for fine-tuning.

    python tools/train_bissl.py --config-file configs/bissl/simclr_R50_C4_voc.yaml \
        MODEL.WEIGHTS pretext_backbone.pth OUTPUT_DIR output/bissl_voc

Writes OUTPUT_DIR/lower_backbone.pth (MODEL.WEIGHTS of tools/finetune_det.py), checkpoints of
both levels (--resume continues exactly), metrics.json and plots/*.png.
"""

import logging
from pathlib import Path

import bissl_det  # noqa: F401  (compatibility shims + registrations, before detectron2 is used)
from bissl_det.engine import BilevelTrainer
from bissl_det.engine.memory_plan import check_stage_memory, plan_stage_memory
from bissl_det.runtime.launch import launch_from_args
from bissl_det.runtime.records import write_results
from bissl_det.runtime.run_identity import add_overwrite_flag
from bissl_det.runtime.setup import setup
from bissl_det.utils.cli import describe
from bissl_det.utils.provenance import utc_now

import torch
from detectron2.engine import default_argument_parser
from detectron2.utils import comm

logger = logging.getLogger("bissl_det.train_bissl")


def argument_parser():
    parser = add_overwrite_flag(describe(default_argument_parser(), __doc__))
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="after training, evaluate the upper level on DATASETS.TEST (or CLS.TEST_ROOT)",
    )
    return parser


def test_sets(cfg) -> list[str]:
    return list(cfg.DATASETS.TEST) or ([cfg.CLS.TEST_ROOT] if cfg.CLS.TEST_ROOT else [])


def evaluation_plan(cfg, asked: bool) -> str:
    """What this run evaluates, in words (logged, and kept in results.json)."""
    test, periodic = test_sets(cfg), cfg.TEST.EVAL_PERIOD
    if not test:
        return "none (no DATASETS.TEST / CLS.TEST_ROOT)"
    what = f"the upper level on the TEST split(s) {test}"
    if periodic > 0:
        return f"{what}, every {periodic} stages and after the last (TEST.EVAL_PERIOD)"
    if asked:
        return f"{what}, after training (--evaluate)"
    return f"none (pass --evaluate or TEST.EVAL_PERIOD N for {what})"


def check_memory(cfg, trainer) -> None:
    """On CUDA, refuse (or warn about) a stage that cannot fit, before any long work."""
    mode = cfg.BISSL.MEMORY_PLAN
    if mode not in ("refuse", "warn", "off"):
        raise ValueError(f"BISSL.MEMORY_PLAN = {mode!r}: valid values are 'refuse', 'warn', 'off'")
    if mode == "off" or trainer.device.type != "cuda":
        return
    plan = plan_stage_memory(cfg, trainer.model, comm.get_world_size())
    total = torch.cuda.get_device_properties(trainer.device).total_memory
    logger.info(check_stage_memory(plan, total, refuse=mode == "refuse"))


def main(args):
    start = utc_now()
    cfg = setup(args, tool="train_bissl")
    asked = args.eval_only or getattr(args, "evaluate", False)
    plan = evaluation_plan(cfg, asked)
    # BiSSL's result is the lower backbone, scored by fine-tuning: the upper detector's test
    # score is a diagnostic, and test images must not steer a run's settings.
    logger.info("Evaluation: %s", plan)
    trainer = BilevelTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if not args.eval_only:
        check_memory(cfg, trainer)
    if args.eval_only:
        results = trainer.evaluate()
    else:
        trainer.train()
        results = trainer.evaluate() if asked and test_sets(cfg) else {}
    if comm.is_main_process():
        out = Path(cfg.OUTPUT_DIR) / "results.json"
        record = {**results, "evaluation": plan}
        if not args.eval_only:
            record["hypergradient"] = trainer.verdict.summary
        write_results(out, record, cfg, start_time=start, config_file=args.config_file)
        if results:
            logger.info("Upper-level results: %s (%s)", dict(results), out)
        else:
            logger.info("Upper level: nothing evaluated (evaluation: %s); wrote %s", plan, out)
    return results


if __name__ == "__main__":
    args = argument_parser().parse_args()
    launch_from_args(main, args)
