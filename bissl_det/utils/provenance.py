"""Facts about where a result came from that need no config: code version (git), file hashes,
package versions, host and time.

Every tool's ``results.json`` carries a provenance record under ``"provenance"`` and its units
under ``"units"`` (:func:`bissl_det.runtime.records.write_results`, which adds the config,
weights and data), so that a number found later in a folder can be traced to the exact code,
config, checkpoint and data that produced it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torchvision.datasets.folder import IMG_EXTENSIONS  # what data.images counts as images

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


def count_images(root: str) -> int | None:
    """Image files under a folder (ImageFolder sets); None when it is not a folder."""
    if not root or not os.path.isdir(root):
        return None
    return sum(
        name.lower().endswith(IMG_EXTENSIONS) for _, _, files in os.walk(root) for name in files
    )
