"""Stage curvatures: Gauss-Newton against a dense J^T H_out J and the Hessian, symmetry and PSD
on real narrow ResNets, the Fisher's Woodbury solve against linalg.solve, its ring buffer, and
2 gloo processes x B/2 == 1 process x B."""

from __future__ import annotations

from pathlib import Path

from bissl_det.bilevel import (
    EmpiricalFisherCurvature,
    GaussNewtonCurvature,
    HessianCurvature,
    conjugate_gradient,
    damped_matvec,
    implicit_gradient,
    pretext_curvature,
    scratch_buffers,
    tuple_cosine,
    tuple_dot,
)
from bissl_det.modeling.backbone import PooledEncoder, build_resnet_trunk
from bissl_det.modeling.pretext import SimCLR
from bissl_det.modeling.pretext_tasks import build_pretext_model
from bissl_det.runtime.setup import load_config
from bissl_det.utils.distributed import all_reduce_mean
from tests.bilevel.tensors import DT, flatten, random_like, unflatten
from tests.helpers import NARROW_RESNET, TINY_C4

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

# ---------------------------------------------------- Gauss-Newton against closed forms


def tiny_mlp(theta, x):
    w1, b1, w2 = theta
    return torch.tanh(x @ w1.T + b1) @ w2.T


def test_ggn_matches_dense_jacobian_reference():
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 3), (6,), (4, 6)]
    theta = tuple(torch.randn(s, generator=gen, dtype=DT, requires_grad=True) for s in shapes)
    x = torch.randn(5, 3, generator=gen, dtype=DT)
    labels = torch.randint(0, 4, (5,), generator=gen)

    def loss_of_outputs(out):
        return F.cross_entropy(out, labels)

    outputs = tiny_mlp(theta, x)
    ggn = GaussNewtonCurvature(outputs, loss_of_outputs, theta)
    assert ggn.loss.item() == pytest.approx(loss_of_outputs(outputs).item(), rel=1e-14)

    flat0 = flatten(theta).detach()
    jac = torch.autograd.functional.jacobian(
        lambda f: tiny_mlp(unflatten(f, theta), x).reshape(-1), flat0
    )
    h_out = torch.autograd.functional.hessian(
        lambda o: loss_of_outputs(o.reshape(5, 4)), outputs.detach().reshape(-1)
    )
    dense = jac.T @ h_out @ jac
    for _ in range(3):
        v = random_like(theta, gen)
        torch.testing.assert_close(
            flatten(ggn.matvec(v)), dense @ flatten(v), rtol=1e-10, atol=1e-13
        )
    assert ggn.products == 3
    # It is not the Hessian here (tanh is curved), or this test could not tell them apart.
    hess = torch.autograd.functional.hessian(
        lambda f: loss_of_outputs(tiny_mlp(unflatten(f, theta), x)), flat0
    )
    assert (hess - dense).norm() > 1e-2 * dense.norm()
    ggn.release()
    with pytest.raises(RuntimeError, match="released"):
        ggn.matvec(v)


def test_ggn_with_forward_mode_jv_matches_the_dense_reference():
    gen = torch.Generator().manual_seed(0)
    theta = tuple(torch.randn(s, generator=gen, dtype=DT, requires_grad=True)
                  for s in [(6, 3), (6,), (4, 6)])  # fmt: skip
    x = torch.randn(5, 3, generator=gen, dtype=DT)
    labels = torch.randint(0, 4, (5,), generator=gen)
    primals = tuple(t.detach() for t in theta)

    def jvp(v):
        return torch.func.jvp(lambda *t: tiny_mlp(t, x), primals, tuple(v))[1]

    def loss_of_outputs(out):
        return F.cross_entropy(out, labels)

    ggn = GaussNewtonCurvature(tiny_mlp(theta, x), loss_of_outputs, theta, jvp=jvp)
    jac = torch.autograd.functional.jacobian(
        lambda f: tiny_mlp(unflatten(f, theta), x).reshape(-1), flatten(theta).detach()
    )
    h_out = torch.autograd.functional.hessian(
        lambda o: loss_of_outputs(o.reshape(5, 4)), tiny_mlp(primals, x).reshape(-1)
    )
    v = random_like(theta, gen)
    torch.testing.assert_close(
        flatten(ggn.matvec(v)), jac.T @ h_out @ jac @ flatten(v), rtol=1e-10, atol=1e-13
    )


