"""Standard Detectron2 fine-tuning of a detector from a (BiSSL or SSL) backbone checkpoint."""

from __future__ import annotations

import logging
import os

from detectron2.engine import DefaultTrainer

from ..checkpoint.verify import verify_backbone_loaded
from ..evaluation.evaluate import build_detection_evaluator, detection_metrics

logger = logging.getLogger(__name__)


class FinetuneTrainer(DefaultTrainer):
    """DefaultTrainer with the project's evaluators and a checked backbone initialisation."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_detection_evaluator(cfg, dataset_name, output_folder)

    def resume_or_load(self, resume: bool = True) -> None:
        resuming = resume and self.checkpointer.has_checkpoint()
        super().resume_or_load(resume=resume)
        weights = self.cfg.MODEL.WEIGHTS
        if not resuming and weights and is_backbone_checkpoint(weights):
            count = verify_backbone_loaded(self.model, weights, self.cfg.MODEL.RESNETS.DEPTH)
            logger.info("All %d backbone tensors of %s loaded (no missing key)", count, weights)


def is_backbone_checkpoint(path: str) -> bool:
    """Backbone-only checkpoints (ours, converted SSL ones) vs full detector checkpoints."""
    from ..checkpoint import load_checkpoint_file

    checkpoint = load_checkpoint_file(path)
    return isinstance(checkpoint, dict) and bool(checkpoint.get("matching_heuristics", False))


def summarise(test_sets: list[str], results: dict) -> dict[str, dict[str, float]]:
    """{dataset: {"AP", "AP50", "AP75"}} from DefaultTrainer.test's result.

    DefaultTrainer.test unwraps the result of a single test set, so wrap it back.
    """
    if len(test_sets) == 1 and "bbox" in results:
        results = {test_sets[0]: results}
    return {name: detection_metrics(result) for name, result in results.items()}
