"""The solvers on one flat buffer against the same solvers per tensor, and their operator counts."""

from __future__ import annotations

from benchmarks.harness import OpCounter
from bissl_det.bilevel import (
    LanczosBasis,
    conjugate_gradient,
    lanczos_extremes,
    neumann_series,
)
from bissl_det.bilevel.flat import FlatLayout, flat_problem
from tests.bilevel.test_solvers import as_matvec, flatten, random_spd, random_tuple

import pytest
import torch

# Many small tensors: the per-tensor path's cost grows with their number, the flat one's not.
MANY = [(3, 2), (4,), (2, 2, 1), *[(5,)] * 17]  # 14 + 85 = 99 unknowns in 20 tensors
N = sum(torch.Size(s).numel() for s in MANY)


def problem(dtype=torch.float64, seed=0):
    a = random_spd(N, low=0.5, high=30.0, seed=seed)
    matvec = as_matvec(a.to(dtype), shapes=MANY)
    return a, matvec


def assert_tuples_close(x, y, dtype):
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 1e-5}
    assert [t.shape for t in x] == [t.shape for t in y]
    assert all(t.dtype == dtype for t in x)
    torch.testing.assert_close(flatten(x), flatten(y), **tol)


def test_layout_views_share_the_buffer_and_mixed_dtypes_stay_tuples():
    ts = random_tuple(1, shapes=MANY)
    layout = FlatLayout.of(ts)
    buffer = layout.flatten(ts)
    assert buffer.shape == (N,) and buffer.is_contiguous()
    views = layout.views(buffer)
    torch.testing.assert_close(flatten(views), flatten(ts), rtol=0, atol=0)
    views[3].fill_(7.0)  # a view writes through to the buffer
    assert (buffer[14:19] == 7.0).all()
    assert FlatLayout.of((ts[0], ts[1].float())) is None
    mixed = (ts[0], ts[1].float())
    _, same, _ = flat_problem(lambda v: v, mixed, "test")
    assert same is mixed  # solved per tensor


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("iters", [1, 4, 12])
def test_cg_flat_equals_per_tensor(dtype, iters):
    _, matvec = problem(dtype)
    b = random_tuple(2, dtype=dtype, shapes=MANY)
    x_flat, info_flat = conjugate_gradient(matvec, b, max_iter=iters, check_residual=True)
    x_tuple, info_tuple = conjugate_gradient(
        matvec, b, max_iter=iters, check_residual=True, flat=False
    )
    assert_tuples_close(x_flat, x_tuple, dtype)
    assert info_flat.iterations == info_tuple.iterations == iters
    assert info_flat.residual_norm == pytest.approx(info_tuple.residual_norm, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_neumann_and_extremes_flat_equal_per_tensor(dtype):
    _, matvec = problem(dtype, seed=3)
    b = random_tuple(4, dtype=dtype, shapes=MANY)
    x_flat, _ = neumann_series(matvec, b, max_iter=6)
    x_tuple, _ = neumann_series(matvec, b, max_iter=6, flat=False)
    assert_tuples_close(x_flat, x_tuple, dtype)
    low, high, info = lanczos_extremes(matvec, b, steps=6)
    assert info.products == 6 and 0.5 <= low < high <= 30.0 + 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("max_iter", [0, 3])
def test_lanczos_basis_flat_equals_per_tensor(dtype, max_iter):
    a, matvec = problem(dtype, seed=5)
    v0 = random_tuple(6, dtype=dtype, shapes=MANY)
    flat = LanczosBasis.build(matvec, v0, size=8)
    per_tensor = LanczosBasis.build(matvec, v0, size=8, flat=False)
    torch.testing.assert_close(flat.ritz_values, per_tensor.ritz_values, rtol=1e-5, atol=1e-5)
    for seed in (6, 7):  # the start vector and another right-hand side
        b = random_tuple(seed, dtype=dtype, shapes=MANY)
        x_flat, info_flat = flat.solve(b, max_iter=max_iter)
        x_tuple, info_tuple = per_tensor.solve(b, max_iter=max_iter)
        assert_tuples_close(x_flat, x_tuple, dtype)
        assert info_flat.residual_norm == pytest.approx(info_tuple.residual_norm, rel=1e-3)
    # A full flat basis is the exact inverse (the reference of test_lanczos, here on 20 tensors).
    if dtype == torch.float64:
        full = LanczosBasis.build(matvec, v0, size=N)
        b = random_tuple(8, shapes=MANY)
        x, _ = full.solve(b)
        torch.testing.assert_close(
            flatten(x), torch.linalg.solve(a, flatten(b)), rtol=1e-8, atol=1e-9
        )


def count(fn) -> OpCounter:
    with OpCounter() as counter:
        fn()
    return counter


def test_flat_path_runs_far_fewer_operators():
    # The counts the benchmark reports: per tensor they grow with the number of tensors (20 here),
    # flat they do not (one dot per inner product, two matrix products per re-orthogonalisation).
    _, matvec = problem(torch.float32)
    b = random_tuple(2, dtype=torch.float32, shapes=MANY)
    cg_flat = count(lambda: conjugate_gradient(matvec, b, max_iter=5))
    cg_tuple = count(lambda: conjugate_gradient(matvec, b, max_iter=5, flat=False))
    assert cg_flat.by_name["aten.dot.default"] <= 3 * 6  # p^T A p, r^T r, r^T z per iteration
    assert cg_tuple.by_name["aten.dot.default"] >= 20 * 3 * 5
    build_flat = count(lambda: LanczosBasis.build(matvec, b, size=8))
    build_tuple = count(lambda: LanczosBasis.build(matvec, b, size=8, flat=False))
    assert build_flat.by_name["aten.dot.default"] <= 2 * 8 + 1
    assert build_tuple.by_name["aten.dot.default"] >= 20 * 8 * 2
    assert build_flat.ops * 5 < build_tuple.ops