def test_ggn_equals_hessian_for_a_model_linear_in_its_parameters():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4, 3, generator=gen, dtype=DT, requires_grad=True)
    b = torch.randn(3, generator=gen, dtype=DT, requires_grad=True)
    x = torch.randn(7, 4, generator=gen, dtype=DT)
    labels = torch.randint(0, 3, (7,), generator=gen)
    hessian = HessianCurvature(F.cross_entropy(x @ w + b, labels), (w, b))
    ggn = GaussNewtonCurvature(x @ w + b, lambda out: F.cross_entropy(out, labels), (w, b))
    for _ in range(3):
        v = random_like((w, b), gen)
        torch.testing.assert_close(
            flatten(ggn.matvec(v)), flatten(hessian.matvec(v)), rtol=1e-12, atol=1e-14
        )


def test_ggn_unused_parameter_and_linear_loss_give_zeros():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(3, 2, generator=gen, dtype=DT, requires_grad=True)
    unused = torch.randn(5, dtype=DT, requires_grad=True)
    x = torch.randn(4, 3, generator=gen, dtype=DT)
    v = (torch.ones(3, 2, dtype=DT), torch.ones(5, dtype=DT))
    out = GaussNewtonCurvature(torch.tanh(x @ w), lambda o: o.pow(2).sum(), (w, unused)).matvec(v)
    assert torch.equal(out[1], torch.zeros(5, dtype=DT)) and out[0].abs().sum() > 0
    linear = GaussNewtonCurvature(torch.tanh(x @ w), lambda o: o.sum(), (w, unused)).matvec(v)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in linear)
    with pytest.raises(ValueError, match="scalar"):
        GaussNewtonCurvature(x @ w, lambda o: o.sum(0), (w,))
    with torch.no_grad():
        frozen = x @ w
    with pytest.raises(ValueError, match="do not require grad"):
        GaussNewtonCurvature(frozen, lambda o: o.sum(), (w,))


# ---------------------------------------------------- real (narrow) ResNet pretext models


def narrow_pretext_model(pretext: str, *opts: str) -> nn.Module:
    cfg = load_config(str(TINY_C4), ["MODEL.DEVICE", "cpu", *NARROW_RESNET, *opts])
    cfg.MODEL.BISSL.PRETEXT = pretext
    torch.manual_seed(0)
    model = build_pretext_model(cfg, PooledEncoder(build_resnet_trunk(cfg, norm="BN")))
    return model.double().train()


@pytest.mark.parametrize("pretext", ["simclr", "byol"])
def test_ggn_symmetric_psd_on_narrow_resnet(pretext):
    model = narrow_pretext_model(pretext)
    gen = torch.Generator().manual_seed(3)
    views = tuple(torch.randn(4, 3, 32, 32, generator=gen, dtype=DT) for _ in range(2))
    params = tuple(model.encoder.parameters())
    buffers = [b.clone() for b in model.buffers()]

    ggn = pretext_curvature("ggn", model, views, params)
    # The split loss is the pretext loss (same batch statistics: train mode).
    with scratch_buffers(model):
        reference = model(*views).item()
    assert ggn.loss.item() == pytest.approx(reference, rel=1e-12)
    hessian = pretext_curvature("hessian", model, views, params)
    u, v = random_like(params, gen), random_like(params, gen)
    gu, gv = ggn.matvec(u), ggn.matvec(v)
    assert tuple_dot(u, gv).item() == pytest.approx(tuple_dot(v, gu).item(), rel=1e-9)
    for w in (u, v, *(random_like(params, gen) for _ in range(3))):
        assert tuple_dot(w, ggn.matvec(w)).item() >= 0.0
    assert ggn.products == 7
    # The Hessian is symmetric too but not the same matrix.
    hu = hessian.matvec(u)
    assert tuple_dot(v, hu).item() == pytest.approx(
        tuple_dot(u, hessian.matvec(v)).item(), rel=1e-9
    )
    assert abs(tuple_dot(u, hu).item() - tuple_dot(u, gu).item()) > 1e-6 * abs(
        tuple_dot(u, gu).item()
    )
    ggn.release()
    hessian.release()
    # Building the products moved no BN statistics (nor a BYOL target).
    for before, after in zip(buffers, model.buffers(), strict=True):
        assert torch.equal(before, after)


