"""Solvers over tuples of tensors against dense linear algebra (torch.linalg.solve, NumPy)."""

from __future__ import annotations

import itertools
import math

from bissl_det.bilevel import (
    IndefiniteSystemError,
    NonFiniteError,
    conjugate_gradient,
    get_solver,
    lanczos_extremes,
    layerwise_conjugate_gradient,
    neumann_series,
    true_residual,
    tuple_cosine,
    tuple_dot,
    tuple_norm,
)

import numpy as np
import pytest
import torch

SHAPES = [(3, 2), (4,), (2, 2, 1)]  # 6 + 4 + 4 = 14 unknowns
DIM = sum(math.prod(s) for s in SHAPES)


def flatten(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def unflatten(vec, shapes=SHAPES):
    out, start = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(vec[start : start + n].reshape(s))
        start += n
    return tuple(out)


def symmetric(eig, seed=0):
    """Dense symmetric matrix ``Q diag(eig) Q^T`` with a random orthogonal ``Q``."""
    eig = torch.as_tensor(eig, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eig), len(eig), generator=gen, dtype=torch.float64))
    return q @ torch.diag(eig) @ q.T


def random_spd(n, low=1.0, high=4.0, seed=0):
    """Dense SPD matrix with distinct eigenvalues spread over [low, high]."""
    return symmetric(torch.linspace(low, high, n, dtype=torch.float64), seed)


def block_diagonal_spd(shapes, seed=0):
    blocks = [random_spd(math.prod(s), seed=seed + i) for i, s in enumerate(shapes)]
    return torch.block_diag(*blocks)


def as_matvec(a, counter=None, shapes=SHAPES):
    """Matrix-vector product on tuples; the flattening lives in the test only."""

    def matvec(v):
        if counter is not None:
            counter.append(1)
        return unflatten(a @ flatten(v), shapes)

    return matvec


def random_tuple(seed=1, dtype=torch.float64, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=gen, dtype=dtype) for s in shapes)


def dense_cg_history(a, b, iters):
    """Textbook CG in NumPy (x0 = 0, steps taken whatever the sign of p^T A p).

    Returns the iterates ``[x_0, ..., x_iters]``, each direction's ``p^T A p`` and the residual
    norms ``||b - A x_k||``.
    """
    a, b = a.numpy(), b.numpy()
    x, r = np.zeros_like(b), b.copy()
    p = r.copy()
    xs, curvatures = [x], []
    for _ in range(iters):
        ap = a @ p
        curvatures.append(p @ ap)
        alpha = (r @ r) / (p @ ap)
        x = x + alpha * p
        r_new = r - alpha * ap
        p = r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
        xs.append(x)
    residuals = [np.linalg.norm(b - a @ xk) for xk in xs]
    return xs, curvatures, residuals


def test_tuple_helpers_match_numpy():
    a, b = random_tuple(1), random_tuple(2)
    fa, fb = flatten(a).numpy(), flatten(b).numpy()
    assert tuple_dot(a, b).item() == pytest.approx(fa @ fb, rel=1e-12)
    assert tuple_norm(a).item() == pytest.approx(np.linalg.norm(fa), rel=1e-12)
    cos = fa @ fb / (np.linalg.norm(fa) * np.linalg.norm(fb))
    assert tuple_cosine(a, b).item() == pytest.approx(cos, rel=1e-12)
    assert tuple_cosine(a, tuple(2.5 * t for t in a)).item() == pytest.approx(1.0, rel=1e-12)
    with pytest.raises(ValueError, match="shape mismatch at index 1"):
        tuple_dot(a, (a[0], torch.zeros(5), a[2]))


def test_inner_products_accumulate_in_float32():
    # 70000 in float16 overflows (max 65504); the float32 accumulation must not.
    ones = (torch.ones(40000, dtype=torch.float16), torch.ones(30000, dtype=torch.float16))
    dot = tuple_dot(ones, ones)
    assert dot.dtype == torch.float32
    assert dot.item() == 70000.0
    assert tuple_dot(random_tuple(), random_tuple()).dtype == torch.float64


def test_true_residual_matches_dense():
    a, b, x = random_spd(DIM, seed=1), random_tuple(2), random_tuple(3)
    calls = []
    norm, rel = true_residual(as_matvec(a, calls), x, b)
    expected = torch.linalg.norm(flatten(b) - a @ flatten(x)).item()
    assert norm == pytest.approx(expected, rel=1e-12)
    assert rel == pytest.approx(expected / flatten(b).norm().item(), rel=1e-12)
    assert len(calls) == 1


def test_cg_matches_linalg_solve():
    a = random_spd(DIM)
    b = random_tuple()
    calls = []
    x, info = conjugate_gradient(as_matvec(a, calls), b, max_iter=DIM, check_residual=True)
    expected = torch.linalg.solve(a, flatten(b))
    torch.testing.assert_close(flatten(x), expected, rtol=1e-9, atol=1e-10)
    assert [t.shape for t in x] == [torch.Size(s) for s in SHAPES]
    assert info.residual_norm < 1e-9 and info.rel_residual < 1e-9 and info.residual_is_true
    assert info.negative_curvature == 0 and not info.truncated
    assert info.products == len(calls) == info.iterations + 1  # + the checked residual


@pytest.mark.parametrize("iters", [1, 2, 3, 5])
def test_cg_partial_iterates_equal_textbook_cg(iters):
    # Exact CG on the coupled system: partial iterates must match dense CG, not just the limit.
    a = random_spd(DIM, low=0.5, high=20.0, seed=3)
    b = random_tuple(4)
    x, info = conjugate_gradient(as_matvec(a), b, max_iter=iters)
    xs, _, _ = dense_cg_history(a, flatten(b), iters)
    np.testing.assert_allclose(flatten(x).numpy(), xs[-1], rtol=1e-10)
    assert info.iterations == info.products == iters
    assert not info.converged  # tol = 0 only counts an exactly zero residual


def test_cg_converges_in_n_iterations():
    a = random_spd(DIM, low=0.5, high=20.0, seed=5)
    b = random_tuple(6)
    calls = []
    _, info = conjugate_gradient(as_matvec(a, calls), b, max_iter=3 * DIM, tol=1e-10)
    assert info.converged
    assert info.iterations <= DIM
    assert len(calls) == info.iterations == info.products
    # Distinct eigenvalues and a generic b: two steps short of n cannot reach the tolerance.
    _, short = conjugate_gradient(as_matvec(a), b, max_iter=DIM - 2, tol=1e-10)
    assert not short.converged
    assert short.residual_norm > 1e-10 * tuple_norm(b).item()


def test_cg_early_stop_at_the_right_iteration():
    a = random_spd(DIM, low=0.5, high=20.0, seed=21)
    b = random_tuple(22)
    tol = 1e-3
    _, _, residuals = dense_cg_history(a, flatten(b), DIM)
    b_norm = flatten(b).norm().item()
    first = next(k for k, r in enumerate(residuals) if r <= tol * b_norm)
    assert 1 < first < DIM  # the tolerance is met part-way, not at once and not only at the end
    calls = []
    x, info = conjugate_gradient(as_matvec(a, calls), b, max_iter=DIM, tol=tol)
    assert info.iterations == len(calls) == first
    assert info.converged and info.rel_residual <= tol
    true = torch.linalg.norm(flatten(b) - a @ flatten(x)).item()
    assert info.residual_norm == pytest.approx(true, rel=1e-8)


def test_cg_zero_rhs_needs_no_product():
    zeros = tuple(torch.zeros(s, dtype=torch.float64) for s in SHAPES)
    calls = []
    x, info = conjugate_gradient(as_matvec(random_spd(DIM), calls), zeros, max_iter=5)
    assert info.converged and info.iterations == 0 and info.products == 0 and not calls
    assert info.rel_residual == 0.0
    assert all((t == 0).all() for t in x)


@pytest.mark.parametrize(
    ("solver", "coupled"),
    [
        (conjugate_gradient, True),
        (neumann_series, True),
        # Per-tensor steps do not commute with a coupled A: the recurrence residual is the true one
        # only for block-diagonal systems.
        (layerwise_conjugate_gradient, False),
    ],
)
@pytest.mark.parametrize("iters", [1, 3, 6])
def test_residual_norm_is_true_residual(solver, coupled, iters):
    a = random_spd(DIM, low=0.5, high=1.5, seed=7) if coupled else block_diagonal_spd(SHAPES)
    b = random_tuple(8)
    x, info = solver(as_matvec(a), b, max_iter=iters)
    true = torch.linalg.norm(flatten(b) - a @ flatten(x)).item()
    assert info.residual_norm == pytest.approx(true, rel=1e-7)
    assert info.rel_residual == pytest.approx(true / flatten(b).norm().item(), rel=1e-7)


# ------------------------------------------------------------------ negative curvature

# One negative eigenvalue among positive ones: CG meets p^T A p < 0 only after a few steps.
INDEFINITE_EIG = [-0.7, *np.linspace(0.5, 3.0, DIM - 1)]


def _indefinite_problem():
    a = symmetric(INDEFINITE_EIG, seed=31)
    b = random_tuple(32)
    _, curvatures, _ = dense_cg_history(a, flatten(b), DIM)
    first_bad = next(k for k, c in enumerate(curvatures) if c <= 0) + 1  # 1-based iteration
    return a, b, first_bad


def test_truncated_cg_stops_before_the_first_negative_direction():
    a, b, first_bad = _indefinite_problem()
    assert first_bad >= 3  # test precondition: there is a nontrivial iterate before it
    xs, _, residuals = dense_cg_history(a, flatten(b), first_bad)
    x, info = conjugate_gradient(as_matvec(a), b, max_iter=DIM)
    np.testing.assert_allclose(flatten(x).numpy(), xs[first_bad - 1], rtol=1e-10)
    assert info.truncated and info.negative_curvature == 1 and not info.converged
    assert info.iterations == info.products == first_bad
    assert info.residual_norm == pytest.approx(residuals[first_bad - 1], rel=1e-8)
    # A budget that ends before the bad direction never sees it.
    _, short = conjugate_gradient(as_matvec(a), b, max_iter=first_bad - 1)
    assert not short.truncated and short.negative_curvature == 0


def test_truncated_cg_at_the_first_direction_returns_b():
    a = symmetric([-2.0, -1.0, *np.linspace(0.5, 3.0, DIM - 2)], seed=33)
    b = unflatten(torch.linalg.eigh(a).eigenvectors[:, 0] + 0.1 * flatten(random_tuple(34)))
    assert (flatten(b) @ a @ flatten(b)).item() < 0  # p0 = b is a negative direction
    x, info = conjugate_gradient(as_matvec(a), b, max_iter=5)
    torch.testing.assert_close(flatten(x), flatten(b), rtol=0, atol=0)
    assert info.truncated and info.iterations == 1 and info.negative_curvature == 1
    assert info.residual_is_true
    assert info.residual_norm == pytest.approx((flatten(b) - a @ flatten(b)).norm().item())


def test_continue_is_the_paper_cg_and_counts_negative_directions():
    a, b, _ = _indefinite_problem()
    iters = DIM - 2
    xs, curvatures, residuals = dense_cg_history(a, flatten(b), iters)
    x, info = conjugate_gradient(as_matvec(a), b, max_iter=iters, on_negative_curvature="continue")
    np.testing.assert_allclose(flatten(x).numpy(), xs[-1], rtol=1e-8)
    assert info.negative_curvature == sum(c <= 0 for c in curvatures) >= 1
    assert not info.truncated
    assert info.residual_norm == pytest.approx(residuals[-1], rel=1e-6)


def test_raise_on_negative_curvature():
    a, b, first_bad = _indefinite_problem()
    with pytest.raises(
        IndefiniteSystemError, match=f"iteration {first_bad}.*not positive definite"
    ):
        conjugate_gradient(as_matvec(a), b, max_iter=DIM, on_negative_curvature="raise")
    assert issubclass(IndefiniteSystemError, ValueError)


