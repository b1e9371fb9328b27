"""Config set-up shared by every tool: BiSSL keys, file + overrides, datasets, checks, logging."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import add_bissl_config
from ..data.build import check_num_classes
from ..data.detection import register_from_config

logger = logging.getLogger(__name__)

MIN_FREE_BYTES = 1 << 30  # a ResNet-50 BiSSL checkpoint with optimiser state is ~0.5 GB


def load_config(config_file: str, opts: list[str] | None = None) -> CfgNode:
    """get_cfg + BiSSL keys + YAML + KEY VALUE overrides; errors name the file or key."""
    cfg = add_bissl_config(get_cfg())
    if not config_file:
        raise FileNotFoundError("--config-file is required (see configs/)")
    if not Path(config_file).is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")
    try:
        cfg.merge_from_file(config_file)
    except KeyError as e:
        raise KeyError(f"{config_file}: {e.args[0]}") from None
    try:
        cfg.merge_from_list(list(opts or []))
    except (KeyError, AssertionError, ValueError) as e:
        # yacs reports an unknown key with an AssertionError: make it the KeyError a YAML gives.
        kind = KeyError if "Non-existent key" in str(e) else type(e)
        kind = ValueError if kind is AssertionError else kind
        raise kind(f"command-line overrides {list(opts or [])}: {e}") from None
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def check_output_dir(output_dir: str, min_free_bytes: int = MIN_FREE_BYTES) -> None:
    """Fail at start-up, not after hours, if results cannot be written."""
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise type(e)(f"OUTPUT_DIR {output_dir} cannot be created: {e}") from None
    if not os.access(path, os.W_OK):
        raise PermissionError(f"OUTPUT_DIR {output_dir} is not writable")
    free = shutil.disk_usage(path).free
    if free < min_free_bytes:
        raise OSError(
            f"OUTPUT_DIR {output_dir}: only {free / 2**20:.0f} MiB free on its disk "
            f"(checkpoints need about {min_free_bytes / 2**20:.0f} MiB)"
        )


def setup(args) -> CfgNode:
    """The ``setup(args)`` of every tool (``args`` from detectron2's default_argument_parser)."""
    cfg = load_config(args.config_file, args.opts)
    register_from_config(cfg)
    check_num_classes(cfg)
    cfg.freeze()
    check_output_dir(cfg.OUTPUT_DIR)
    default_setup(cfg, args)
    # default_setup logs only "detectron2" and "fvcore"; our messages belong in log.txt too.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="bissl_det")
    return cfg
