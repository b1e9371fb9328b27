"""What ``--resume`` cannot restore exactly, said in the log when a run resumes.

Restored exactly: weights, optimiser and schedule states, the batches drawn per level (the
samplers continue at the next sample), every rank's torch/NumPy/Python RNG state. Not restored:

* the RNG of data-loader worker processes (NUM_WORKERS > 0): workers restart from the run's
  seed, so random augmentations after the resume differ (the images and their order do not);
* Detectron2's aspect-ratio grouping: images waiting in an orientation group at the checkpoint
  are not saved, and the sampler restarts at batches x batch size, so the downstream batches
  after the resume differ when the training set mixes landscape and portrait images.
"""

from __future__ import annotations

import logging

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog

logger = logging.getLogger(__name__)


def _mixed_orientations(dataset_names) -> bool:
    """Whether a detection training set has images in both of Detectron2's aspect groups."""
    groups = set()
    for name in dataset_names:
        for record in DatasetCatalog.get(name):
            width, height = record.get("width"), record.get("height")
            if width is None or height is None:
                return True  # unknown: assume the worst
            groups.add(width > height)
            if len(groups) == 2:
                return True
    return False


def inexact_resume_reasons(cfg: CfgNode) -> list[str]:
    """Why a resumed run of ``cfg`` may differ from an uninterrupted one (empty: exact)."""
    reasons = []
    workers = {"BISSL.PRETEXT_DATA.NUM_WORKERS": cfg.BISSL.PRETEXT_DATA.NUM_WORKERS}
    bilevel = cfg.MODEL.META_ARCHITECTURE == "BiSSL"
    # Detection data comes from DATASETS.TRAIN; classification from CLS.TRAIN_ROOT.
    detection = bilevel and bool(cfg.DATASETS.TRAIN)
    if bilevel:
        key = "DATALOADER.NUM_WORKERS" if detection else "CLS.NUM_WORKERS"
        workers[key] = cfg.DATALOADER.NUM_WORKERS if detection else cfg.CLS.NUM_WORKERS
    for key, value in workers.items():
        if value > 0:
            reasons.append(
                f"{key} = {value}: loader workers restart their RNG from the seed, so random "
                "augmentations after the resume differ (set it to 0 for an exact resume)"
            )
    if (
        detection
        and cfg.DATALOADER.ASPECT_RATIO_GROUPING
        and _mixed_orientations(cfg.DATASETS.TRAIN)
    ):
        reasons.append(
            "DATALOADER.ASPECT_RATIO_GROUPING with landscape and portrait images: images "
            "waiting in an aspect-ratio group at the checkpoint are not restored, so the "
            "downstream batches after the resume differ (set it to False for an exact resume)"
        )
    return reasons


def warn_inexact_resume(cfg: CfgNode) -> None:
    """Log one warning listing what this resumed run does not restore exactly."""
    reasons = inexact_resume_reasons(cfg)
    if reasons:
        logger.warning(
            "--resume is not exact for this run (weights, optimisers and the data position "
            "are): %s",
            "; ".join(reasons),
        )
