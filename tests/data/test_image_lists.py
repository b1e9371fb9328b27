"""Pretext folders are listed as before (Path order), cached on disk, and shared from rank 0."""

from __future__ import annotations

import os
from pathlib import Path

from bissl_det.data.image_lists import (
    cache_file,
    compact_paths,
    image_list,
    path_at,
    sorted_unique,
)
from bissl_det.data.pretext import IMAGE_EXTENSIONS, find_images

import numpy as np
import pytest


def _tree(root: Path) -> None:
    for name in ("b/x.JPG", "a/deeper/y.png", "a-c/z.jpeg", "a/n.txt", "top.webp", "a/b.jpg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    (root / "linked").symlink_to(root / "b")  # not followed, as Path.rglob


def _rglob(root: Path) -> list[Path]:  # the listing find_images replaced
    return sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BISSL_DET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BISSL_DET_REFRESH_IMAGE_LISTS", raising=False)
    return tmp_path / "cache"


def test_find_images_lists_what_rglob_listed_in_path_order(tmp_path):
    _tree(tmp_path)
    assert find_images(tmp_path) == _rglob(tmp_path)
    # Path order: by components, so a/... before a-c/... (plain string order differs).
    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)] == [
        "a/b.jpg", "a/deeper/y.png", "a-c/z.jpeg", "b/x.JPG", "top.webp",
    ]  # fmt: skip


def test_cached_list_is_the_scan_and_follows_changes(tmp_path, cache, monkeypatch):
    root = tmp_path / "images"
    root.mkdir()
    _tree(root)
    scans = []

    def scan(folder):
        scans.append(folder)
        return find_images(folder)

    first = image_list(root, scan, min_cached=1)
    assert [path_at(first, i) for i in range(len(first))] == find_images(root)
    assert cache_file(root.resolve()).is_file() and len(scans) == 1
    # Another spelling of the same folder: the cache, with that spelling's prefix.
    monkeypatch.chdir(tmp_path)
    again = image_list("images", scan, min_cached=1)
    assert len(scans) == 1 and again.tolist() == [
        b"images/" + p[len(bytes(root)) + 1 :] for p in first.tolist()
    ]
    # A file added in a class folder changes that folder's time: rescanned.
    (root / "b" / "new.png").write_bytes(b"")
    assert os.fsencode(root / "b" / "new.png") in image_list(root, scan, min_cached=1).tolist()
    assert len(scans) == 2
    # Deeper changes are not seen: an explicit refresh rescans.
    (root / "a" / "deeper" / "late.png").write_bytes(b"")
    os.utime(root / "a", ns=(0, root.joinpath("a").stat().st_mtime_ns))  # unchanged stamp
    assert len(image_list(root, scan, min_cached=1)) == len(first) + 1
    monkeypatch.setenv("BISSL_DET_REFRESH_IMAGE_LISTS", "1")
    assert len(image_list(root, scan, min_cached=1)) == len(first) + 2
    assert len(scans) == 3
    # Small folders are not cached.
    other = tmp_path / "small"
    other.mkdir()
    (other / "one.png").write_bytes(b"")
    image_list(other, scan)
    assert not cache_file(other.resolve()).exists()


def test_compact_paths_and_union_order():
    a, b = compact_paths(["r/a-c/1.png", "r/a/2.png"]), compact_paths([Path("r/a/2.png"), "q.png"])
    assert a.dtype.kind == "S" and path_at(a, 1) == Path("r/a/2.png")
    union = sorted_unique([a, b])
    assert [path_at(union, i) for i in range(len(union))] == sorted(
        {Path("r/a-c/1.png"), Path("r/a/2.png"), Path("q.png")}
    )
    assert compact_paths(a) is a and isinstance(union, np.ndarray)


def test_a_relative_root_keeps_relative_paths(tmp_path, cache, monkeypatch):
    _tree(tmp_path)
    monkeypatch.chdir(tmp_path / "a")
    listed = image_list(".", find_images, min_cached=1)
    assert [path_at(listed, i) for i in range(len(listed))] == [Path("b.jpg"), Path("deeper/y.png")]
    assert image_list(".", find_images, min_cached=1).tolist() == listed.tolist()  # the cache