CUDA = pytest.param(
    "cuda",
    marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ],
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("pretext", ["simclr", "byol"])
def test_forward_mode_jv_gives_the_double_backward_products(pretext, device):
    """BISSL.HYPERGRAD.GGN_JV "forward": the same matrix on a real ResNet with BatchNorm in
    training mode (batch statistics), and no BN statistic or BYOL target moved."""
    model = narrow_pretext_model(pretext).to(device)
    gen = torch.Generator().manual_seed(3)
    views = tuple(torch.randn(4, 3, 32, 32, generator=gen, dtype=DT).to(device) for _ in range(2))
    params = tuple(model.encoder.parameters())
    buffers = [b.clone() for b in model.buffers()]
    backward = pretext_curvature("ggn", model, views, params, jv="double_backward")
    forward = pretext_curvature("ggn", model, views, params, jv="forward")
    for _ in range(2):
        v = tuple(t.to(device) for t in random_like(params, gen))
        expected = flatten(backward.matvec(v))
        assert (flatten(forward.matvec(v)) - expected).norm() <= 1e-10 * expected.norm()
    assert expected.norm() > 0 and forward.products == 2
    for before, after in zip(buffers, model.buffers(), strict=True):
        assert torch.equal(before, after)
    with pytest.raises(ValueError, match="jv = 'fwd'"):
        pretext_curvature("ggn", model, views, params, jv="fwd")
    with pytest.raises(ValueError, match="not parameters of the pretext model"):
        pretext_curvature("ggn", model, views, (torch.zeros(2, requires_grad=True),), jv="forward")


def test_pretext_curvature_rejects_unknown_kind_and_missing_method():
    model = nn.Linear(2, 1)
    x = (torch.randn(3, 2),)
    with pytest.raises(ValueError, match="unknown stage curvature 'fishr'"):
        pretext_curvature("fishr", model, x, tuple(model.parameters()))
    with pytest.raises(ValueError, match="'fisher' is not built from a batch"):
        pretext_curvature("fisher", model, x, tuple(model.parameters()))
    with pytest.raises(ValueError, match="no ggn_outputs"):
        pretext_curvature("ggn", model, x, tuple(model.parameters()))


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_stage_curvature_solves_like_its_plain_products(kind):
    model = narrow_pretext_model("simclr")
    gen = torch.Generator().manual_seed(4)
    views = tuple(torch.randn(4, 3, 32, 32, generator=gen, dtype=DT) for _ in range(2))
    params = tuple(model.encoder.parameters())
    g = random_like(params, gen)
    curvature = pretext_curvature(kind, model, views, params)
    x_new, info_new = implicit_gradient(curvature, g, lam=1e-3, damping=10.0, max_iter=4)
    used = curvature.products
    # The same system assembled by hand: the damped operator and plain CG.
    x_old, _ = conjugate_gradient(damped_matvec(curvature.matvec, 1e-3, 10.0), g, max_iter=4)
    torch.testing.assert_close(flatten(x_new), flatten(x_old), rtol=1e-12, atol=1e-14)
    assert info_new.products == used == info_new.iterations and info_new.solve_info is not None
    assert info_new.cosine == pytest.approx(tuple_cosine(x_old, g).item(), rel=1e-12)
    if kind == "ggn":  # PSD: CG runs all its iterations (the random-init Hessian may not)
        assert used == 4
    with pytest.raises(ValueError, match="exact damped solve"):
        implicit_gradient(curvature, g, solver="direct")


# ---------------------------------------------------- empirical Fisher


def test_fisher_woodbury_solve_and_matvec_equal_dense_algebra():
    gen = torch.Generator().manual_seed(5)
    like = (torch.empty(3, 4, dtype=DT), torch.empty(5, dtype=DT))
    fisher = EmpiricalFisherCurvature(history_size=4, device=None)
    grads = [random_like(like, gen) for _ in range(6)]  # wraps around: keeps grads[2:]
    for g in grads:
        fisher.append(g)
    assert len(fisher) == 4 and fisher.appended == 6
    kept = torch.stack([flatten(g) for g in grads[2:]])
    for held, expected in zip(fisher.history(), grads[2:], strict=True):
        torch.testing.assert_close(flatten(held), flatten(expected), rtol=0, atol=0)
    dense = kept.T @ kept / 4
    b = random_like(like, gen)
    for scale in (1e-3, 0.1, 1e3):
        expected = torch.linalg.solve(torch.eye(17, dtype=DT) + scale * dense, flatten(b))
        torch.testing.assert_close(
            flatten(fisher.solve_damped(b, scale)), expected, rtol=1e-10, atol=1e-12
        )
    torch.testing.assert_close(
        flatten(fisher.matvec(b)), dense @ flatten(b), rtol=1e-12, atol=1e-13
    )
    # The direct implicit gradient is that solve, with a true residual of rounding size.
    x, info = implicit_gradient(
        fisher, b, lam=0.5, damping=1.5, solver="direct", check_residual=True
    )
    torch.testing.assert_close(
        flatten(x), torch.linalg.solve(torch.eye(17, dtype=DT) + dense / 2.0, flatten(b))
    )
    assert info.converged and info.residual_norm < 1e-12 and info.products == 1
    # ... and CG on the same SPD operator agrees (rank 4: 5 iterations are exact).
    x_cg, _ = implicit_gradient(fisher, b, lam=0.5, damping=1.5, max_iter=5)
    torch.testing.assert_close(flatten(x_cg), flatten(x), rtol=1e-9, atol=1e-12)


def test_fisher_gram_kept_incrementally_and_state_round_trip():
    gen = torch.Generator().manual_seed(6)
    like = (torch.empty(7, dtype=DT),)
    fisher = EmpiricalFisherCurvature(history_size=3, device="cpu")
    for _ in range(5):
        fisher.append(random_like(like, gen))
        rows = torch.stack([flatten(g) for g in fisher.history()])
        held = len(fisher)
        gram = fisher.state_dict()["gram"][:held, :held]
        slots = fisher.state_dict()["slots"][:held]
        torch.testing.assert_close(gram, slots @ slots.T, rtol=1e-14, atol=1e-14)
        assert rows.shape[0] == held
    restored = EmpiricalFisherCurvature(history_size=3)
    restored.load_state_dict(fisher.state_dict())
    b = random_like(like, gen)
    torch.testing.assert_close(restored.solve_damped(b, 0.7), fisher.solve_damped(b, 0.7))
    with pytest.raises(ValueError, match="history_size 3 != configured 4"):
        EmpiricalFisherCurvature(history_size=4).load_state_dict(fisher.state_dict())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fisher_on_the_model_device_returns_there_after_a_resume():
    """FISHER_DEVICE "model": a checkpoint loads onto the CPU; the history follows the gradients
    back to the GPU instead of being read across devices at every product."""
    gen = torch.Generator().manual_seed(6)
    like = (torch.empty(7, dtype=DT),)
    fisher = EmpiricalFisherCurvature(history_size=3, device=None)
    for _ in range(3):
        fisher.append(tuple(t.cuda() for t in random_like(like, gen)))
    state = {k: v.cpu() if torch.is_tensor(v) else v for k, v in fisher.state_dict().items()}
    restored = EmpiricalFisherCurvature(history_size=3, device=None)
    restored.load_state_dict(state)
    b = tuple(t.cuda() for t in random_like(like, gen))
    torch.testing.assert_close(restored.solve_damped(b, 0.7), fisher.solve_damped(b, 0.7))
    assert restored.state_dict()["slots"].is_cuda and restored.state_dict()["gram"].is_cuda


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fisher_history_on_the_host_is_pinned_for_cuda_gradients():
    """FISHER_DEVICE "cpu" with CUDA gradients: page-locked host memory (fast copies), also
    after a resume, and the same solve as a history on the device."""
    gen = torch.Generator().manual_seed(8)
    like = (torch.empty(3, 4, dtype=DT), torch.empty(5, dtype=DT))
    grads = [tuple(t.cuda() for t in random_like(like, gen)) for _ in range(3)]
    host, device = (EmpiricalFisherCurvature(3, device=d) for d in ("cpu", None))
    for g in grads:
        host.append(g)
        device.append(g)
    assert host.state_dict()["slots"].is_pinned()
    b = tuple(t.cuda() for t in random_like(like, gen))
    for x, y in zip(host.solve_damped(b, 0.7), device.solve_damped(b, 0.7), strict=True):
        assert x.is_cuda
        torch.testing.assert_close(x, y)
    state = {k: v.cpu() if torch.is_tensor(v) else v for k, v in host.state_dict().items()}
    restored = EmpiricalFisherCurvature(3, device="cpu")
    restored.load_state_dict(state)
    restored.matvec(b)  # the first product with CUDA vectors pins the restored history
    assert restored.state_dict()["slots"].is_pinned()


