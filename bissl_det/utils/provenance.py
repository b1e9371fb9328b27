"""Where a result came from: code version, config, weights, data, packages, host and time.

Every tool's ``results.json`` carries :func:`provenance` under ``"provenance"`` and its units under
``"units"`` (written by :func:`write_results`), so that a number found later in a folder can be
traced to the exact code, config, checkpoint and data that produced it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torchvision.datasets.folder import IMG_EXTENSIONS  # what data.images counts as images

from .files import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("torch", "torchvision", "detectron2", "bissl_det", "numpy")
# Keys that hold no metric: aggregate_seeds/compare_runs skip them.
NON_METRIC_KEYS = ("units", "provenance")


def utc_now() -> str:
    """The current time, UTC, ISO 8601 with seconds (e.g. ``2026-12-01T20:40:00+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str | None:
    """Hex sha256 of a local file; None when ``path`` is empty or not a local file (a URL)."""
    if not path or not Path(path).is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str | os.PathLike | None) -> dict[str, str | None]:
    """``{"path": absolute path (or the string as given, e.g. a URL), "sha256": ...}``."""
    if not path:
        return {"path": None, "sha256": None}
    local = Path(path)
    return {
        "path": str(local.resolve()) if local.exists() else str(path),
        "sha256": sha256_file(local),
    }


def git_state(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """``{"commit": sha, "dirty": bool}`` of the checkout ``repo``; Nones outside a git clone.

    "dirty" means tracked files differ from the commit (untracked files do not count).
    """

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip())
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, RuntimeError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``packages`` and of Python itself (None: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            # Source checkouts on sys.path (e.g. detectron2 built in place) have no metadata.
            module = sys.modules.get(name)
            versions[name] = getattr(module, "__version__", None)
    return versions


def dataset_sizes(names) -> dict[str, int | str]:
    """Images per registered detectron2 data set; a set that fails to load gets its error text.

    Provenance is written at the end of a run: a data set that can no longer be read must not
    throw the run's results away. Sets loaded earlier in the process are not read again.
    """
    from ..data.catalog import dataset_dicts

    sizes: dict[str, int | str] = {}
    for name in names:
        try:
            sizes[name] = len(dataset_dicts(name))
        except Exception as e:  # noqa: BLE001 - recorded, see docstring
            sizes[name] = f"error: {type(e).__name__}: {e}"
    return sizes


def count_images(root: str) -> int | None:
    """Image files under a folder (ImageFolder sets); None when it is not a folder."""
    if not root or not os.path.isdir(root):
        return None
    return sum(
        name.lower().endswith(IMG_EXTENSIONS) for _, _, files in os.walk(root) for name in files
    )


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
    # Here, not at the top: comparability reads results files (utils.results -> stats -> here).
    from ..evaluation.comparability import config_values

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
