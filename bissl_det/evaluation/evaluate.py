"""Evaluation of a downstream model: Detectron2's VOC/COCO evaluators, or classification metrics."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict

import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    COCOEvaluator,
    DatasetEvaluator,
    PascalVOCDetectionEvaluator,
    inference_on_dataset,
)
from detectron2.utils import comm

from ..compat import has_compiled_ops
from ..data.build import (
    build_classification_test_loader,
    build_detection_test_loaders,
    is_classification,
)
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
    """Evaluate ``model`` (an upper model, or BiSSL's upper level) on the config's test data."""
    results = OrderedDict()
    if is_classification(cfg):
        results["cls"] = evaluate_classifier(
            model, build_classification_test_loader(cfg), cfg.MODEL.CLASSIFIER.MULTI_LABEL
        )
        return results
    for name, loader in build_detection_test_loaders(cfg).items():
        out_dir = os.path.join(cfg.OUTPUT_DIR, "inference", name)
        evaluator = build_detection_evaluator(cfg, name, out_dir)
        result = inference_on_dataset(model, loader, evaluator)
        if comm.is_main_process():
            results[name] = detection_metrics(result)
            logger.info("%s: %s", name, results[name])
    return results
