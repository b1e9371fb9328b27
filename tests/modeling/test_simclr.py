"""SimCLR: NT-Xent against a NumPy reference, symmetry, derivatives, and the module."""

from __future__ import annotations

from bissl_det.modeling.pretext import ProjectionMLP, SimCLR, nt_xent_loss

import numpy as np
import pytest
import torch
from torch import nn


def nt_xent_numpy(z1: np.ndarray, z2: np.ndarray, temperature: float) -> float:
    """Textbook NT-Xent over 2N samples, one anchor at a time."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        pos = (i + n) % n2
        sims = np.array([z[i] @ z[k] / temperature for k in range(n2)])
        denom = sum(np.exp(sims[k]) for k in range(n2) if k != i)
        total += -np.log(np.exp(sims[pos]) / denom)
    return total / n2


def tiny_encoder(with_norm: bool = True) -> nn.Module:
    layers = [nn.Conv2d(3, 4, 3, padding=1)]
    if with_norm:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0, 2.0])
def test_nt_xent_matches_numpy(temperature: float) -> None:
    rng = np.random.default_rng(int(temperature * 10))
    z1, z2 = rng.normal(size=(6, 5)), rng.normal(size=(6, 5)) * 3.0
    got = nt_xent_loss(torch.from_numpy(z1), torch.from_numpy(z2), temperature)
    assert got.item() == pytest.approx(nt_xent_numpy(z1, z2, temperature), rel=1e-10)
    # gather=True is the identity without a process group.
    no_gather = nt_xent_loss(torch.from_numpy(z1), torch.from_numpy(z2), temperature, False)
    assert got.item() == pytest.approx(no_gather.item(), rel=1e-12)


def test_nt_xent_symmetric_and_scale_invariant() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    loss = nt_xent_loss(z1, z2)
    torch.testing.assert_close(nt_xent_loss(z2, z1), loss)
    torch.testing.assert_close(nt_xent_loss(5 * z1, 0.1 * z2), loss)


def test_nt_xent_perfect_alignment_lower_bound() -> None:
    # Identical, mutually orthogonal views: positive sim 1, negatives 0 -> closed form.
    z = torch.eye(4)
    t = 0.5
    expected = -np.log(np.exp(1 / t) / (np.exp(1 / t) + 6 * np.exp(0.0)))
    assert nt_xent_loss(z, z.clone(), t).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_first_and_second_derivatives() -> None:
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    z2 = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    fn = lambda a, b: nt_xent_loss(a, b, 0.3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z1, z2))
    assert torch.autograd.gradgradcheck(fn, (z1, z2))


def test_nt_xent_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="equal shape"):
        nt_xent_loss(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(torch.randn(4, 3), torch.randn(4, 3), temperature=0.0)


def test_projection_mlp_layout_and_values() -> None:
    mlp = ProjectionMLP((5, 7, 6, 3))
    kinds = [type(m).__name__ for m in mlp]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert all(m.bias is None for m in mlp if isinstance(m, nn.Linear))
    assert ProjectionMLP((5, 3), last_bias=True)[0].bias is not None
    assert isinstance(ProjectionMLP((5, 4, 3), last_norm=True)[-1], nn.BatchNorm1d)
    # Training-mode value against the hand-written composition.
    x = torch.randn(10, 5, dtype=torch.float64)
    mlp = mlp.double()
    h = x
    for lin in (mlp[0], mlp[3]):
        h = h @ lin.weight.T
        h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)
        h = torch.relu(h)
    torch.testing.assert_close(mlp(x), h @ mlp[6].weight.T)
    with pytest.raises(ValueError, match="dims"):
        ProjectionMLP((5,))
    with pytest.raises(ValueError, match=r"\(N, 5\)"):
        mlp(torch.randn(2, 4, dtype=torch.float64))


def test_simclr_module_forward_backward() -> None:
    torch.manual_seed(0)
    model = SimCLR(tiny_encoder(), feat_dim=4, projector_dims=(4, 8, 3), temperature=0.5)
    v1, v2 = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    loss = model(v1, v2)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    assert {id(p) for p in model.head_parameters()} == {id(p) for p in model.projector.parameters()}
    # The module is encoder -> projector -> nt_xent on the concatenated batch.
    with torch.no_grad():
        z = model.projector(model.encoder(torch.cat([v1, v2])))
        torch.testing.assert_close(model(v1, v2), nt_xent_loss(z[:6], z[6:], 0.5))
    with pytest.raises(ValueError, match="feat_dim"):
        SimCLR(tiny_encoder(), feat_dim=4, projector_dims=(5, 3))


def test_simclr_hessian_vector_product_matches_finite_differences() -> None:
    torch.manual_seed(0)
    model = SimCLR(tiny_encoder(with_norm=False), feat_dim=4, projector_dims=(4, 3)).double()
    v1, v2 = torch.randn(5, 3, 6, 6).double(), torch.randn(5, 3, 6, 6).double()
    params = list(model.encoder.parameters())
    vec = [torch.randn_like(p) for p in params]

    grads = torch.autograd.grad(model(v1, v2), params, create_graph=True)
    hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vec, strict=True)), params)

    def grad_at(sign: float, eps: float = 1e-5) -> list[torch.Tensor]:
        with torch.no_grad():
            for p, v in zip(params, vec, strict=True):
                p.add_(sign * eps * v)
        out = torch.autograd.grad(model(v1, v2), params)
        with torch.no_grad():
            for p, v in zip(params, vec, strict=True):
                p.sub_(sign * eps * v)
        return list(out)

    plus, minus = grad_at(1.0), grad_at(-1.0)
    for h, gp, gm in zip(hvp, plus, minus, strict=True):
        torch.testing.assert_close(h, (gp - gm) / 2e-5, rtol=1e-5, atol=1e-7)


def test_separate_views_same_loss_in_eval_mode_different_in_train_mode() -> None:
    torch.manual_seed(0)
    joint = SimCLR(tiny_encoder(), feat_dim=4, projector_dims=(4, 8, 3)).double()
    separate = SimCLR(tiny_encoder(), feat_dim=4, projector_dims=(4, 8, 3), separate_views=True)
    separate = separate.double()
    separate.load_state_dict(joint.state_dict())
    v1, v2 = torch.randn(6, 3, 8, 8).double(), torch.randn(6, 3, 8, 8).double() + 1.0
    # Eval mode: BN uses running statistics, so per-view batches change nothing.
    joint.eval(), separate.eval()
    assert separate(v1, v2).item() == pytest.approx(joint(v1, v2).item(), rel=1e-12)
    # Train mode: per-view batch statistics (view 2 is shifted) change the embeddings.
    joint.train(), separate.train()
    assert abs(separate(v1, v2).item() - joint(v1, v2).item()) > 1e-4
    with torch.no_grad():
        z1 = separate.projector(separate.encoder(v1))
        z2 = separate.projector(separate.encoder(v2))
        torch.testing.assert_close(separate(v1, v2), nt_xent_loss(z1, z2, 0.5))


def test_ggn_outputs_split_the_loss_into_logits_and_their_cross_entropy() -> None:
    torch.manual_seed(2)
    model = SimCLR(tiny_encoder(), feat_dim=4, projector_dims=(4, 8, 3), temperature=0.3).double()
    v1, v2 = torch.randn(5, 3, 8, 8).double(), torch.randn(5, 3, 8, 8).double()
    logits, loss_of_logits = model.ggn_outputs(v1, v2)
    assert logits.shape == (10, 10)
    assert torch.isinf(logits.diagonal()).all() and torch.isfinite(logits.fill_diagonal_(0)).all()
    logits, loss_of_logits = model.ggn_outputs(v1, v2)
    assert loss_of_logits(logits).item() == pytest.approx(model(v1, v2).item(), rel=1e-12)
    # Off the diagonal: cosine similarities / temperature.
    with torch.no_grad():
        z = nn.functional.normalize(model.projector(model.encoder(torch.cat([v1, v2]))), dim=1)
        expected = z @ z.T / 0.3
    off = ~torch.eye(10, dtype=torch.bool)
    torch.testing.assert_close(logits[off], expected[off])
