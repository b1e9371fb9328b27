"""Evaluation: classification metrics (detection uses detectron2's own evaluators)."""

from .classification import mean_per_class_accuracy, top1_accuracy, voc07_11point_ap, voc07_map

__all__ = ["mean_per_class_accuracy", "top1_accuracy", "voc07_11point_ap", "voc07_map"]
