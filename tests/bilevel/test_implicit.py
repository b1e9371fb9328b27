"""Hessian-vector products and the implicit gradient against explicit Hessians, closed forms
(ridge regression) and finite differences through a lower level solved to convergence."""

from __future__ import annotations

import math
import os

from bissl_det.bilevel import (
    HessianCurvature,
    HessianVectorProduct,
    RecomputingHessianVectorProduct,
    damped_matvec,
    functional_hvp,
    implicit_gradient,
    tuple_dot,
    tuple_norm,
)
from tests.bilevel.tensors import DT, flatten, unflatten

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

# ---------------------------------------------------- Hessian-vector products


def nonlinear_loss(w, u, x):
    return (torch.tanh(x @ w) @ u).pow(2).mean() + torch.sin(w).sum() * (u**3).sum()


def _two_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 2, generator=gen, dtype=DT, requires_grad=True)
    u = torch.randn(2, generator=gen, dtype=DT, requires_grad=True)
    x = torch.randn(5, 3, generator=gen, dtype=DT)
    return w, u, x


def _explicit_hessian(w, u, x):
    def flat_loss(theta):
        return nonlinear_loss(*unflatten(theta, (w, u)), x)

    return torch.autograd.functional.hessian(flat_loss, flatten((w, u)).detach())


