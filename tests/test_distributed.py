"""Distributed helpers with real gloo processes: 2 processes x B/2 must equal 1 process x B.

Scaling checked here (see bissl_det.utils.distributed): each process differentiates its own local
loss (mean over local anchors, candidates gathered with gather_with_grad); the all-reduce MEAN of
the per-process gradients, and of the per-process Hessian-vector products (d/dtheta of
<grad local loss, v>), equals the gradient and HVP of the single-process loss on the full batch.
"""

from __future__ import annotations

from pathlib import Path

from bissl_det.modeling.pretext import SimCLR
from bissl_det.utils import distributed as du

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2
BATCH = 8


def make_model() -> SimCLR:
    # Norm-free: BatchNorm statistics are per process and would differ from the full batch.
    encoder = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    return SimCLR(encoder, feat_dim=4, projector_dims=(4, 3), temperature=0.5).double()


def loss_grad_hvp(model: SimCLR, v1, v2, vec):
    params = list(model.encoder.parameters())
    loss = model(v1, v2)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vec, strict=True))
    hvp = torch.autograd.grad(dot, params)
    return loss.detach(), [g.detach() for g in grads], list(hvp)


def _worker(rank: int, init_file: str, out_dir: str, payload: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        assert du.is_distributed() and du.world_size() == WORLD and du.rank() == rank
        model = make_model()
        model.load_state_dict(payload["state"])
        n = BATCH // WORLD
        v1 = payload["v1"][rank * n : (rank + 1) * n]
        v2 = payload["v2"][rank * n : (rank + 1) * n]

        loss, grads, hvp = loss_grad_hvp(model, v1, v2, payload["vec"])
        out = {
            "loss": du.all_reduce_mean([loss])[0],
            "grads": du.all_reduce_mean(grads),
            "hvp": du.all_reduce_mean(hvp),
        }
        model.zero_grad()
        model(v1, v2).backward()
        du.all_reduce_grads_(model.parameters())
        out["param_grads"] = [p.grad.clone() for p in model.parameters()]

        # Forward layout of the gather, and bucketed means over mixed dtypes.
        out["gathered"] = du.gather_with_grad(torch.full((2, 3), float(rank)))
        du._BUCKET_BYTES = 40  # force several buckets
        tensors = [
            torch.full((3,), float(rank)),
            torch.full((2, 2), 2.0 * rank, dtype=torch.float64),
            torch.full((5,), 4.0 * rank),
        ]
        du.all_reduce_mean_(tensors)
        out["means"] = tensors
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_two_processes_match_one(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = make_model()
    v1 = torch.randn(BATCH, 3, 6, 6, dtype=torch.float64)
    v2 = torch.randn(BATCH, 3, 6, 6, dtype=torch.float64)
    vec = [torch.randn_like(p) for p in model.encoder.parameters()]
    ref_loss, ref_grads, ref_hvp = loss_grad_hvp(model, v1, v2, vec)
    model.zero_grad()
    model(v1, v2).backward()
    ref_param_grads = [p.grad.clone() for p in model.parameters()]

    payload = {"state": model.state_dict(), "v1": v1, "v2": v2, "vec": vec}
    mp.spawn(
        _worker, args=(str(tmp_path / "init"), str(tmp_path), payload), nprocs=WORLD, join=True
    )
    for r in range(WORLD):
        out = torch.load(tmp_path / f"rank{r}.pt")
        torch.testing.assert_close(out["loss"], ref_loss, rtol=1e-12, atol=1e-12)
        for a, b in zip(out["grads"], ref_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for a, b in zip(out["hvp"], ref_hvp, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for a, b in zip(out["param_grads"], ref_param_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        expected = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat_interleave(3).view(4, 3)
        torch.testing.assert_close(out["gathered"], expected)
        for t, value in zip(out["means"], (0.5, 1.0, 2.0), strict=True):
            torch.testing.assert_close(t, torch.full_like(t, value))


def test_single_process_helpers_are_identities() -> None:
    assert not du.is_distributed() and du.world_size() == 1 and du.rank() == 0
    t = torch.randn(3, 2, requires_grad=True)
    assert du.gather_with_grad(t) is t
    before = t.detach().clone()
    out = du.all_reduce_mean([t])
    assert torch.equal(out[0], before) and out[0].data_ptr() != t.data_ptr()
    du.all_reduce_mean_([t.detach()])
    assert torch.equal(t.detach(), before)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        du.all_reduce_mean_([torch.ones(2, dtype=torch.long)])
