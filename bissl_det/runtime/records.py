"""A results file with its provenance: what a tool writes at the end of a run.

The facts it records that need no config (git, file hashes, package versions, times) are
:mod:`bissl_det.utils.provenance`; the data sets and the config values are read here, above it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..data.catalog import dataset_dicts
from ..evaluation.comparability import config_values
from ..utils.files import atomic_write_text
from ..utils.provenance import (
    NON_METRIC_KEYS,
    count_images,
    file_record,
    git_state,
    package_versions,
    utc_now,
)

__all__ = ["data_record", "dataset_sizes", "provenance", "write_results"]


def dataset_sizes(names) -> dict[str, int | str]:
    """Images per registered detectron2 data set; a set that fails to load gets its error text.

    Provenance is written at the end of a run: a data set that can no longer be read must not
    throw the run's results away. Sets loaded earlier in the process are not read again.
    """
    sizes: dict[str, int | str] = {}
    for name in names:
        try:
            sizes[name] = len(dataset_dicts(name))
        except Exception as e:  # noqa: BLE001 - recorded, see docstring
            sizes[name] = f"error: {type(e).__name__}: {e}"
    return sizes


def data_record(cfg) -> dict[str, Any]:
    """Downstream data sets (names and image counts) and the pretext data of ``cfg``."""
    record: dict[str, Any] = {
        "train": dataset_sizes(cfg.DATASETS.TRAIN),
        "test": dataset_sizes(cfg.DATASETS.TEST),
    }
    cls = cfg.get("CLS")
    if cls is not None and (cls.TRAIN_ROOT or cls.TEST_ROOT):
        roots = dict.fromkeys(root for root in (cls.TRAIN_ROOT, cls.TEST_ROOT) if root)
        record["classification"] = {root: count_images(root) for root in roots}  # each walked once
    pretext = cfg.get("BISSL", {}).get("PRETEXT_DATA")
    if pretext is not None:
        record["pretext"] = {
            "image_roots": list(pretext.IMAGE_ROOTS),
            "datasets": list(pretext.DATASETS),
        }
    return record


def provenance(
    cfg, start_time: str | None = None, config_file: str | None = None
) -> dict[str, Any]:
    """Everything needed to trace a result back to its run.

    Args:
        cfg: The run's (merged, frozen) config.
        start_time: When the run started (:func:`utc_now` at the top of ``main``).
        config_file: The ``--config-file`` given on the command line.

    Returns:
        git commit and dirtiness, command line, the config file and the merged config saved as
        ``OUTPUT_DIR/config.yaml`` (paths and sha256), the values seeds must share
        (:func:`~bissl_det.evaluation.comparability.config_values`), MODEL.WEIGHTS and its
        sha256, SEED, data sets and their sizes, package versions, host name, start and end
        time (UTC ISO).
    """
    return {
        "git": git_state(),
        "command": [sys.executable, *sys.argv],
        "config_file": file_record(config_file),
        "config": file_record(Path(cfg.OUTPUT_DIR) / "config.yaml"),
        "config_values": config_values(cfg),  # what seeds of one experiment share
        "weights": file_record(cfg.MODEL.WEIGHTS),
        "seed": int(cfg.SEED),
        "data": data_record(cfg),
        "versions": package_versions(),
        "hostname": socket.gethostname(),
        "start_time": start_time,
        "end_time": utc_now(),
    }


def write_results(
    path: str | os.PathLike,
    results: Mapping,
    cfg,
    units: str | Mapping[str, str] = "percent",
    start_time: str | None = None,
    config_file: str | None = None,
) -> dict:
    """Write ``results`` plus ``"units"`` and ``"provenance"`` as JSON to ``path``; return it.

    ``units``: one unit for every metric (``"percent"``) or ``{metric: unit}``.
    """
    clash = [k for k in NON_METRIC_KEYS if k in results]
    if clash:
        raise ValueError(f"results already hold reserved key(s) {clash}")
    record = {
        **results,
        "units": units if isinstance(units, str) else dict(units),
        "provenance": provenance(cfg, start_time=start_time, config_file=config_file),
    }
    atomic_write_text(json.dumps(record, indent=2) + "\n", path)  # never half a file
    return record
