"""Class names must mean the same thing in every split of a run, and in the backbone it starts from.

A detector's class k is the k-th of its training set's ``thing_classes``; a test set whose list
holds the same names in another order (COCO JSONs with other category ids, VOC splits with
CLASSES in another order) would score a perfect detector far below 100 without any error.
:func:`check_split_classes` refuses that at start-up, naming both sets and their files;
:func:`check_weights_classes` compares a fine-tuning run's classes with those of the BiSSL upper
level that made its backbone (recorded in the export as ``downstream_classes``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from detectron2.data import MetadataCatalog

from .validation import DatasetValidationError

logger = logging.getLogger(__name__)


def split_classes(name: str) -> list[str] | None:
    """The ``thing_classes`` of registered data set ``name`` (None when it has none)."""
    classes = MetadataCatalog.get(name).get("thing_classes", None)
    return list(classes) if classes else None


def run_classes(cfg) -> list[str] | None:
    """The detection classes of a run (its first training set's), or None."""
    return split_classes(cfg.DATASETS.TRAIN[0]) if cfg.DATASETS.TRAIN else None


def _source(name: str) -> str:
    meta = MetadataCatalog.get(name)
    where = meta.get("json_file", None) or meta.get("dirname", None)
    return f"{name!r} ({where})" if where else repr(name)


def check_split_classes(train: Sequence[str], test: Sequence[str]) -> list[str] | None:
    """Every detection split of a run has the classes of the first training set, in its order.

    Returns:
        The run's class names (None without detection sets).

    Raises:
        DatasetValidationError: Names both data sets, their files and both class lists.
    """
    named = [(name, split_classes(name)) for name in [*train, *test]]
    named = [(name, classes) for name, classes in named if classes is not None]
    if not named:
        return None
    first, reference = named[0]
    for name, classes in named[1:]:
        if classes == reference:
            continue
        same_names = sorted(classes) == sorted(reference)
        problem = (
            "the same class names in another order (e.g. other COCO category ids): the model's "
            "class k would be scored as another class"
            if same_names
            else "other class names"
        )
        raise DatasetValidationError(
            f"data set {_source(name)} has {problem}: {classes} vs {reference} in "
            f"{_source(first)}. Every split of a run must list the same classes in the same "
            "order (renumber the COCO categories, or order VOC CLASSES alike)"
        )
    return reference


def check_weights_classes(weights: str, checkpoint, classes: Sequence[str] | None) -> None:
    """Refuse fine-tuning on other classes than the BiSSL upper level of the backbone had.

    ``checkpoint``: the content of MODEL.WEIGHTS; only exports that record
    ``downstream_classes`` (BiSSL's lower_backbone.pth) are checked. The backbone has no class
    head, so the order does not matter, only the names.
    """
    recorded = checkpoint.get("downstream_classes") if isinstance(checkpoint, dict) else None
    if recorded is None or classes is None:
        return
    if sorted(recorded) != sorted(classes):
        raise DatasetValidationError(
            f"MODEL.WEIGHTS = {weights} was made by BiSSL for the classes {list(recorded)}, "
            f"this fine-tuning uses {list(classes)}: the backbone was tailored to another task. "
            "Fine-tune on the data of its BiSSL run, or start from the pretext backbone"
        )
    logger.info("MODEL.WEIGHTS %s: made by BiSSL for these %d classes", weights, len(classes))
