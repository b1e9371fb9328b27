"""Multi-process ``--resume`` restores each rank's own RNG state, not rank 0's on every rank."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _draws() -> torch.Tensor:
    """One number from each generator an augmentation may use."""
    return torch.tensor(
        [torch.rand(()).item(), float(np.random.rand()), random.random()], dtype=torch.float64
    )


def _checkpointer(out_dir: str):
    from bissl_det.engine.checkpointer import AtomicCheckpointer, TrainingProgress

    progress = TrainingProgress()
    return AtomicCheckpointer(torch.nn.Linear(2, 2), out_dir, progress=progress), progress


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from detectron2.utils import comm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        comm.synchronize()
        # Each rank's own stream, as detectron2's default_setup seeds them (seed + rank).
        torch.manual_seed(10 + rank)
        np.random.seed(10 + rank)
        random.seed(10 + rank)
        _draws()
        checkpointer, progress = _checkpointer(out_dir)
        progress.pretext_batches = 3
        checkpointer.save("model_0000000", iteration=0)  # collective: every rank calls it
        expected = torch.stack([_draws() for _ in range(3)])

        torch.manual_seed(999)  # a fresh process would start elsewhere
        np.random.seed(999)
        random.seed(999)
        comm.synchronize()
        checkpointer, progress = _checkpointer(out_dir)
        checkpointer.resume_or_load("", resume=True)
        resumed = torch.stack([_draws() for _ in range(3)])
        torch.save(
            {"expected": expected, "resumed": resumed, "batches": progress.pretext_batches},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_each_rank_resumes_its_own_random_stream(tmp_path):
    mp.start_processes(
        _worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, start_method="spawn"
    )
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for result in results:
        torch.testing.assert_close(result["resumed"], result["expected"], rtol=0, atol=0)
        assert result["batches"] == 3
    # The ranks' streams differ, so restoring rank 0's everywhere would have failed above.
    assert not torch.equal(results[0]["expected"], results[1]["expected"])
    checkpoint = torch.load(tmp_path / "model_0000000.pth", weights_only=True)
    per_rank = checkpoint["progress"]["rank_rng"]
    assert len(per_rank) == WORLD
    assert not torch.equal(per_rank[0]["torch_rng"], per_rank[1]["torch_rng"])
    # Rank 0's entry is the top-level state single-process resumes use, unchanged.
    assert torch.equal(per_rank[0]["torch_rng"], checkpoint["progress"]["torch_rng"])


def test_single_process_checkpoint_in_a_multi_process_run_warns(caplog, monkeypatch):
    """A checkpoint with one RNG state (older, or another world size) is said to be inexact."""
    import logging

    from bissl_det.engine import checkpointer as module

    progress = module.TrainingProgress()
    state = progress.state_dict()
    assert "rank_rng" not in state  # single process: the format is unchanged
    monkeypatch.setattr(module.comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(module.comm, "get_rank", lambda: 1)
    torch.manual_seed(5)
    with caplog.at_level(logging.WARNING, logger=module.__name__):
        progress.load_state_dict(state)
    assert "every rank restarts from rank 0's state" in caplog.text


@pytest.mark.dist
@pytest.mark.slow
def test_two_process_pretraining_saves_every_rank_and_resumes(in_demo_workdir, tmp_path):
    """The real tool on 2 gloo processes: the collective save neither hangs nor loses a rank."""
    import subprocess
    import sys

    from tests.helpers import CONFIGS, NARROW_RESNET, REPO

    def run(iters: int, *extra: str) -> None:
        proc = subprocess.run(
            [sys.executable, str(REPO / "tools" / "pretrain_ssl.py"), "--num-gpus", "2",
             "--config-file", str(CONFIGS / "quick" / "pretrain_simclr_demo.yaml"), *extra,
             *NARROW_RESNET, "PRETRAIN.IMS_PER_BATCH", "8", "PRETRAIN.ITERS", str(iters),
             "PRETRAIN.CHECKPOINT_PERIOD", "1", "BISSL.PRETEXT_DATA.AUG.CROP_SIZE", "32",
             "SEED", "3", "OUTPUT_DIR", str(tmp_path)],
            cwd=in_demo_workdir, capture_output=True, text=True, timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(2)
    per_rank = torch.load(tmp_path / "model_0000000.pth", weights_only=True)["progress"]
    assert len(per_rank["rank_rng"]) == WORLD
    assert not torch.equal(
        per_rank["rank_rng"][0]["torch_rng"], per_rank["rank_rng"][1]["torch_rng"]
    )
    run(3, "--resume", "--overwrite")  # a longer schedule: another run identity, deliberately
    assert "Resuming pretraining at step 2" in (tmp_path / "log.txt").read_text()
    assert "every rank restarts from rank 0's state" not in (tmp_path / "log.txt").read_text()
