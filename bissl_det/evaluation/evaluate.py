"""Evaluation of a downstream model: Detectron2's VOC/COCO evaluators, or classification metrics."""

from __future__ import annotations

import logging

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
    """The standard evaluator of a dataset's ``evaluator_type`` (AP, AP50, AP75).

    With MODEL.MASK_ON (Mask R-CNN) the COCO evaluator scores boxes and masks ("bbox", "segm"),
    named here rather than guessed from the predictions (a model predicting nothing would
    otherwise lose its mask result silently); VOC-style evaluation has no masks and is refused.
    """
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    mask_on = cfg.MODEL.MASK_ON
    if evaluator_type == "pascal_voc":
        if mask_on:
            raise ValueError(
                f"MODEL.MASK_ON is True, but test set {dataset_name!r} is VOC-style (boxes only): "
                "evaluate Mask R-CNN on a COCO-format set with masks (DATASETS.CUSTOM FORMAT coco)"
            )
        year = MetadataCatalog.get(dataset_name).get("year", None)
        logger.info("%s: %s", dataset_name, voc_metric_name(year))
        return PascalVOCDetectionEvaluator(dataset_name)
    if evaluator_type == "coco":
        # Without detectron2's C++ ops, pycocotools' pure-Python COCOeval gives the same numbers.
        return COCOEvaluator(
            dataset_name,
            tasks=("bbox", "segm") if mask_on else ("bbox",),
            output_dir=output_dir,
            use_fast_impl=has_compiled_ops(),
        )
    raise ValueError(
        f"dataset {dataset_name!r}: evaluator_type {evaluator_type!r} is not 'pascal_voc' or 'coco'"
    )


def voc_metric_name(year) -> str:
    """The VOC metric detectron2's evaluator computes for a set of ``year`` (its metadata)."""
    ap = "11-point interpolated AP (VOC2007 devkit)" if year == 2007 else "area under the PR curve"
    return (
        f"VOC metric of year {year}: {ap}; AP = mean over IoU 0.50:0.05:0.95, AP50, AP75 "
        "(DATASETS.CUSTOM YEAR 2007 or 2012 chooses it)"
    )


def detection_metrics(results: dict) -> dict:
    """Box {"AP", "AP50", "AP75"} from an evaluator's ``{"bbox": {...}}`` result, and with masks
    (Mask R-CNN's ``"segm"``) the mask AP, AP50, AP75 under ``"segm"``.

    Box metrics stay at the top level, as for Faster R-CNN, so every reader of them (search
    objectives, seed aggregation, run comparison) works unchanged for Mask R-CNN.
    """
    keys = ("AP", "AP50", "AP75")
    bbox = results.get("bbox", {})
    metrics: dict = {k: float(bbox[k]) for k in keys if k in bbox}
    if "segm" in results:
        metrics["segm"] = {k: float(results["segm"][k]) for k in keys if k in results["segm"]}
    return metrics


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
    return classification_metrics(torch.cat(logits), torch.cat(targets), multi_label)


def classification_metrics(logits, targets, multi_label: bool) -> dict[str, float]:
    """Percentages: top-1 and mean per-class accuracy, or VOC07 mAP (``multi_label``)."""
    logits, targets = torch.as_tensor(logits), torch.as_tensor(targets)
    if multi_label:
        return {"mAP": 100.0 * voc07_map(logits.numpy(), targets.numpy())}
    return {
        "top1": 100.0 * float(top1_accuracy(logits, targets)),
        "mean_per_class_acc": 100.0
        * float(mean_per_class_accuracy(logits, targets, logits.shape[1])),
    }
