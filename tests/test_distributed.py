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


def _replica_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(rank)  # as the tools seed: each rank initialises differently
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2, bias=False))
        model[1].running_mean.add_(rank)  # a buffer each rank updated from its own batch
        out = {"before": [t.clone() for t in model.state_dict().values()]}
        du.broadcast_module_(model)
        out["after"] = [t.clone() for t in model.state_dict().values()]
        du.check_replicas_identical(model)  # equal: passes on every rank
        with torch.no_grad():
            model[2].weight[0, 0] += rank * 1e-7  # one element, on rank 1 only
        try:
            du.check_replicas_identical(model, "after stage 4: ")
        except du.ReplicaMismatchError as err:
            out["error"] = str(err)
        model[1].running_var.add_(rank)
        du.broadcast_buffers_(model)
        out["buffers"] = [t.clone() for t in model.buffers()]
        flags = du.agreed_flags(rank == 1)
        grads = [torch.full((2,), float(rank))]
        du.all_reduce_mean_([*grads, flags])
        out["flagged"] = du.flagged_ranks(flags)
        out["grad"] = grads[0]
        torch.save(out, Path(out_dir) / f"replica{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_broadcast_and_replica_check(tmp_path: Path) -> None:
    mp.spawn(_replica_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    r0, r1 = (torch.load(tmp_path / f"replica{r}.pt") for r in range(WORLD))
    # Different seeds: the weights differed before the broadcast, and equal rank 0's after.
    assert not torch.equal(r0["before"][0], r1["before"][0])
    for a, b in zip(r1["after"], r0["before"], strict=True):
        assert torch.equal(a, b)
    for out in (r0, r1):  # every rank raises, naming the first differing tensor
        assert out["error"].startswith(
            "after stage 4: the model's copies differ across the 2 processes in 1 of 7 "
            "floating-point tensors, first '2.weight'"
        )
        assert out["flagged"] == [1]
        torch.testing.assert_close(out["grad"], torch.full((2,), 0.5))
    for a, b in zip(r1["buffers"], r0["buffers"], strict=True):
        assert torch.equal(a, b)


def _timeout_main(out_dir: str) -> None:
    import time

    if du.rank() == 1:
        time.sleep(120)  # a peer that hangs (terminated by the launcher once rank 0 fails)
    (Path(out_dir) / "waiting_since").write_text(str(time.time()))
    dist.all_reduce(torch.ones(1))


@pytest.mark.dist
def test_a_hung_peer_fails_the_collective_after_the_timeout(tmp_path, monkeypatch) -> None:
    """$BISSL_DIST_TIMEOUT reaches the launcher's process group: rank 0's collective fails after
    3 s, and the launcher ends the hung rank within its grace period."""
    import time

    from bissl_det.runtime.launch import launch

    monkeypatch.setenv(du.TIMEOUT_ENV, "3")
    grace_s = 2.0  # the hung rank sleeps 120 s: only the launcher ends it this early
    with pytest.raises(Exception, match="(?i)timed? ?out"):
        launch(_timeout_main, WORLD, dist_url="auto", args=(str(tmp_path),), grace_s=grace_s)
    waited = time.time() - float((tmp_path / "waiting_since").read_text())
    assert waited < 3 + grace_s + 15


def test_collective_timeout_from_the_environment(monkeypatch) -> None:
    monkeypatch.delenv(du.TIMEOUT_ENV, raising=False)
    assert du.collective_timeout().total_seconds() == du.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(du.TIMEOUT_ENV, "2.5")
    assert du.collective_timeout().total_seconds() == 2.5
    for bad in ("0", "-1", "ten"):
        monkeypatch.setenv(du.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match="BISSL_DIST_TIMEOUT"):
            du.collective_timeout()


def test_launched_processes_share_the_cores(monkeypatch) -> None:
    from bissl_det.runtime.launch import threads_per_process

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    assert [threads_per_process(n) for n in (1, 8, 64, 100)] == [64, 8, 1, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's choice stands
    assert threads_per_process(8) is None


# ---- The Fisher history sharded across processes ------------------------------------------------

FISHER_SHAPES = [(3, 4), (5,)]  # 17 coordinates: 9 + 8 columns, the last slice padded
FISHER_APPENDS = 5  # history 3: the ring wraps


def _local_gradients(rank: int) -> list[tuple[torch.Tensor, ...]]:
    """What rank ``rank`` computes from its own data: its seed's draws, as the tools seed ranks."""
    torch.manual_seed(1000 + rank)
    return [
        tuple(torch.randn(s, dtype=torch.float64) for s in FISHER_SHAPES)
        for _ in range(FISHER_APPENDS)
    ]


def _fisher_worker(rank: int, init_file: str, out_dir: str, b: tuple) -> None:
    from bissl_det.bilevel import EmpiricalFisherCurvature
    from bissl_det.engine.checkpointer import AtomicCheckpointer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        fisher = EmpiricalFisherCurvature(history_size=3, device="cpu")
        for local in _local_gradients(rank):
            fisher.append(du.all_reduce_mean(local))  # as the trainer: averaged, then appended
        out = {
            "solve": fisher.solve_damped(b, 0.7),
            "matvec": fisher.matvec(b),
            "history": fisher.history(),
            "gram": fisher.state_dict()["gram"].clone(),
            "shard_state": fisher.state_dict(),  # this rank's columns only
        }
        # A checkpoint through the trainer's checkpointer: rank 0 writes the whole history.
        model = nn.Linear(2, 2)
        AtomicCheckpointer(model, out_dir, fisher_history=fisher).save("model_final")
        dist.barrier()
        restored = EmpiricalFisherCurvature(history_size=3, device="cpu")
        AtomicCheckpointer(model, out_dir, fisher_history=restored).load(
            str(Path(out_dir) / "model_final.pth")
        )
        out["restored_solve"] = restored.solve_damped(b, 0.7)
        torch.save(out, Path(out_dir) / f"fisher{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_sharded_fisher_two_processes_match_one(tmp_path: Path) -> None:
    from bissl_det.bilevel import EmpiricalFisherCurvature

    gen = torch.Generator().manual_seed(3)
    b = tuple(torch.randn(s, generator=gen, dtype=torch.float64) for s in FISHER_SHAPES)
    reference = EmpiricalFisherCurvature(history_size=3, device="cpu")
    for grads in zip(*(_local_gradients(r) for r in range(WORLD)), strict=True):
        reference.append(tuple(sum(g) / WORLD for g in zip(*grads, strict=True)))
    expected = {
        "solve": reference.solve_damped(b, 0.7),
        "matvec": reference.matvec(b),
    }
    mp.spawn(_fisher_worker, args=(str(tmp_path / "init"), str(tmp_path), b), nprocs=WORLD)
    outs = [torch.load(tmp_path / f"fisher{r}.pt") for r in range(WORLD)]
    tol = {"rtol": 1e-12, "atol": 1e-12}
    for out in outs:
        for key in ("solve", "matvec", "restored_solve"):
            want = expected["solve" if key == "restored_solve" else key]
            for x, y in zip(out[key], want, strict=True):
                torch.testing.assert_close(x, y, **tol)
        torch.testing.assert_close(out["gram"], reference.state_dict()["gram"], **tol)
        for held, ref in zip(out["history"], reference.history(), strict=True):
            for x, y in zip(held, ref, strict=True):
                torch.testing.assert_close(x, y, **tol)
    # Each rank held 9 of the 17 columns (rank 1: 8 and a padding column), not all of them.
    assert [o["shard_state"]["columns"] for o in outs] == [(0, 9), (9, 17)]
    assert [tuple(o["shard_state"]["slots"].shape) for o in outs] == [(3, 9), (3, 8)]
    # The checkpoint holds the whole history: one process resumes from it exactly ...
    saved = torch.load(tmp_path / "model_final.pth", weights_only=False)["fisher_history"]
    assert saved["columns"] is None and tuple(saved["slots"].shape) == (3, 17)
    one = EmpiricalFisherCurvature(history_size=3)
    one.load_state_dict(saved)
    for x, y in zip(one.solve_damped(b, 0.7), expected["solve"], strict=True):
        torch.testing.assert_close(x, y, **tol)
    # ... and one rank's shard alone is refused, not read as the whole history.
    with pytest.raises(ValueError, match=r"columns \(9, 17\).*needs \(0, 17\)"):
        EmpiricalFisherCurvature(history_size=3).load_state_dict(outs[1]["shard_state"])