def test_layerwise_cg_counts_negative_denominators_per_tensor():
    # Block diagonal, the middle block negative definite: its denominator is < 0 every iteration.
    blocks = [random_spd(math.prod(s), seed=40 + i) for i, s in enumerate(SHAPES)]
    blocks[1] = -blocks[1]
    a = torch.block_diag(*blocks)
    b = random_tuple(41)
    _, info = layerwise_conjugate_gradient(
        as_matvec(a), b, max_iter=3, on_negative_curvature="continue"
    )
    assert info.negative_curvature == 3 and not info.truncated
    x, info = layerwise_conjugate_gradient(as_matvec(a), b, max_iter=3)
    torch.testing.assert_close(flatten(x), flatten(b), rtol=0, atol=0)
    assert info.truncated and info.negative_curvature == 1 and info.iterations == 1
    with pytest.raises(IndefiniteSystemError, match="layerwise"):
        layerwise_conjugate_gradient(as_matvec(a), b, on_negative_curvature="raise")


# ------------------------------------------------------------------ layer-wise CG


def test_layerwise_cg_exact_per_block_on_block_diagonal_system():
    a = block_diagonal_spd(SHAPES, seed=11)
    b = random_tuple(12)
    x, info = layerwise_conjugate_gradient(as_matvec(a), b, max_iter=max(map(math.prod, SHAPES)))
    expected = torch.linalg.solve(a, flatten(b))
    torch.testing.assert_close(flatten(x), expected, rtol=1e-9, atol=1e-10)
    assert info.residual_norm < 1e-9


def test_layerwise_cg_recurrence_residual_is_labelled_and_check_gives_true_one():
    a = random_spd(DIM, low=0.5, high=5.0, seed=13)  # coupled: off-diagonal blocks nonzero
    b = random_tuple(14)
    x, info = layerwise_conjugate_gradient(
        as_matvec(a), b, max_iter=6, on_negative_curvature="continue"
    )
    true = torch.linalg.norm(flatten(b) - a @ flatten(x)).item()
    assert not info.residual_is_true
    assert info.residual_norm < 0.5 * true  # the recurrence claims far more progress than made
    calls = []
    x2, checked = layerwise_conjugate_gradient(
        as_matvec(a, calls), b, max_iter=6, on_negative_curvature="continue", check_residual=True
    )
    torch.testing.assert_close(x2, x)
    assert checked.residual_is_true and checked.residual_norm == pytest.approx(true, rel=1e-10)
    assert checked.products == len(calls) == 7
    # A is SPD, yet a per-tensor denominator <p_i, (A p)_i> turns negative (iteration 4 here):
    # the coupling to the other tensors. It is counted, and "truncate" stops before it.
    assert info.negative_curvature == 1
    xs = [layerwise_conjugate_gradient(as_matvec(a), b, max_iter=k)[0] for k in (3, 6)]
    torch.testing.assert_close(xs[1], xs[0])


def test_layerwise_cg_is_blockwise_textbook_cg_and_differs_from_exact_cg():
    a = random_spd(DIM, low=0.5, high=5.0, seed=13)  # coupled: off-diagonal blocks nonzero
    b = random_tuple(14)
    x_lw, _ = layerwise_conjugate_gradient(as_matvec(a), b, max_iter=3)
    # NumPy reference of the per-tensor recurrence.
    sizes = [math.prod(s) for s in SHAPES]
    splits = np.cumsum(sizes)[:-1]
    an, bn = a.numpy(), flatten(b).numpy()
    x, r, p = np.zeros_like(bn), bn.copy(), bn.copy()
    for _ in range(3):
        ap = an @ p
        rs, ps, aps = np.split(r, splits), np.split(p, splits), np.split(ap, splits)
        alphas = [ri @ ri / (pi @ api) for ri, pi, api in zip(rs, ps, aps, strict=True)]
        alpha = np.concatenate([np.full(n, al) for n, al in zip(sizes, alphas, strict=True)])
        x = x + alpha * p
        r_new = r - alpha * ap
        betas = [
            rn @ rn / (ro @ ro)
            for rn, ro in zip(np.split(r_new, splits), np.split(r, splits), strict=True)
        ]
        p = r_new + np.concatenate([np.full(n, be) for n, be in zip(sizes, betas, strict=True)]) * p
        r = r_new
    np.testing.assert_allclose(flatten(x_lw).numpy(), x, rtol=1e-10)
    x_cg, _ = conjugate_gradient(as_matvec(a), b, max_iter=3)
    assert not torch.allclose(flatten(x_lw), flatten(x_cg), rtol=1e-3)


# ------------------------------------------------------------------ Neumann


def test_neumann_partial_sum_with_given_alpha():
    a = random_spd(DIM, low=1.0, high=4.0, seed=15)
    b = random_tuple(16)
    alpha = 0.25  # spectral radius of I - alpha A is 0.75
    calls = []
    x, info = neumann_series(as_matvec(a, calls), b, max_iter=3, alpha=alpha, power_iters=0)
    m = torch.eye(DIM, dtype=torch.float64) - alpha * a
    bf = flatten(b)
    expected = alpha * sum(torch.linalg.matrix_power(m, k) @ bf for k in range(4))
    torch.testing.assert_close(flatten(x), expected, rtol=1e-12, atol=1e-12)
    assert info.iterations == 3 and len(calls) == info.products == 4  # + 1 for the residual
    # The default divergence check costs power_iters products more and changes nothing else.
    x_checked, checked = neumann_series(as_matvec(a), b, max_iter=3, alpha=alpha)
    torch.testing.assert_close(x_checked, x)
    assert checked.products == 4 + 10


def test_neumann_estimates_a_convergent_step():
    a = random_spd(DIM, low=1.0, high=4.0, seed=15)
    b = random_tuple(16)
    x, info = neumann_series(as_matvec(a), b, max_iter=400, tol=1e-10)
    torch.testing.assert_close(flatten(x), torch.linalg.solve(a, flatten(b)), rtol=1e-8, atol=1e-9)
    assert info.converged and info.rel_residual <= 1e-10
    # alpha = 1 / lambda_max estimate: rate 1 - lambda_min / lambda_max = 0.75 per term.
    assert info.iterations < math.log(1e-10) / math.log(0.75) + 10
    # The same system at the paper's fixed step alpha = 1 diverges: the check refuses it.
    with pytest.raises(ValueError, match=r"alpha = 1 .*diverges.*alpha < 0\.5"):
        neumann_series(as_matvec(a), b, alpha=1.0)


def test_neumann_refuses_an_indefinite_operator():
    a = symmetric(INDEFINITE_EIG, seed=31)
    with pytest.raises(
        IndefiniteSystemError, match=r"smallest eigenvalue is < 0 beyond rounding.*cannot converge"
    ):
        neumann_series(as_matvec(a), random_tuple(32), power_iters=DIM)
    with pytest.raises(IndefiniteSystemError, match="lambda in \\[-0.7"):
        neumann_series(as_matvec(a), random_tuple(32), alpha=0.1, power_iters=DIM)


def test_neumann_runs_on_a_damped_low_rank_fisher_despite_rounding_ritz_values():
    """float32, damping 1, three per-sample gradients: lambda_max 1e7-1e9. The plain Lanczos
    recurrence's rounding puts Ritz values below the true lambda_min = 1, often below 0 (where
    depends on the thread count: several cases): no evidence of an indefinite system, and the
    series must run (and not diverge)."""
    rounding = math.sqrt(torch.finfo(torch.float32).eps)
    lowest = []
    for scale, seed in itertools.product((10.0, 30.0, 100.0), (0, 1)):
        gen = torch.Generator().manual_seed(seed)
        g = scale * torch.randn(3, 300_000, generator=gen)

        def fisher(v, g=g):
            return (v[0] + g.T @ (g @ v[0]) / 3,)

        b = (torch.randn(300_000, generator=gen),)
        lo, hi, _ = lanczos_extremes(fisher, b, steps=10)
        assert -lo < rounding * hi  # within the rounding band the check tolerates
        lowest.append(lo)
        _, info = neumann_series(fisher, b, max_iter=3)
        assert info.rel_residual <= 1.0
    assert min(lowest) < 0  # the case: a negative Ritz value at rounding level


