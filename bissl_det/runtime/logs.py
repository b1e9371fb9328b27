"""Logging set-up of every tool: detectron2's, with plain text wherever no terminal reads it.

detectron2's ``default_setup`` always colours the console (``setup_logger(color=True)``) and
highlights the config with terminal escape codes, which then land in ``OUTPUT_DIR/log.txt`` and
in redirected output (``> run.log``, Slurm's files). :func:`setup_run_logging` does the same set-up
with colour only when stdout is a terminal (and ``NO_COLOR`` is unset), and never in log.txt.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch
from detectron2.config import CfgNode
from detectron2.utils import comm
from detectron2.utils.collect_env import collect_env_info
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from ..checkpoint.io import atomic_write_text

LOGGERS = ("fvcore", "detectron2", "bissl_det")

logger = logging.getLogger(__name__)


def use_colour(stream=None) -> bool:
    """Colour codes only for a terminal, and never with ``NO_COLOR`` set (no-color.org)."""
    stream = sys.stdout if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)()) and "NO_COLOR" not in os.environ


def setup_run_logging(cfg: CfgNode, args) -> None:
    """Loggers, run record and seeds, as detectron2's ``default_setup`` makes them.

    The fvcore, detectron2 and bissl_det loggers print on rank 0 and write
    ``OUTPUT_DIR/log.txt`` (``.rankN`` on other ranks); the environment, command line, config
    file and merged config are logged; rank 0 saves the merged config as
    ``OUTPUT_DIR/config.yaml``; the RNGs are seeded with SEED + rank (random if SEED < 0).
    """
    rank, colour = comm.get_rank(), use_colour()
    for name in LOGGERS:
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=rank, color=colour, name=name)
    logger.info("Rank of current process: %d. World size: %d", rank, comm.get_world_size())
    logger.info("Environment info:\n%s", collect_env_info())
    logger.info("Command line arguments: %s", args)
    config_file = getattr(args, "config_file", "")
    if config_file:
        logger.info("Contents of %s:\n%s", config_file, Path(config_file).read_text())
    if comm.is_main_process():
        path, dump = Path(cfg.OUTPUT_DIR) / "config.yaml", cfg.dump()
        atomic_write_text(dump, path)
        logger.info("Full config saved to %s:\n%s", path, dump)
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    if not getattr(args, "eval_only", False):
        torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK
