"""What ``--resume`` cannot restore exactly, said in the log when a run resumes.

Restored exactly: weights, optimiser and schedule states, the batches drawn per level (the
samplers continue at the next sample; aspect-ratio groups are formed from indices before
mapping, see :mod:`bissl_det.data.aspect_groups`), every rank's torch/NumPy/Python RNG state.
Not restored: the RNG of data-loader worker processes (NUM_WORKERS > 0): workers restart from
the run's seed, so random augmentations after the resume differ (the images, their order and
their batches do not).
"""

from __future__ import annotations

import logging

from detectron2.config import CfgNode

from ..config.defaults import config_value
from ..data.tasks import BISSL_META_ARCHITECTURE, downstream_task

logger = logging.getLogger(__name__)


def inexact_resume_reasons(cfg: CfgNode) -> list[str]:
    """Why a resumed run of ``cfg`` may differ from an uninterrupted one (empty: exact)."""
    workers = {"BISSL.PRETEXT_DATA.NUM_WORKERS": cfg.BISSL.PRETEXT_DATA.NUM_WORKERS}
    if cfg.MODEL.META_ARCHITECTURE == BISSL_META_ARCHITECTURE:
        key = downstream_task(cfg).workers_key  # the upper level's training loader
        workers[key] = config_value(cfg, key)
    return [
        f"{key} = {value}: loader workers restart their RNG from the seed, so random "
        "augmentations after the resume differ (set it to 0 for an exact resume)"
        for key, value in workers.items()
        if value > 0
    ]


def warn_inexact_resume(cfg: CfgNode) -> None:
    """Log one warning listing what this resumed run does not restore exactly."""
    reasons = inexact_resume_reasons(cfg)
    if reasons:
        logger.warning(
            "--resume is not exact for this run (weights, optimisers and the data position "
            "are): %s",
            "; ".join(reasons),
        )


def resume_from_last(trainer, message: str) -> bool:
    """Continue ``trainer`` from OUTPUT_DIR's last usable checkpoint, if there is one.

    Sets ``trainer.start_iter`` (0 without a checkpoint) and logs ``message % start_iter`` and
    what is not exact; returns whether it resumed.
    """
    trainer.start_iter = 0
    if not trainer.checkpointer.has_checkpoint():
        return False
    checkpoint = trainer.checkpointer.resume_or_load("", resume=True)
    trainer.start_iter = checkpoint.get("iteration", -1) + 1
    logger.info(message, trainer.start_iter)
    warn_inexact_resume(trainer.cfg)
    return True