# ------------------------------------------------------------------ shared behaviour


def test_lanczos_extremes_close_to_eigvalsh():
    shapes = [(10, 5), (30,), (4, 4)]  # 96 unknowns, 12 steps
    n = sum(math.prod(s) for s in shapes)
    a = symmetric(torch.linspace(-3.0, 8.0, n), seed=51)
    v0 = random_tuple(52, shapes=shapes)
    calls = []
    lo, hi, info = lanczos_extremes(as_matvec(a, calls, shapes), v0, steps=12)
    eig = torch.linalg.eigvalsh(a)
    assert info.products == len(calls) == info.steps == 12 and not info.invariant
    assert eig[0].item() <= lo < eig[0].item() + 0.1 * (eig[-1] - eig[0]).item()
    assert eig[-1].item() - 0.1 * (eig[-1] - eig[0]).item() < hi <= eig[-1].item()
    # Each extreme Ritz value has an eigenvalue within its residual.
    assert (eig - lo).abs().min().item() <= info.residual_min
    assert (eig - hi).abs().min().item() <= info.residual_max
    lo_n, hi_n, full = lanczos_extremes(as_matvec(a, shapes=shapes), v0, steps=n)
    assert lo_n == pytest.approx(eig[0].item(), abs=1e-8)
    assert hi_n == pytest.approx(eig[-1].item(), abs=1e-8)


@pytest.mark.parametrize("name", ["cg", "layerwise_cg", "neumann"])
def test_non_finite_raises(name):
    solver = get_solver(name)
    a = random_spd(DIM)
    b = random_tuple()

    def poisoned(v, calls=[]):  # noqa: B006 - counts calls across this test only
        calls.append(1)
        out = as_matvec(a)(v)
        return (out[0] * float("nan"), *out[1:]) if len(calls) == 2 else out

    with pytest.raises(NonFiniteError, match="iteration 2"):
        solver(poisoned, b, max_iter=5)
    bad_b = (b[0], b[1].clone().fill_(float("inf")), b[2])
    with pytest.raises(NonFiniteError, match="iteration 0"):
        solver(as_matvec(a), bad_b, max_iter=5)


def test_solvers_reject_bad_input():
    with pytest.raises(ValueError, match="valid names.*'cg'"):
        get_solver("bicgstab")
    a = random_spd(DIM)
    with pytest.raises(ValueError, match="matvec output does not match b"):
        conjugate_gradient(lambda v: v[:2], random_tuple(), max_iter=2)
    with pytest.raises(ValueError, match="max_iter"):
        conjugate_gradient(as_matvec(a), random_tuple(), max_iter=-1)
    with pytest.raises(ValueError, match="on_negative_curvature must be one of"):
        conjugate_gradient(as_matvec(a), random_tuple(), on_negative_curvature="ignore")
    with pytest.raises(ValueError, match="alpha"):
        neumann_series(as_matvec(a), random_tuple(), alpha=0.0)
    with pytest.raises(ValueError, match="power_iters"):
        neumann_series(as_matvec(a), random_tuple(), power_iters=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["cg", "layerwise_cg", "neumann"])
def test_solve_keeps_dtype(dtype, name):
    a = random_spd(DIM, seed=17)
    b = random_tuple(18, dtype=dtype)
    x, _ = get_solver(name)(as_matvec(a.to(dtype)), b, max_iter=DIM)
    assert all(t.dtype == dtype for t in x)
    if name == "cg":
        tight = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {}
        expected = torch.linalg.solve(a, flatten(b).double())
        torch.testing.assert_close(flatten(x).double(), expected, **tight)
