"""The stage-level Lanczos solver against dense linear algebra (linalg.solve, eigh) and CG."""

from __future__ import annotations

from bissl_det.bilevel import IndefiniteSystemError, LanczosBasis, NonFiniteError
from tests.bilevel.test_solvers import (
    DIM,
    INDEFINITE_EIG,
    SHAPES,
    as_matvec,
    dense_cg_history,
    flatten,
    random_spd,
    random_tuple,
    symmetric,
    unflatten,
)

import numpy as np
import pytest
import torch


def true_norm(a, x, b):
    return torch.linalg.norm(flatten(b) - a @ flatten(x)).item()


def test_full_basis_solves_any_right_hand_side():
    a = random_spd(DIM, low=0.5, high=20.0, seed=1)
    calls = []
    basis = LanczosBasis.build(as_matvec(a, calls), random_tuple(2), size=DIM)
    assert basis.size == basis.products == len(calls) == DIM
    torch.testing.assert_close(basis.ritz_values, torch.linalg.eigvalsh(a), rtol=1e-10, atol=1e-10)
    for seed in (3, 4):  # right-hand sides other than the start vector
        b = random_tuple(seed)
        x, info = basis.solve(b)
        torch.testing.assert_close(
            flatten(x), torch.linalg.solve(a, flatten(b)), rtol=1e-9, atol=1e-10
        )
        assert info.products == 0 and len(calls) == DIM  # no product per solve
        assert not info.residual_is_true and info.rel_residual < 1e-9
        assert info.negative_curvature == 0 and not info.truncated


def test_exact_in_an_invariant_krylov_space_and_stops_building_there():
    a = random_spd(DIM, low=0.5, high=20.0, seed=5)
    q = torch.linalg.eigh(a).eigenvectors[:, [0, 3, 6, 9, 12]]  # 5 eigenvectors
    gen = torch.Generator().manual_seed(6)
    v0 = unflatten(q @ torch.randn(5, generator=gen, dtype=torch.float64))
    basis = LanczosBasis.build(as_matvec(a), v0, size=8)
    assert basis.size == basis.products == 5  # the Krylov space of v0 is invariant after 5
    b = unflatten(q @ torch.randn(5, generator=gen, dtype=torch.float64))
    x, info = basis.solve(b, check_residual=True)
    torch.testing.assert_close(flatten(x), torch.linalg.solve(a, flatten(b)), rtol=1e-9, atol=1e-10)
    assert info.residual_is_true and info.products == 1 and info.rel_residual < 1e-9


def test_start_vector_gives_the_cg_iterate_and_an_exact_residual_estimate():
    # For b = v0 the basis answer is the Galerkin solution on K_m(A, b): CG after m steps, and the
    # Lanczos relation gives its residual exactly, without a product.
    a = random_spd(DIM, low=0.5, high=20.0, seed=7)
    b = random_tuple(8)
    basis = LanczosBasis.build(as_matvec(a), b, size=5)
    x, info = basis.solve(b)
    xs, _, residuals = dense_cg_history(a, flatten(b), 5)
    np.testing.assert_allclose(flatten(x).numpy(), xs[-1], rtol=1e-8)
    assert info.residual_norm == pytest.approx(residuals[-1], rel=1e-6)
    assert info.residual_norm == pytest.approx(true_norm(a, x, b), rel=1e-6)


def test_residual_outside_the_basis_is_an_estimate_and_check_gives_the_true_one():
    a = random_spd(DIM, low=0.5, high=20.0, seed=9)
    basis = LanczosBasis.build(as_matvec(a), random_tuple(10), size=4)
    b = random_tuple(11)
    x, info = basis.solve(b)
    true = true_norm(a, x, b)
    assert not info.residual_is_true
    assert info.residual_norm < 0.5 * true  # it assumes A = I outside span(V): far from it here
    _, checked = basis.solve(b, check_residual=True)
    assert checked.residual_is_true and checked.residual_norm == pytest.approx(true, rel=1e-10)


