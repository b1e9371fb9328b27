"""Shared fixtures: a tiny synthetic demo set, its working directory, one intra-op thread.

What tests import (paths, tiny configs, the config builder) is in ``tests/helpers.py``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import bissl_det  # noqa: F401  (shims before detectron2)
from bissl_det.data.demo import make_demo_data
from bissl_det.utils.distributed import cores_each

import pytest
import torch


def pytest_configure(config):
    """Under pytest-xdist (``make test``) the workers share the cores: each, and every process it
    launches, gets cores / workers threads (OMP_NUM_THREADS, which the launcher respects)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = cores_each(workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


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


OTHER_PROCESS_MARKS = ("e2e", "dist", "slow")


@pytest.fixture(autouse=True)
def _other_processes_are_marked(request):
    """``make test-quick`` runs the tests that need this process only: a test that starts Python
    in another process (a tool, a launcher) says so with an ``e2e`` or ``dist`` mark."""
    if any(request.node.get_closest_marker(mark) for mark in OTHER_PROCESS_MARKS):
        yield
        return
    started, real_init = [], subprocess.Popen.__init__

    def spy(self, args, *rest, **kwargs):
        argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
        if argv and "python" in os.path.basename(str(argv[0])):
            started.append(" ".join(map(str, argv))[:160])
        real_init(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = spy
    try:
        yield
    finally:
        subprocess.Popen.__init__ = real_init
    if started:
        pytest.fail(f"started another Python process ({started[0]}): mark the test e2e or dist")
