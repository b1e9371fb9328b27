"""A tool's batch sizes against the process count and the registered data sets (at start-up)."""

from __future__ import annotations

from detectron2.config import CfgNode

from ..config.checks import ConfigError, ConfigOrigins, join_problems
from ..config.defaults import config_value
from ..data.build import downstream_train_size, pretext_image_paths

__all__ = ["TOOL_BATCHES", "check_batch_sizes"]

# Per tool: (batch key, the data it draws from). Other tools' batch keys keep their defaults
# and are not checked against this run's data or process count.
TOOL_BATCHES = {
    "train_bissl": (
        ("BISSL.LOWER.IMS_PER_BATCH", "pretext"),
        ("BISSL.UPPER.IMS_PER_BATCH", "downstream"),
    ),
    "pretrain_ssl": (("PRETRAIN.IMS_PER_BATCH", "pretext"),),
    "finetune_det": (("SOLVER.IMS_PER_BATCH", "downstream"),),
    "eval_cls": (("CLS.SOLVER.IMS_PER_BATCH", "downstream"),),
}


def check_batch_sizes(cfg: CfgNode, origins: ConfigOrigins, tool: str, world_size: int) -> None:
    """A tool's batches: multiples of the process count, and no larger than their data set.

    Call once the data sets are registered. A batch larger than its data set would repeat images
    within a batch (for SimCLR, an image's copy becomes its own negative). Without
    MODEL.SIMCLR.GATHER, SimCLR needs 2 images per process too.

    Raises:
        ConfigError: one line per invalid batch, naming where it was set.
    """
    sizes = {
        "pretext": lambda: (len(pretext_image_paths(cfg)), "pretext images (BISSL.PRETEXT_DATA)"),
        "downstream": lambda: (downstream_train_size(cfg), "downstream training samples"),
    }
    simclr = str(cfg.MODEL.BISSL.PRETEXT).lower() == "simclr"
    problems = []
    for key, data in TOOL_BATCHES.get(tool, ()):
        batch, where = config_value(cfg, key), origins.describe(key)
        if batch % world_size:
            problems.append(f"{where}: {key} = {batch} is not a multiple of {world_size} processes")
            continue
        if data == "pretext" and simclr and not cfg.MODEL.SIMCLR.GATHER and batch // world_size < 2:
            problems.append(
                f"{where}: {key} = {batch} over {world_size} processes leaves "
                f"{batch // world_size} image per process: without MODEL.SIMCLR.GATHER SimCLR "
                "needs >= 2 per process"
            )
        size, what = sizes[data]()
        if batch > size:
            problems.append(f"{where}: {key} = {batch} is larger than the {size} {what}")
    if problems:
        raise ConfigError(join_problems(problems))