def test_negative_ritz_values_are_counted_truncated_continued_or_refused():
    eig = torch.tensor([-2.0, -0.5, *np.linspace(0.5, 3.0, DIM - 2)], dtype=torch.float64)
    a = symmetric(eig, seed=12)
    basis = LanczosBasis.build(as_matvec(a), random_tuple(13), size=DIM)
    b = random_tuple(14)
    evals, evecs = torch.linalg.eigh(a)
    x, info = basis.solve(b)  # truncate: negative directions are treated as the identity
    expected = evecs @ (torch.where(evals > 0, 1 / evals, 1.0) * (evecs.T @ flatten(b)))
    torch.testing.assert_close(flatten(x), expected, rtol=1e-8, atol=1e-10)
    assert info.negative_curvature == 2 and info.truncated
    x, info = basis.solve(b, on_negative_curvature="continue")
    torch.testing.assert_close(flatten(x), torch.linalg.solve(a, flatten(b)), rtol=1e-8, atol=1e-10)
    assert info.negative_curvature == 2 and not info.truncated
    with pytest.raises(IndefiniteSystemError, match=r"2 Ritz value\(s\) <= 0, smallest -2"):
        basis.solve(b, on_negative_curvature="raise")


def _energy_error(a, x, expected):
    e = flatten(x) - expected
    return (e @ a @ e).sqrt().item()


def test_preconditioned_corrections_improve_monotonically():
    # A Hessian-like spectrum: a bulk in [1, 2] and three large outliers the basis captures.
    eig = torch.tensor([*np.linspace(1.0, 2.0, DIM - 3), 50.0, 100.0, 200.0], dtype=torch.float64)
    a = symmetric(eig, seed=15)
    calls = []
    basis = LanczosBasis.build(as_matvec(a, calls), random_tuple(16), size=6)
    b = random_tuple(17)
    expected = torch.linalg.solve(a, flatten(b))
    energies, residuals = [], []
    for k in range(8):
        before = len(calls)
        x, info = basis.solve(b, max_iter=k)
        assert info.products == len(calls) - before == (k + 1 if k else 0)
        energies.append(_energy_error(a, x, expected))
        residuals.append(true_norm(a, x, b))
        if k:
            assert info.residual_is_true
            assert info.residual_norm == pytest.approx(residuals[-1], rel=1e-6, abs=1e-12)
    assert all(e1 < e0 for e0, e1 in zip(energies, energies[1:], strict=False))  # PCG's guarantee
    assert all(r1 < r0 for r0, r1 in zip(residuals, residuals[1:], strict=False))
    # The same number of products per solve without the basis leaves plain CG far behind.
    _, _, cg_residuals = dense_cg_history(a, flatten(b), 8)
    assert residuals[-1] < 0.02 * cg_residuals[-1]


def test_corrections_stop_at_tol_and_refuse_indefinite_directions():
    a = random_spd(DIM, low=0.5, high=20.0, seed=18)
    basis = LanczosBasis.build(as_matvec(a), random_tuple(19), size=3)
    b = random_tuple(20)
    x, info = basis.solve(b, max_iter=DIM, tol=1e-8)
    assert info.converged and info.rel_residual <= 1e-8 and info.iterations < DIM
    assert true_norm(a, x, b) <= 1e-7 * flatten(b).norm().item()
    bad = LanczosBasis.build(as_matvec(symmetric(INDEFINITE_EIG, seed=21)), random_tuple(22), 3)
    assert (bad.ritz_values > 0).all()  # 3 steps do not see the negative eigenvalue ...
    with pytest.raises(IndefiniteSystemError, match="LanczosBasis.solve: p\\^T A p"):
        bad.solve(b, max_iter=DIM, on_negative_curvature="raise")  # ... the corrections do
    _, info = bad.solve(b, max_iter=DIM)
    assert info.truncated and info.negative_curvature == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_basis_keeps_dtype(dtype):
    a = random_spd(DIM, seed=23)
    basis = LanczosBasis.build(as_matvec(a.to(dtype)), random_tuple(24, dtype=dtype), size=DIM)
    x, _ = basis.solve(random_tuple(25, dtype=dtype), max_iter=2)
    assert all(t.dtype == dtype for t in x)
    assert basis.ritz_values.dtype == torch.float64


