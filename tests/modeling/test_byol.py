"""BYOL: loss against NumPy, the EMA target (formula, isolation from forward and HVPs), schedule."""

from __future__ import annotations

import math

from bissl_det.bilevel import pretext_curvature
from bissl_det.config.defaults import add_bissl_config
from bissl_det.modeling.pretext import (
    BYOL,
    MomentumTarget,
    byol_loss,
    cosine_ema_momentum,
    reset_target,
)
from bissl_det.modeling.pretext_tasks import build_pretext_model, pretext_names

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from torch import nn


def byol_numpy(p: np.ndarray, z: np.ndarray) -> float:
    out = []
    for a, b in zip(p, z, strict=True):
        out.append(2 - 2 * (a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    return float(np.mean(out))


def tiny_encoder() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def tiny_byol(momentum: float = 0.99) -> BYOL:
    return BYOL(tiny_encoder(), 4, (4, 8, 5), (5, 6, 5), ema_momentum=momentum)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_byol_loss_matches_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p, z = rng.normal(size=(7, 5)) * (seed + 1), rng.normal(size=(7, 5))
    got = byol_loss(torch.from_numpy(p), torch.from_numpy(z)).item()
    assert got == pytest.approx(byol_numpy(p, z), rel=1e-12)
    assert got == pytest.approx(byol_loss(torch.from_numpy(z), torch.from_numpy(p)).item())
    assert byol_loss(torch.from_numpy(p), torch.from_numpy(3 * p)).item() == pytest.approx(
        0.0, abs=1e-12
    )


def test_byol_loss_target_gets_no_gradient() -> None:
    p = torch.randn(4, 3, requires_grad=True)
    z = torch.randn(4, 3, requires_grad=True)
    byol_loss(p, z).backward()
    assert p.grad is not None and z.grad is None
    with pytest.raises(ValueError, match="equal shape"):
        byol_loss(torch.randn(4, 3), torch.randn(4, 2))


def test_cosine_ema_momentum_closed_form() -> None:
    assert cosine_ema_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert cosine_ema_momentum(0.99, 50, 100) == pytest.approx(0.995)
    assert cosine_ema_momentum(0.99, 100, 100) == pytest.approx(1.0)
    assert cosine_ema_momentum(0.99, 500, 100) == pytest.approx(1.0)
    expected = 1 - 0.01 * (math.cos(math.pi * 0.3) + 1) / 2
    assert cosine_ema_momentum(0.99, 30, 100) == pytest.approx(expected)
    with pytest.raises(ValueError, match="total"):
        cosine_ema_momentum(0.99, 0, 0)


def test_byol_structure_and_symmetry() -> None:
    torch.manual_seed(0)
    model = tiny_byol()
    assert all(not p.requires_grad for p in model.target_parameters())
    head = {id(p) for p in model.head_parameters()}
    assert head == {id(p) for p in [*model.projector.parameters(), *model.predictor.parameters()]}
    # Target starts as an exact copy of the online encoder + projector, in separate storage.
    online = [*model.encoder.parameters(), *model.projector.parameters()]
    for t, o in zip(model.target_parameters(), online, strict=True):
        assert torch.equal(t, o) and t.data_ptr() != o.data_ptr()
    v1, v2 = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    torch.testing.assert_close(model(v1, v2), model(v2, v1))
    model.eval()
    assert not model.target_encoder.training
    with pytest.raises(ValueError, match="predictor_dims"):
        BYOL(tiny_encoder(), 4, (4, 8, 5), (6, 6, 6))


def test_byol_forward_matches_definition() -> None:
    torch.manual_seed(1)
    model = tiny_byol()
    v1, v2 = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        p1 = model.predictor(model.projector(model.encoder(v1)))
        p2 = model.predictor(model.projector(model.encoder(v2)))
        t1 = model.target_projector(model.target_encoder(v1))
        t2 = model.target_projector(model.target_encoder(v2))
        expected = byol_numpy(p1.numpy(), t2.numpy()) + byol_numpy(p2.numpy(), t1.numpy())
        assert model(v1, v2).item() == pytest.approx(expected, rel=1e-5)


def test_target_untouched_by_forward_backward_and_hvp_then_exact_ema() -> None:
    torch.manual_seed(0)
    model = tiny_byol(momentum=0.9)
    v1, v2 = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    before = [t.clone() for t in model.target_parameters()]

    loss = model(v1, v2)
    params = list(model.encoder.parameters())
    grads = torch.autograd.grad(loss, params, create_graph=True)
    hv = torch.autograd.grad(sum(g.sum() for g in grads), params)
    assert all(torch.isfinite(h).all() for h in hv)
    model(v1, v2).backward()
    assert all(t.grad is None for t in model.target_parameters())
    for t, b in zip(model.target_parameters(), before, strict=True):
        assert torch.equal(t, b)

    # Move the online network, then one EMA step with an explicit momentum.
    with torch.no_grad():
        for p in [*model.encoder.parameters(), *model.projector.parameters()]:
            p.add_(torch.randn_like(p))
    online = [p.clone() for p in [*model.encoder.parameters(), *model.projector.parameters()]]
    model.update_target(0.75)
    for t, b, o in zip(model.target_parameters(), before, online, strict=True):
        torch.testing.assert_close(t, 0.75 * b + 0.25 * o)
    # Default momentum is ema_momentum.
    prev = [t.clone() for t in model.target_parameters()]
    model.update_target()
    for t, b, o in zip(model.target_parameters(), prev, online, strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
    with pytest.raises(ValueError, match="momentum"):
        model.update_target(1.5)


def test_default_heads_are_three_layer_mlps_without_last_bias() -> None:
    cfg = add_bissl_config(get_cfg())
    cfg.MODEL.BISSL.PRETEXT = "byol"

    class Encoder(nn.Module):
        feat_dim = 2048

    model = build_pretext_model(cfg, Encoder())
    for mlp, widths in ((model.projector, (2048, 256, 256, 256)), (model.predictor, (256,) * 4)):
        linears = [m for m in mlp if isinstance(m, nn.Linear)]
        assert mlp.dims == widths and len(linears) == 3
        assert sum(isinstance(m, nn.BatchNorm1d) for m in mlp) == 2
        assert linears[-1].bias is None


def test_ggn_outputs_are_normalised_predictions_with_the_squared_distance() -> None:
    torch.manual_seed(3)
    model = tiny_byol().double()
    v1, v2 = torch.randn(6, 3, 8, 8).double(), torch.randn(6, 3, 8, 8).double()
    q, loss_of_q = model.ggn_outputs(v1, v2)
    assert q.shape == (12, 5)
    torch.testing.assert_close(q.norm(dim=1), torch.ones(12, dtype=torch.float64))
    assert loss_of_q(q).item() == pytest.approx(model(v1, v2).item(), rel=1e-12)
    # Convex with Hessian 2/n I in the outputs: exactly quadratic around any point.
    d = torch.randn_like(q)
    second = loss_of_q(q + d) - 2 * loss_of_q(q) + loss_of_q(q - d)
    assert second.item() == pytest.approx(2 / 6 * d.pow(2).sum().item(), rel=1e-10)


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_target_network_untouched_by_curvature_products(kind: str) -> None:
    torch.manual_seed(4)
    model = tiny_byol().double()
    v1, v2 = torch.randn(6, 3, 8, 8).double(), torch.randn(6, 3, 8, 8).double()
    target = [
        *model.target_encoder.state_dict().values(),
        *model.target_projector.state_dict().values(),
    ]
    online_buffers = [b.clone() for b in model.encoder.buffers()]
    before = [t.clone() for t in target]
    params = tuple(model.encoder.parameters())
    curvature = pretext_curvature(kind, model, (v1, v2), params)
    for _ in range(3):
        hv = curvature.matvec(tuple(torch.randn_like(p) for p in params))
        assert all(torch.isfinite(h).all() for h in hv)
    curvature.release()
    for t, b in zip(target, before, strict=True):  # parameters AND BN buffers
        assert torch.equal(t, b)
    for t, b in zip(model.encoder.buffers(), online_buffers, strict=True):
        assert torch.equal(t, b)
    assert all(p.grad is None for p in model.parameters())
    # A plain forward does move the target's BN statistics: the check above can fail.
    model(v1, v2)
    moved = [
        *model.target_encoder.state_dict().values(),
        *model.target_projector.state_dict().values(),
    ]
    assert any(not torch.equal(t, b) for t, b in zip(moved, before, strict=True))


def test_pretext_registry_and_ema_interface() -> None:
    cfg = add_bissl_config(get_cfg())
    encoder = tiny_encoder()
    encoder.feat_dim = 4
    assert pretext_names() == ["byol", "simclr"]
    cfg.MODEL.BISSL.PRETEXT = "SimCLR"  # config names are case-insensitive
    assert not isinstance(build_pretext_model(cfg, encoder), MomentumTarget)
    cfg.MODEL.BISSL.PRETEXT = "byol"
    model = build_pretext_model(cfg, encoder)
    assert isinstance(model, MomentumTarget)
    # reset_target copies the online network into the target; a no-op without a target.
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    reset_target(model)
    for t, o in zip(model.target_encoder.parameters(), model.encoder.parameters(), strict=True):
        assert torch.equal(t, o)
    reset_target(nn.Linear(2, 2))
    cfg.MODEL.BISSL.PRETEXT = "moco"
    with pytest.raises(ValueError, match="unknown pretext task 'moco' \\(byol, simclr\\)"):
        build_pretext_model(cfg, encoder)
