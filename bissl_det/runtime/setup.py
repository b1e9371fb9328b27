"""Set-up shared by every tool: config (checked), datasets, OUTPUT_DIR (checked, locked), logs."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.utils import comm

from ..config.checks import (
    ConfigOrigins,
    check_config_values,
    merge_with_origins,
)
from ..config.defaults import add_bissl_config
from ..config.hypergrad import check_hypergrad_config
from ..data.build import check_num_classes
from ..data.detection import register_from_config
from .batch_checks import TOOL_BATCHES, check_batch_sizes
from .logs import setup_run_logging
from .run_identity import check_run_identity, running_script
from .run_lock import lock_output_dir, remove_stray_temp_files

logger = logging.getLogger(__name__)

MIN_FREE_BYTES = 1 << 30  # a ResNet-50 BiSSL checkpoint with optimiser state is ~0.5 GB


def load_config(config_file: str, opts: list[str] | None = None) -> CfgNode:
    """get_cfg + BiSSL keys + YAML + KEY VALUE overrides, every value checked.

    Errors name the key and the file of the ``_BASE_`` chain (or the command line) that set it
    (:mod:`bissl_det.config.checks`).
    """
    return _load_config(config_file, opts)[0]


def _load_config(config_file: str, opts: list[str] | None) -> tuple[CfgNode, ConfigOrigins]:
    cfg = add_bissl_config(get_cfg())
    if not config_file:
        raise FileNotFoundError("--config-file is required (see configs/)")
    origins = merge_with_origins(cfg, config_file, list(opts or []))
    check_config_values(cfg, origins)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    return cfg, origins


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


def checked_config(
    args, tool: str | None = None, world_size: int | None = None
) -> tuple[CfgNode, ConfigOrigins]:
    """Every check :func:`setup` makes before it writes anything; the config, not frozen.

    The config's values (BISSL.HYPERGRAD's combination too), the data sets (registered and
    validated), the number of classes, and ``tool``'s batch sizes against the data and
    ``world_size`` processes (default: this run's).
    ``tools/submit.py`` runs it before submitting a job, with the job's process count.
    """
    cfg, origins = _load_config(args.config_file, args.opts)
    check_hypergrad_config(cfg.BISSL.HYPERGRAD)  # before the data: it is cheaper
    # A tool that draws no pretext batch does not need BISSL.PRETEXT_DATA's sets (a fine-tuning
    # config may inherit the demo's from its _BASE_).
    pretext = tool is None or any(data == "pretext" for _, data in TOOL_BATCHES.get(tool, ()))
    register_from_config(cfg, origins, pretext)
    check_num_classes(cfg)
    if tool and not getattr(args, "eval_only", False):
        world_size = comm.get_world_size() if world_size is None else world_size
        check_batch_sizes(cfg, origins, tool, world_size)
    return cfg, origins


def setup(args, tool: str | None = None) -> CfgNode:
    """The ``setup(args)`` of every tool (``args`` from detectron2's default_argument_parser).

    Before anything is written: :func:`checked_config` (the config's values, the data sets, and
    ``tool``'s batch sizes against the data and processes; ``tool``: a key of TOOL_BATCHES,
    default the running script's name). Then rank 0 takes OUTPUT_DIR's lock (a second run
    there is refused) and removes temporary files that an interrupted write left.
    """
    cfg, _ = checked_config(args, tool)
    cfg.freeze()
    check_output_dir(cfg.OUTPUT_DIR)
    if comm.is_main_process():
        lock_output_dir(cfg.OUTPUT_DIR)
        script = running_script()
        if script:  # before anything is written into OUTPUT_DIR
            check_run_identity(
                cfg, script, resume=args.resume, overwrite=getattr(args, "overwrite", False)
            )
    # default_setup's work, without colour codes in log.txt and in redirected output.
    setup_run_logging(cfg, args)
    if comm.is_main_process():
        remove_stray_temp_files(cfg.OUTPUT_DIR)
    return cfg
