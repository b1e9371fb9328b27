"""Solvers over tuples of tensors against dense linear algebra (torch.linalg.solve, NumPy)."""

from __future__ import annotations

import math

from bissl_det.bilevel import (
    NonFiniteError,
    conjugate_gradient,
    get_solver,
    layerwise_conjugate_gradient,
    neumann_series,
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


def random_spd(n, low=1.0, high=4.0, seed=0):
    """Dense SPD matrix with distinct eigenvalues spread over [low, high]."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = torch.linspace(low, high, n, dtype=torch.float64)
    return q @ torch.diag(eig) @ q.T


def block_diagonal_spd(shapes, seed=0):
    blocks = [random_spd(math.prod(s), seed=seed + i) for i, s in enumerate(shapes)]
    return torch.block_diag(*blocks)


def as_matvec(a, counter=None):
    """Matrix-vector product on tuples; the flattening lives in the test only."""

    def matvec(v):
        if counter is not None:
            counter.append(1)
        return unflatten(a @ flatten(v))

    return matvec


def random_tuple(seed=1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES)


def dense_cg(a, b, iters):
    """Textbook CG in NumPy (x0 = 0) for comparing partial iterates."""
    a, b = a.numpy(), b.numpy()
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    for _ in range(iters):
        ap = a @ p
        alpha = (r @ r) / (p @ ap)
        x = x + alpha * p
        r_new = r - alpha * ap
        p = r_new + (r_new @ r_new) / (r @ r) * p
        r = r_new
    return x


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


def test_cg_matches_linalg_solve():
    a = random_spd(DIM)
    b = random_tuple()
    x, info = conjugate_gradient(as_matvec(a), b, max_iter=DIM)
    expected = torch.linalg.solve(a, flatten(b))
    torch.testing.assert_close(flatten(x), expected, rtol=1e-9, atol=1e-10)
    assert [t.shape for t in x] == [torch.Size(s) for s in SHAPES]
    assert info.residual_norm < 1e-9


@pytest.mark.parametrize("iters", [1, 2, 3, 5])
def test_cg_partial_iterates_equal_textbook_cg(iters):
    # Exact CG on the coupled system: partial iterates must match dense CG, not just the limit.
    a = random_spd(DIM, low=0.5, high=20.0, seed=3)
    b = random_tuple(4)
    x, info = conjugate_gradient(as_matvec(a), b, max_iter=iters)
    np.testing.assert_allclose(flatten(x).numpy(), dense_cg(a, flatten(b), iters), rtol=1e-10)
    assert info.iterations == iters
    assert not info.converged  # tol = 0 only counts an exactly zero residual


def test_cg_converges_in_n_iterations():
    a = random_spd(DIM, low=0.5, high=20.0, seed=5)
    b = random_tuple(6)
    calls = []
    _, info = conjugate_gradient(as_matvec(a, calls), b, max_iter=3 * DIM, tol=1e-10)
    assert info.converged
    assert info.iterations <= DIM
    assert len(calls) == info.iterations
    # Distinct eigenvalues and a generic b: two steps short of n cannot reach the tolerance.
    _, short = conjugate_gradient(as_matvec(a), b, max_iter=DIM - 2, tol=1e-10)
    assert not short.converged
    assert short.residual_norm > 1e-10 * tuple_norm(b).item()


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


def test_cg_early_stop_and_zero_rhs():
    a = random_spd(DIM)
    zeros = tuple(torch.zeros(s, dtype=torch.float64) for s in SHAPES)
    calls = []
    x, info = conjugate_gradient(as_matvec(a, calls), zeros, max_iter=5)
    assert info.converged and info.iterations == 0 and not calls
    assert all((t == 0).all() for t in x)


def test_layerwise_cg_exact_per_block_on_block_diagonal_system():
    a = block_diagonal_spd(SHAPES, seed=11)
    b = random_tuple(12)
    x, info = layerwise_conjugate_gradient(as_matvec(a), b, max_iter=max(map(math.prod, SHAPES)))
    expected = torch.linalg.solve(a, flatten(b))
    torch.testing.assert_close(flatten(x), expected, rtol=1e-9, atol=1e-10)
    assert info.residual_norm < 1e-9


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


def test_neumann_partial_sum_and_convergence():
    a = random_spd(DIM, low=1.0, high=4.0, seed=15)
    b = random_tuple(16)
    alpha = 0.25  # spectral radius of I - alpha A is 0.75
    calls = []
    x, info = neumann_series(as_matvec(a, calls), b, max_iter=3, alpha=alpha)
    m = torch.eye(DIM, dtype=torch.float64) - alpha * a
    bf = flatten(b)
    expected = alpha * sum(torch.linalg.matrix_power(m, k) @ bf for k in range(4))
    torch.testing.assert_close(flatten(x), expected, rtol=1e-12, atol=1e-12)
    assert info.iterations == 3 and len(calls) == 4  # one extra product for the residual

    x, info = neumann_series(as_matvec(a), b, max_iter=200, alpha=alpha)
    torch.testing.assert_close(flatten(x), torch.linalg.solve(a, bf), rtol=1e-9, atol=1e-10)
    _, early = neumann_series(as_matvec(a), b, max_iter=200, alpha=alpha, tol=1e-6)
    assert early.converged and early.iterations < 60


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
    with pytest.raises(ValueError, match="alpha"):
        neumann_series(as_matvec(a), random_tuple(), alpha=0.0)


def test_float32_solve_keeps_dtype():
    a = random_spd(DIM, seed=17)
    b = random_tuple(18, dtype=torch.float32)
    x, _ = conjugate_gradient(as_matvec(a.float()), b, max_iter=DIM)
    assert all(t.dtype == torch.float32 for t in x)
    torch.testing.assert_close(
        flatten(x).double(), torch.linalg.solve(a, flatten(b).double()), rtol=1e-4, atol=1e-5
    )