def test_fisher_solve_with_parallel_float32_gradients():
    # Identical gradients: a rank-1 Gram matrix whose float32 rounding is not exactly PSD.
    gen = torch.Generator().manual_seed(9)
    g = 30.0 * torch.randn(100_000, generator=gen)
    b = torch.randn(100_000, generator=gen)
    fisher = EmpiricalFisherCurvature(history_size=20)
    for _ in range(20):
        fisher.append((g,))
    for scale in (0.1, 1e3):  # F = g g^T; Sherman-Morrison in float64 as the reference
        gd, bd = g.double(), b.double()
        expected = bd - scale * gd * (gd @ bd) / (1 + scale * gd @ gd)
        (x,) = fisher.solve_damped((b,), scale)
        assert x.dtype == torch.float32
        assert (x.double() - expected).norm() < 1e-5 * expected.norm()


def test_fisher_rejects_bad_input():
    fisher = EmpiricalFisherCurvature(history_size=2)
    with pytest.raises(RuntimeError, match="history is empty"):
        fisher.solve_damped((torch.ones(3),), 1.0)
    fisher.append((torch.ones(3),))
    with pytest.raises(ValueError, match="shapes"):
        fisher.append((torch.ones(4),))
    with pytest.raises(ValueError, match="scale must be > 0"):
        fisher.solve_damped((torch.ones(3),), 0.0)
    with pytest.raises(FloatingPointError, match="non-finite"):
        fisher.append((torch.tensor([1.0, float("nan"), 0.0]),))
    with pytest.raises(ValueError, match="history_size"):
        EmpiricalFisherCurvature(history_size=0)


# ---------------------------------------------------- distributed (gloo, 2 processes)

WORLD, BATCH = 2, 8


def dist_model() -> SimCLR:
    # Norm-free: BatchNorm statistics are per process and would differ from the full batch.
    torch.manual_seed(0)
    encoder = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    return SimCLR(encoder, feat_dim=4, projector_dims=(4, 3), temperature=0.5).double()


def dist_payload():
    gen = torch.Generator().manual_seed(7)
    model = dist_model()
    params = tuple(model.encoder.parameters())
    views = [torch.randn(3, 2, BATCH, 3, 6, 6, generator=gen, dtype=DT)]  # (step, view, batch)
    return {"views": views[0], "vec": random_like(params, gen)}


def curvature_results(model, views_of_steps, rows, vec, all_reduce):
    """G v on step 0's batch; Fisher (3 lower-step gradients) solve of vec."""
    params = tuple(model.encoder.parameters())
    batch = tuple(views_of_steps[0, :, rows])
    ggn = pretext_curvature("ggn", model, batch, params, all_reduce, jv="double_backward")
    # Forward mode: the tangents cross processes through the gather's jvp.
    ggn_forward = pretext_curvature("ggn", model, batch, params, all_reduce, jv="forward")
    fisher = EmpiricalFisherCurvature(history_size=3)
    for step in range(views_of_steps.shape[0]):
        grads = torch.autograd.grad(model(*views_of_steps[step, :, rows]), params)
        fisher.append(grads if all_reduce is None else all_reduce(grads))
    return (
        flatten(ggn.matvec(vec)),
        flatten(fisher.solve_damped(vec, 10.0)),
        flatten(ggn_forward.matvec(vec)),
    )


def _dist_worker(rank, init_file, out_dir, payload):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        n = BATCH // WORLD
        rows = slice(rank * n, (rank + 1) * n)
        out = curvature_results(
            dist_model(), payload["views"], rows, payload["vec"], all_reduce_mean
        )
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_two_processes_half_batch_equal_one_process_full_batch(tmp_path):
    payload = dist_payload()
    mp.spawn(
        _dist_worker, args=(str(tmp_path / "init"), str(tmp_path), payload), nprocs=WORLD, join=True
    )
    ggn, fisher, ggn_forward = curvature_results(
        dist_model(), payload["views"], slice(0, BATCH), payload["vec"], None
    )
    assert ggn.norm() > 0 and (fisher - flatten(payload["vec"])).norm() > 1e-3 * fisher.norm()
    torch.testing.assert_close(ggn_forward, ggn, rtol=1e-10, atol=1e-12)
    for rank in range(WORLD):
        got_ggn, got_fisher, got_forward = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got_ggn, ggn, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_fisher, fisher, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_forward, ggn, rtol=1e-10, atol=1e-12)
