"""Evaluation of a downstream model: Detectron2's VOC/COCO evaluators, or classification metrics."""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    COCOEvaluator,
    DatasetEvaluator,
    PascalVOCDetectionEvaluator,
)

from ..compat import has_compiled_ops
from .classification import mean_per_class_accuracy, top1_accuracy, voc07_map

logger = logging.getLogger(__name__)


def build_detection_evaluator(cfg: CfgNode, dataset_name: str, output_dir: str) -> DatasetEvaluator:
    """The standard evaluator of a dataset's ``evaluator_type`` (AP, AP50, AP75)."""
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if evaluator_type == "pascal_voc":
        return PascalVOCDetectionEvaluator(dataset_name)
    if evaluator_type == "coco":
        # Without detectron2's C++ ops, pycocotools' pure-Python COCOeval gives the same numbers.
        return COCOEvaluator(dataset_name, output_dir=output_dir, use_fast_impl=has_compiled_ops())
    raise ValueError(
        f"dataset {dataset_name!r}: evaluator_type {evaluator_type!r} is not 'pascal_voc' or 'coco'"
    )


def detection_metrics(results: dict) -> dict[str, float]:
    """{"AP": .., "AP50": .., "AP75": ..} from an evaluator's ``{"bbox": {...}}`` result."""
    bbox = results.get("bbox", {})
    return {k: float(bbox[k]) for k in ("AP", "AP50", "AP75") if k in bbox}


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, loader, multi_label: bool) -> dict[str, float]:
    """Top-1 and mean per-class accuracy (single-label) or VOC07 11-point mAP (multi-label)."""
    was_training = model.training
    model.eval()
    logits, targets = [], []
    for batch in loader:
        logits.append(model(batch).float().cpu())
        targets.append(batch["targets"])
    model.train(was_training)
    logits, targets = torch.cat(logits), torch.cat(targets)
    if multi_label:
        return {"mAP": 100.0 * voc07_map(logits.numpy(), targets.numpy())}
    return {
        "top1": 100.0 * float(top1_accuracy(logits, targets)),
        "mean_per_class_acc": 100.0
        * float(mean_per_class_accuracy(logits, targets, logits.shape[1])),
    }


def evaluate_downstream(cfg: CfgNode, model: torch.nn.Module) -> OrderedDict:
    """Evaluate ``model`` (an upper model, or BiSSL's upper level) on its task's test data.

    The config's downstream task (:mod:`bissl_det.data.tasks`) gives the test loaders and how
    each is scored; results are keyed by test set ("cls" for classification).
    """
    # Imported here: the task registry builds on this module's evaluators.
    from ..data.tasks import downstream_task

    task = downstream_task(cfg)
    results = OrderedDict()
    for name, loader in task.build_test_loaders(cfg).items():
        metrics = task.evaluate(cfg, model, name, loader)
        if metrics is not None:
            results[name] = metrics
            logger.info("%s: %s", name, metrics)
    return results
