"""Reliability tests: bad input fails early and clearly, faults stop loudly, runs resume exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TINY_C4 = REPO / "configs" / "quick" / "test_tiny_C4.yaml"
TRAIN_BISSL = REPO / "tools" / "train_bissl.py"


def tiny_cfg(output_dir: Path, *opts: str, config_file: Path = TINY_C4):
    """The tools' set-up path (load_config + register_from_config), frozen, without logging."""
    from bissl_det.data.detection import register_from_config
    from bissl_det.engine.setup import check_output_dir, load_config

    cfg = load_config(str(config_file), ["OUTPUT_DIR", str(output_dir), *opts])
    register_from_config(cfg)
    cfg.freeze()
    check_output_dir(cfg.OUTPUT_DIR)
    return cfg


@pytest.fixture
def one_thread():
    """One intra-op thread: the tiny models gain nothing from more, and CI machines are shared
    (oversubscribed OpenMP threads slow a busy 2-core runner down many times)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