def test_bad_input_release_and_non_finite():
    a = random_spd(DIM, seed=26)
    with pytest.raises(ValueError, match="start vector v0 is zero"):
        LanczosBasis.build(as_matvec(a), tuple(torch.zeros(s) for s in SHAPES), size=3)
    with pytest.raises(ValueError, match="must be >= 1"):
        LanczosBasis.build(as_matvec(a), random_tuple(), size=0)

    def poisoned(v, calls=[]):  # noqa: B006 - counts calls across this test only
        calls.append(1)
        out = as_matvec(a)(v)
        return (out[0] * float("nan"), *out[1:]) if len(calls) == 3 else out

    with pytest.raises(NonFiniteError, match="LanczosBasis.build: alpha is nan at iteration 3"):
        LanczosBasis.build(poisoned, random_tuple(), size=5)
    basis = LanczosBasis.build(as_matvec(a), random_tuple(), size=3)
    with pytest.raises(ValueError, match="b does not match the basis vectors"):
        basis.solve((torch.zeros(3, 2), torch.zeros(5), torch.zeros(2, 2, 1)))
    ritz = basis.ritz_values
    basis.release()
    with pytest.raises(RuntimeError, match="released"):
        basis.solve(random_tuple())
    torch.testing.assert_close(basis.ritz_values, ritz)


BIG = [(40,), (20, 2)]  # 80 unknowns: room for the basis to stop well before the cap


@pytest.mark.parametrize("tol", [1e-2, 1e-4, 1e-7])
def test_adaptive_basis_grows_until_its_free_estimate_meets_tol(tol):
    """Against linalg.solve on an explicit SPD matrix (condition 100): the basis stops at the
    first size whose start-vector residual is <= tol, below the cap, and the solution is there."""
    a = symmetric(torch.logspace(-1, 1, 80, dtype=torch.float64), seed=31)
    b = random_tuple(32, shapes=BIG)
    basis = LanczosBasis.build(as_matvec(a, shapes=BIG), b, size=80, tol=tol)
    assert basis.products == basis.size < 80
    x, info = basis.solve(b, check_residual=True)
    exact = torch.linalg.solve(a, flatten(b))
    b_norm = torch.linalg.norm(flatten(b)).item()
    assert true_norm(a, x, b) / b_norm <= tol * (1 + 1e-6)
    # The residual bounds the error: ||x - x*|| <= ||A^-1|| ||r|| = 10 ||r||.
    error = torch.linalg.norm(flatten(x) - exact).item()
    assert error <= 10 * tol * b_norm * (1 + 1e-6)
    # Minimal: one vector fewer does not meet tol.
    smaller = LanczosBasis.build(as_matvec(a, shapes=BIG), b, size=basis.size - 1)
    y, _ = smaller.solve(b)
    assert true_norm(a, y, b) / b_norm > tol


def test_adaptive_basis_respects_the_cap_and_refuses_negative_tol():
    a = symmetric(torch.logspace(-2, 2, 80, dtype=torch.float64), seed=33)  # condition 1e4
    b = random_tuple(34, shapes=BIG)
    assert LanczosBasis.build(as_matvec(a, shapes=BIG), b, size=6, tol=1e-12).size == 6
    with pytest.raises(ValueError, match="tol must be >= 0"):
        LanczosBasis.build(as_matvec(a, shapes=BIG), b, size=6, tol=-1.0)
