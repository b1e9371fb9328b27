"""Shared fixtures: a tiny synthetic demo set, its working directory, one intra-op thread.

What tests import (paths, tiny configs, the config builder) is in ``tests/helpers.py``.
"""

from __future__ import annotations

from pathlib import Path

import bissl_det  # noqa: F401  (shims before detectron2)
from bissl_det.data.demo import make_demo_data

import pytest
import torch


@pytest.fixture(scope="session")
def demo_workdir(tmp_path_factory) -> Path:
    """A folder holding ``datasets/demo`` (tiny): configs' relative data paths resolve in it."""
    root = tmp_path_factory.mktemp("demo_work")
    make_demo_data(
        root / "datasets" / "demo",
        seed=0,
        num_train=24,
        num_test=8,
        image_size=64,
        num_cls_train=32,
        num_cls_test=16,
        cls_image_size=32,
    )
    return root


@pytest.fixture
def in_demo_workdir(demo_workdir, monkeypatch) -> Path:
    monkeypatch.chdir(demo_workdir)
    return demo_workdir


@pytest.fixture
def one_thread():
    """One intra-op thread: the tiny models gain nothing from more, and CI machines are shared
    (oversubscribed OpenMP threads slow a busy 2-core runner down many times)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
