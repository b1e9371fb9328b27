"""Pretext image folders listed once: a cached file list, compact in memory.

Listing ImageNet's 1.28M files (a walk plus a stat per file) takes minutes on a network file
system, and every process of every run did it. :func:`image_list` keeps the sorted list of a
folder in a cache file (``$BISSL_DET_CACHE``, default ``~/.cache/bissl_det``, under
``image_lists/``), keyed by the folder's resolved path and checked against a stamp: the
modification times of the folder and of its subfolders one level down (an ImageFolder's class
folders), which change when a file is added or removed directly in them. A change deeper down is
not seen: refresh with ``BISSL_DET_REFRESH_IMAGE_LISTS=1`` (rescans and rewrites) or delete the
file (the log names it). Folders with fewer than :data:`CACHE_MIN_FILES` images are listed
afresh every time (that takes well under a second).

Paths are held as one NumPy array of bytes (:func:`compact_paths`): one buffer instead of 1.28M
Python objects, which forked DataLoader workers would otherwise copy page by page as they touch
the objects' reference counts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

CACHE_MIN_FILES = 20_000
CACHE_FORMAT = 1


def cache_dir() -> Path:
    base = os.environ.get("BISSL_DET_CACHE") or Path.home() / ".cache" / "bissl_det"
    return Path(base) / "image_lists"


def compact_paths(paths: Iterable[str | os.PathLike]) -> np.ndarray:
    """``paths`` as a 1-D NumPy array of file-system bytes (``np.bytes_``), in their order."""
    if isinstance(paths, np.ndarray) and paths.dtype.kind == "S":
        return paths
    encoded = [os.fsencode(p) for p in paths]
    return np.array(encoded, dtype=np.bytes_) if encoded else np.array([], dtype="S1")


def path_at(paths: np.ndarray, index: int) -> Path:
    """Entry ``index`` of :func:`compact_paths`' array as a Path."""
    return Path(os.fsdecode(paths[index]))


def folder_stamp(root: Path) -> list[list]:
    """The folder's and its direct subfolders' modification times (ns), by name."""
    stamp = [[".", root.stat().st_mtime_ns]]
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.is_dir():
                stamp.append([entry.name, entry.stat().st_mtime_ns])
    return sorted(stamp)


def cache_file(root: Path) -> Path:
    key = hashlib.sha256(os.fsencode(root)).hexdigest()[:20]
    return cache_dir() / f"{root.name or 'root'}-{key}.npz"


def _read_cache(file: Path, root: Path, stamp: list) -> np.ndarray | None:
    try:
        with np.load(file, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta != {"format": CACHE_FORMAT, "root": os.fsdecode(root), "stamp": stamp}:
                return None
            return data["paths"]
    except (OSError, ValueError, KeyError) as e:
        logger.warning("image list cache %s unreadable (%s): rescanning", file, e)
        return None


def _write_cache(file: Path, root: Path, stamp: list, paths: np.ndarray) -> None:
    meta = json.dumps({"format": CACHE_FORMAT, "root": os.fsdecode(root), "stamp": stamp})
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        temporary = file.with_name(f"{file.name}.{os.getpid()}.tmp.npz")
        np.savez(temporary, paths=paths, meta=np.array(meta))
        os.replace(temporary, file)  # readers never see half a file
    except OSError as e:  # a read-only home: the list is still right, only not kept
        logger.warning("image list of %s not cached (%s)", root, e)


def image_list(
    root: str | Path, scan, min_cached: int = CACHE_MIN_FILES, refresh: bool | None = None
) -> np.ndarray:
    """The sorted image files under ``root`` (``scan(root)`` lists them), cached.

    The paths start with ``root`` as given (relative stays relative); the cache holds them
    relative to the folder, so one cache serves every spelling of its path.

    Args:
        scan: ``root`` -> sorted image paths (the uncached listing).
        min_cached: Lists shorter than this are not written to the cache.
        refresh: Rescan and rewrite; None reads ``BISSL_DET_REFRESH_IMAGE_LISTS``.
    """
    root = Path(root)
    if refresh is None:
        refresh = os.environ.get("BISSL_DET_REFRESH_IMAGE_LISTS", "") not in ("", "0")
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    resolved = root.resolve()
    stamp = folder_stamp(resolved)
    file = cache_file(resolved)
    relative = None
    if not refresh and file.is_file():
        relative = _read_cache(file, resolved, stamp)
        if relative is not None:
            logger.info("%d images of %s from the cache %s", len(relative), root, file)
    if relative is None:
        start = time.perf_counter()
        relative = compact_paths(_relative(os.fspath(p), root) for p in scan(root))
        seconds = time.perf_counter() - start
        if len(relative) >= min_cached:
            _write_cache(file, resolved, stamp, relative)
            logger.info(
                "%d images listed under %s in %.1f s; cached in %s "
                "(BISSL_DET_REFRESH_IMAGE_LISTS=1 rescans after a change below its subfolders)",
                len(relative),
                root,
                seconds,
                file,
            )
    prefix = b"" if str(root) == "." else os.fsencode(root) + os.fsencode(os.sep)
    return np.char.add(prefix, relative) if prefix else relative


def _relative(path: str, root: Path) -> str:
    start = os.path.join(os.fspath(root), "")
    # Slicing is many times faster than os.path.relpath (which resolves both per call).
    return path[len(start) :] if path.startswith(start) else os.path.relpath(path, root)


def sorted_unique(paths: Sequence[np.ndarray]) -> np.ndarray:
    """The union of several :func:`compact_paths` arrays, in Path order (as ``sorted(set(...))``
    of Paths: by path components, so "a/b" comes before "a-c")."""
    joined = np.concatenate(paths) if paths else np.array([], dtype="S1")
    unique = set(joined.tolist())
    return compact_paths(sorted(unique, key=lambda p: Path(os.fsdecode(p)).parts))
