"""naiveSyncBN statistics in float32 under bf16 autocast: 2 real gloo processes, ranks seeded
differently (each sees its own activations, as in training)."""

from __future__ import annotations

from pathlib import Path

import bissl_det  # noqa: F401  (compat shims before detectron2)
from bissl_det.modeling.sync_bn import Float32StatsSyncBatchNorm, use_float32_sync_bn_statistics

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.layers import NaiveSyncBatchNorm
from torch import nn

WORLD, CHANNELS = 2, 4


def _statistics(bn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Output, batch mean and batch variance of one training forward (from the running
    statistics: zero mean / unit variance start, momentum 1 stores the batch's)."""
    bn.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bn(x)
    return out.float(), bn.running_mean.clone(), bn.running_var.clone()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(1000 + rank)  # different activations per rank
        # A large mean against a small spread: E[x^2] - E[x]^2 cancels 3 of bf16's 3 digits.
        x = (8.0 + 0.05 * torch.randn(6, CHANNELS, 5, 5)).bfloat16()

        def fresh(cls) -> nn.Module:
            bn = cls(CHANNELS, momentum=1.0)
            with torch.no_grad():
                bn.weight.copy_(torch.linspace(0.5, 2.0, CHANNELS))
                bn.bias.copy_(torch.linspace(-1.0, 1.0, CHANNELS))
            return bn

        model = nn.Sequential(fresh(NaiveSyncBatchNorm))
        assert use_float32_sync_bn_statistics(model) == 1
        assert type(model[0]) is Float32StatsSyncBatchNorm
        results = {
            "bf16_ours": _statistics(model[0], x),
            # fp32 reference: the same values, upcast before they reach the layer.
            "fp32": _statistics(fresh(NaiveSyncBatchNorm), x.float()),
            "bf16_detectron2": _statistics(fresh(NaiveSyncBatchNorm), x),
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_bf16_sync_bn_statistics_equal_fp32_on_two_processes(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for res in ranks:
        (out, mean, var), (ref_out, ref_mean, ref_var) = res["bf16_ours"], res["fp32"]
        torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(var, ref_var, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(out, ref_out.bfloat16().float(), rtol=0, atol=0)
        # Detectron2's own layer on the bf16 input misses the variance (the test can fail).
        assert (res["bf16_detectron2"][2] - ref_var).abs().max() > 0.1 * ref_var.max()
    # Synchronised: both ranks hold the statistics of the union of their batches.
    torch.testing.assert_close(ranks[0]["bf16_ours"][1], ranks[1]["bf16_ours"][1])
    assert not torch.equal(ranks[0]["fp32"][0], ranks[1]["fp32"][0])  # different activations


def test_swap_keeps_parameters_and_skips_other_norms() -> None:
    model = nn.Sequential(NaiveSyncBatchNorm(3), nn.BatchNorm2d(3), NaiveSyncBatchNorm(3))
    keys = list(model.state_dict())
    assert use_float32_sync_bn_statistics(model) == 2
    assert [type(m).__name__ for m in model] == [
        "Float32StatsSyncBatchNorm",
        "BatchNorm2d",
        "Float32StatsSyncBatchNorm",
    ]
    assert list(model.state_dict()) == keys
    x = torch.randn(2, 3, 4, 4)  # one process: plain BN, float32 input unchanged
    model.train()
    assert model(x).dtype == torch.float32


def test_bissl_upper_level_gets_float32_statistics() -> None:
    from bissl_det.runtime.setup import load_config
    from tests.helpers import NARROW_RESNET, TINY_C4

    from detectron2.modeling import build_model

    cfg = load_config(str(TINY_C4), ["MODEL.DEVICE", "cpu", *NARROW_RESNET])
    cfg.MODEL.RESNETS.NORM = "naiveSyncBN"
    kinds = {type(m) for m in build_model(cfg).upper.modules()}
    assert Float32StatsSyncBatchNorm in kinds and NaiveSyncBatchNorm not in kinds