def test_hvp_matches_explicit_hessian_and_reuses_graph():
    w, u, x = _two_params()
    hess = _explicit_hessian(w, u, x)
    forwards = []

    def closure():
        forwards.append(1)
        return nonlinear_loss(w, u, x)

    hvp = HessianVectorProduct(closure(), (w, u))
    recomputing = RecomputingHessianVectorProduct(closure, (w, u))
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):  # several products on the one first-order graph
        v = (torch.randn(3, 2, generator=gen, dtype=DT), torch.randn(2, generator=gen, dtype=DT))
        hv = hvp(v)
        torch.testing.assert_close(flatten(hv), hess @ flatten(v), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(flatten(recomputing(v)), flatten(hv), rtol=1e-12, atol=1e-14)
        assert not any(t.requires_grad for t in hv)
    assert len(forwards) == 1 + 3  # HessianVectorProduct: once; the recomputing one: per product
    assert w.grad is None and u.grad is None  # products must not touch .grad

    hvp.release()
    with pytest.raises(RuntimeError, match="released"):
        hvp(v)


def test_hvp_unused_and_linear_parameters_give_zero_rows():
    w, u, x = _two_params(2)
    lin = torch.randn(4, dtype=DT, requires_grad=True)  # enters linearly: constant gradient
    unused = torch.randn(2, dtype=DT, requires_grad=True)
    loss = nonlinear_loss(w, u, x) + lin.sum() * 3.0
    params = (w, u, lin, unused)
    v = tuple(torch.ones_like(p) for p in params)
    hv = HessianVectorProduct(loss, params)(v)
    assert torch.equal(hv[2], torch.zeros(4, dtype=DT))
    assert torch.equal(hv[3], torch.zeros(2, dtype=DT))
    expected = _explicit_hessian(w, u, x) @ flatten(v[:2])
    torch.testing.assert_close(flatten(hv[:2]), expected, rtol=1e-10, atol=1e-12)


def test_hvp_rejects_bad_input():
    w, u, x = _two_params()
    hvp = HessianVectorProduct(nonlinear_loss(w, u, x), (w, u))
    with pytest.raises(ValueError, match=r"vector 1 has shape \(3,\), parameter \(2,\)"):
        hvp((torch.zeros(3, 2, dtype=DT), torch.zeros(3, dtype=DT)))
    with pytest.raises(ValueError, match="scalar"):
        HessianVectorProduct(torch.tanh(x @ w).sum(0), (w,))
    with torch.no_grad():
        frozen = nonlinear_loss(w, u, x)
    with pytest.raises(ValueError, match="does not require grad"):
        HessianVectorProduct(frozen, (w, u))


def test_functional_hvp_equals_double_backward():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    x = torch.randn(10, 4, dtype=DT)
    target = torch.randint(0, 3, (10,))

    def loss_fn(logits):
        return nn.functional.cross_entropy(logits, target)

    params = dict(net.named_parameters())
    v = tuple(torch.randn_like(p) for p in params.values())
    hv = HessianVectorProduct(loss_fn(net(x)), tuple(params.values()))(v)
    hv_func = functional_hvp(net, loss_fn, params, v, args=(x,))
    assert len(hv_func) == 4
    for a, b in zip(hv_func, hv, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)

    # Only a subset of parameters: H restricted to that block.
    sub = {"2.weight": params["2.weight"]}
    torch.testing.assert_close(
        functional_hvp(net, loss_fn, sub, (v[2],), args=(x,))[0],
        HessianVectorProduct(loss_fn(net(x)), (params["2.weight"],))((v[2],))[0],
        rtol=1e-10,
        atol=1e-13,
    )


def test_damped_matvec_formula_and_all_reduce():
    w, u, x = _two_params(3)
    hess = _explicit_hessian(w, u, x)
    hvp = HessianVectorProduct(nonlinear_loss(w, u, x), (w, u))
    v = (torch.randn(3, 2, dtype=DT), torch.randn(2, dtype=DT))
    lam, delta = 0.3, 0.2
    out = damped_matvec(hvp, lam, delta)(v)
    torch.testing.assert_close(
        flatten(out), flatten(v) + hess @ flatten(v) / (lam + delta), rtol=1e-12, atol=1e-12
    )
    # all_reduce acts on H v only (a stand-in that scales by 3 makes that visible).
    out = damped_matvec(hvp, lam, delta, all_reduce=lambda ts: tuple(3.0 * t for t in ts))(v)
    torch.testing.assert_close(
        flatten(out), flatten(v) + 3.0 * hess @ flatten(v) / (lam + delta), rtol=1e-12, atol=1e-12
    )
    # An operator whose output aliases its input (H = I) must not be corrupted in place.
    out = damped_matvec(lambda t: t, lam, delta)(v)
    torch.testing.assert_close(flatten(out), flatten(v) * (1 + 1 / (lam + delta)))
    with pytest.raises(ValueError, match="lam must be > 0"):
        damped_matvec(hvp, 0.0, 1.0)
    with pytest.raises(ValueError, match="damping must be >= 0"):
        damped_matvec(hvp, 1.0, -1.0)


# ---------------------------------------------------- ridge regression (closed form)


class Ridge:
    """Lower: ||X theta - y||^2 / (2n) (+ lam/2 ||theta - phi||^2); upper: ||A theta - c||^2 / 2.

    theta is split into two tensors (shapes (4,) and (2, 3)) so the tuple layout is exercised.
    """

    shapes = [(4,), (2, 3)]
    dim = 10

    def __init__(self, seed=0, n=40):
        gen = torch.Generator().manual_seed(seed)
        self.n = n
        self.x = torch.randn(n, self.dim, generator=gen, dtype=DT)
        self.y = torch.randn(n, generator=gen, dtype=DT)
        self.a = torch.randn(5, self.dim, generator=gen, dtype=DT)
        self.c = torch.randn(5, generator=gen, dtype=DT)
        self.phi = torch.randn(self.dim, generator=gen, dtype=DT)
        self.hessian = self.x.T @ self.x / n

    def theta_star(self, phi, lam):
        rhs = self.x.T @ self.y / self.n + lam * phi
        return torch.linalg.solve(self.hessian + lam * torch.eye(self.dim, dtype=DT), rhs)

    def lower_parts(self, theta_flat):
        parts, start = [], 0
        for s in self.shapes:
            n = math.prod(s)
            parts.append(theta_flat[start : start + n].reshape(s).clone().requires_grad_(True))
            start += n
        return tuple(parts)

    def pretext_loss(self, parts):
        return (self.x @ flatten(parts) - self.y).pow(2).sum() / (2 * self.n)

    def upper_grad(self, theta_flat):
        return self.a.T @ (self.a @ theta_flat - self.c)


@pytest.mark.parametrize("lam", [0.05, 1.0])
def test_ridge_implicit_gradient_equals_closed_form(lam):
    prob = Ridge()
    theta = prob.theta_star(prob.phi, lam)
    parts = prob.lower_parts(theta)
    hvp = HessianVectorProduct(prob.pretext_loss(parts), parts)
    g = unflatten(prob.upper_grad(theta), parts)
    x, info = implicit_gradient(hvp, g, lam=lam, damping=0.0, max_iter=prob.dim)

    eye = torch.eye(prob.dim, dtype=DT)
    analytic = lam * torch.linalg.solve(prob.hessian + lam * eye, prob.upper_grad(theta))
    torch.testing.assert_close(flatten(x), analytic, rtol=1e-9, atol=1e-12)
    assert info.iterations == prob.dim and info.residual_norm < 1e-9

    # The analytic formula itself, by autograd through the closed-form theta*(phi).
    phi = prob.phi.clone().requires_grad_(True)
    (prob.a @ prob.theta_star(phi, lam) - prob.c).pow(2).sum().div(2).backward()
    torch.testing.assert_close(phi.grad, analytic, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("solver", "max_iter"), [("cg", 10), ("neumann", 400)])
def test_damped_system_is_solved_exactly(solver, max_iter):
    prob = Ridge(seed=1)
    lam, delta = 1e-3, 0.5  # H has eigenvalues up to ~2.5: the damped system is not ~identity
    theta = prob.theta_star(prob.phi, lam)
    parts = prob.lower_parts(theta)
    hvp = HessianVectorProduct(prob.pretext_loss(parts), parts)
    gf = prob.upper_grad(theta)
    eye = torch.eye(prob.dim, dtype=DT)
    eig = torch.linalg.eigvalsh(eye + prob.hessian / (lam + delta))
    kwargs = {"alpha": 2.0 / (eig[0] + eig[-1]).item()} if solver == "neumann" else {}
    x, info = implicit_gradient(
        hvp, unflatten(gf, parts), lam, delta, solver=solver, max_iter=max_iter, **kwargs
    )
    expected = torch.linalg.solve(eye + prob.hessian / (lam + delta), gf)
    torch.testing.assert_close(flatten(x), expected, rtol=1e-9, atol=1e-12)
    cos = (expected @ gf / (expected.norm() * gf.norm())).item()
    assert info.cosine == pytest.approx(cos, rel=1e-9)
    assert info.norm_ratio == pytest.approx((expected.norm() / gf.norm()).item(), rel=1e-9)
    assert info.cosine < 0.999  # the Hessian visibly changed the direction


def test_default_damping_five_cg_steps_close_to_exact():
    # BiSSL defaults (lam 1e-3, delta 10, 5 CG steps): 5 steps on I + H/10 are already tight.
    prob = Ridge(seed=2)
    theta = prob.theta_star(prob.phi, 1e-3)
    parts = prob.lower_parts(theta)
    hvp = HessianVectorProduct(prob.pretext_loss(parts), parts)
    gf = prob.upper_grad(theta)
    x, info = implicit_gradient(hvp, unflatten(gf, parts))
    eye = torch.eye(prob.dim, dtype=DT)
    expected = torch.linalg.solve(eye + prob.hessian / (1e-3 + 10.0), gf)
    assert info.iterations == 5
    assert (flatten(x) - expected).norm() / expected.norm() < 1e-3
    assert info.residual_norm == pytest.approx(
        (gf - (flatten(x) + prob.hessian @ flatten(x) / 10.001)).norm().item(), rel=1e-6
    )


# ---------------------------------------------------- non-quadratic MLP, finite differences


def mlp(theta, x):
    w1, b1, w2, b2 = theta
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


class MLPBilevel:
    """Tiny MLP (259 parameters): pretext = 10 x cross-entropy on random labels, upper = MSE.

    The factor 10 gives the pretext Hessian a size comparable to lam, so it visibly matters.
    """

    shapes = [(32, 4), (32,), (3, 32), (3,)]

    def __init__(self, lam=1.0, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.lam = lam
        self.xp = torch.randn(64, 4, generator=gen, dtype=DT)
        self.yp = torch.randint(0, 3, (64,), generator=gen)
        self.xd = torch.randn(32, 4, generator=gen, dtype=DT)
        self.yd = torch.randn(32, 3, generator=gen, dtype=DT)
        self.phi = flatten([0.5 * torch.randn(s, generator=gen, dtype=DT) for s in self.shapes])
        self.like = [torch.empty(s, dtype=DT) for s in self.shapes]

    def pretext(self, theta):
        return 10.0 * nn.functional.cross_entropy(mlp(theta, self.xp), self.yp)

    def upper(self, theta):
        return (mlp(theta, self.xd) - self.yd).pow(2).mean()

    def lower_objective(self, flat, phi):
        return self.pretext(unflatten(flat, self.like)) + self.lam / 2 * (flat - phi).pow(2).sum()

    def solve_lower(self, phi, start=None, hess=None):
        """L-BFGS, then chord-Newton steps to a gradient norm below 1e-10.

        ``start`` warm-starts from a nearby solution, staying on the same branch of minima (the
        lower objective is not convex); ``hess`` is a nearby Hessian to reuse for the polishing.
        """
        theta = (phi if start is None else start).clone().requires_grad_(True)
        opt = torch.optim.LBFGS(
            [theta],
            lr=1.0,
            max_iter=1000,
            history_size=50,
            tolerance_grad=1e-12,
            tolerance_change=0.0,
            line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            loss = self.lower_objective(theta, phi)
            loss.backward()
            return loss

        opt.step(closure)
        theta = theta.detach()
        if hess is None:
            hess = torch.func.hessian(self.lower_objective)(theta, phi)
        for _ in range(10):
            grad = torch.func.grad(self.lower_objective)(theta, phi)
            if grad.norm() < 1e-12:
                break
            theta = theta - torch.linalg.solve(hess, grad)
        grad = torch.func.grad(self.lower_objective)(theta, phi)
        assert grad.norm() < 1e-10, f"lower level did not converge: |grad| = {grad.norm():.2e}"
        return theta

    def outer(self, phi, start, hess):
        return self.upper(unflatten(self.solve_lower(phi, start, hess), self.like)).item()


def test_mlp_implicit_gradient_matches_finite_differences():
    prob = MLPBilevel(lam=1.0)
    theta = prob.solve_lower(prob.phi)
    hess = torch.func.hessian(prob.lower_objective)(theta, prob.phi)
    assert torch.linalg.eigvalsh(hess)[0] > 0.01  # a strict local minimum: the IFT applies
    parts = tuple(t.clone().requires_grad_(True) for t in unflatten(theta, prob.like))
    hvp = HessianVectorProduct(prob.pretext(parts), parts)
    g = torch.autograd.grad(prob.upper(parts), parts)
    x, info = implicit_gradient(hvp, g, lam=prob.lam, damping=0.0, max_iter=300, tol=1e-13)
    assert info.converged

    gen = torch.Generator().manual_seed(7)
    eps = 1e-4
    for _ in range(3):
        u = torch.randn(theta.numel(), generator=gen, dtype=DT)
        u /= u.norm()
        plus = prob.outer(prob.phi + eps * u, theta, hess)
        fd = (plus - prob.outer(prob.phi - eps * u, theta, hess)) / (2 * eps)
        analytic = tuple_dot(x, unflatten(u, prob.like)).item()
        assert abs(fd - analytic) < 1e-4 * abs(analytic), (fd, analytic)
        # Dropping the Hessian (x = g) must be visibly wrong, or this test could not fail.
        naive = tuple_dot(g, unflatten(u, prob.like)).item()
        assert abs(fd - naive) > 1e-2 * abs(fd)


class MLPWithHeadBilevel(MLPBilevel):
    """The pretext head as a lower variable: theta = (w1, b1) regularised, head (w2, b2) not.

    Pretext = 10 x MSE of the MLP's regression of random targets plus ||head||^2 / 2 (strictly
    convex in the head); upper = MSE of a fixed readout of theta's features.
    """

    shapes = [(6, 4), (6,), (3, 6), (3,)]
    backbone = 2  # the first two tensors are theta

    def __init__(self, lam=1.0, seed=0):
        super().__init__(lam, seed)
        gen = torch.Generator().manual_seed(seed + 1)
        self.yp = torch.randn(64, 3, generator=gen, dtype=DT)
        self.readout = torch.randn(6, 3, generator=gen, dtype=DT)
        self.theta_dim = 6 * 4 + 6
        self.phi = self.phi[: self.theta_dim]
        self.head0 = 0.5 * torch.randn(6 * 3 + 3, generator=gen, dtype=DT)

    def pretext(self, theta):
        # A head penalty inside the pretext loss keeps H_pp well conditioned.
        head = theta[self.backbone :]
        penalty = sum(t.pow(2).sum() for t in head) / 2
        return 10.0 * (mlp(theta, self.xp) - self.yp).pow(2).mean() + penalty

    def upper(self, theta):
        w1, b1 = theta[: self.backbone]
        return (torch.tanh(self.xd @ w1.T + b1) @ self.readout - self.yd).pow(2).mean()

    def lower_objective(self, flat, phi):
        prox = (flat[: self.theta_dim] - phi).pow(2).sum()
        return self.pretext(unflatten(flat, self.like)) + self.lam / 2 * prox


def test_joint_system_with_pretext_head_matches_finite_differences():
    prob = MLPWithHeadBilevel()
    start = torch.cat([prob.phi, prob.head0])
    lower = prob.solve_lower(prob.phi, start)
    hess = torch.func.hessian(prob.lower_objective)(lower, prob.phi)
    assert torch.linalg.eigvalsh(hess)[0] > 1e-3  # strict local minimum in (theta, head)
    parts = tuple(t.clone().requires_grad_(True) for t in unflatten(lower, prob.like))
    theta, head = parts[: prob.backbone], parts[prob.backbone :]
    g = torch.autograd.grad(prob.upper(parts), theta)

    joint = HessianCurvature(prob.pretext(parts), parts)
    x_joint, info = implicit_gradient(
        joint, g, lam=prob.lam, damping=0.0, head=head, max_iter=500, tol=1e-14
    )
    assert info.converged and len(x_joint) == prob.backbone
    # The paper's derivative: the head held fixed (H_tt only).
    excluded = HessianCurvature(prob.pretext(parts), theta)
    x_excl, _ = implicit_gradient(excluded, g, prob.lam, 0.0, max_iter=500, tol=1e-14)

    # Schur complement closed form on the dense Hessian of the pretext loss.
    n = prob.theta_dim
    h = hess - prob.lam * torch.block_diag(torch.eye(n, dtype=DT), torch.zeros(21, 21, dtype=DT))
    schur = h[:n, :n] - h[:n, n:] @ torch.linalg.solve(h[n:, n:], h[n:, :n])
    expected = prob.lam * torch.linalg.solve(schur + prob.lam * torch.eye(n, dtype=DT), flatten(g))
    torch.testing.assert_close(flatten(x_joint), expected, rtol=1e-9, atol=1e-12)

    gen = torch.Generator().manual_seed(8)
    eps = 1e-4
    for _ in range(3):
        u = torch.randn(n, generator=gen, dtype=DT)
        u /= u.norm()
        plus = prob.outer(prob.phi + eps * u, lower, hess)
        fd = (plus - prob.outer(prob.phi - eps * u, lower, hess)) / (2 * eps)
        u_parts = unflatten(u, theta)
        assert abs(tuple_dot(x_joint, u_parts).item() - fd) < 1e-7 * abs(fd)  # ~1e-9 seen
        # Leaving the head out is visibly wrong (25-33 % off here).
        assert abs(tuple_dot(x_excl, u_parts).item() - fd) > 0.1 * abs(fd)


# ---------------------------------------------------- distributed (gloo, 2 processes)


def _ridge_pieces(prob, lam, rows):
    theta = prob.theta_star(prob.phi, lam)
    parts = prob.lower_parts(theta)
    x, y = prob.x[rows], prob.y[rows]
    loss = (x @ flatten(parts) - y).pow(2).mean() / 2  # mean over this process's rows
    return parts, HessianVectorProduct(loss, parts), unflatten(prob.upper_grad(theta), parts)


def _average(ts):
    out = tuple(t.clone() for t in ts)
    for t in out:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return out


def _dist_worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        prob = Ridge(seed=3)
        rows = torch.arange(prob.n).chunk(world)[rank]
        _, hvp, g = _ridge_pieces(prob, 0.05, rows)
        x, _ = implicit_gradient(hvp, g, lam=0.05, damping=0.0, max_iter=10, all_reduce=_average)
        if rank == 0:
            torch.save(flatten(x), out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_two_processes_half_batch_equal_one_process_full_batch(tmp_path):
    out_file = str(tmp_path / "x.pt")
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), out_file), nprocs=2, join=True)
    prob = Ridge(seed=3)
    _, hvp, g = _ridge_pieces(prob, 0.05, torch.arange(prob.n))
    x_single, _ = implicit_gradient(hvp, g, lam=0.05, damping=0.0, max_iter=10)
    assert os.path.exists(out_file)
    torch.testing.assert_close(torch.load(out_file), flatten(x_single), rtol=1e-10, atol=1e-12)
    assert tuple_norm(x_single).item() > 0
