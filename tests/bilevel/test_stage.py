"""The solver and curvature tables and the stage system against dense linear algebra."""

from __future__ import annotations

from bissl_det.bilevel import (
    CURVATURES,
    SOLVERS,
    Curvature,
    EmpiricalFisherCurvature,
    ProductCurvature,
    StageSystem,
    get_curvature,
    get_solver,
)
from tests.bilevel.test_solvers import (
    DIM,
    SHAPES,
    as_matvec,
    block_diagonal_spd,
    flatten,
    random_spd,
    random_tuple,
    unflatten,
)

import pytest
import torch

LAM, DAMPING = 0.5, 1.5  # A = I + C / 2


class DenseCurvature(Curvature):
    """A dense PSD matrix with an exact damped solve (what the Fisher's Woodbury solve is)."""

    def __init__(self, c: torch.Tensor) -> None:
        super().__init__()
        self.c = c

    def _local_matvec(self, v):
        return as_matvec(self.c)(v)

    @property
    def has_exact_solve(self) -> bool:
        return True

    def solve_damped(self, b, scale):
        eye = torch.eye(self.c.shape[0], dtype=self.c.dtype)
        return unflatten(torch.linalg.solve(eye + scale * self.c, flatten(b)))


def _expected(c, b):
    eye = torch.eye(DIM, dtype=torch.float64)
    return torch.linalg.solve(eye + c / (LAM + DAMPING), flatten(b))


def test_registries_hold_every_config_name():
    assert set(SOLVERS) == {"cg", "layerwise_cg", "neumann", "lanczos", "direct"}
    assert set(CURVATURES) == {"hessian", "ggn", "fisher"}
    for kind in CURVATURES.values():  # exactly one way to build each
        assert (kind.from_batch is None) != (kind.from_history is None), kind.name
    with pytest.raises(ValueError, match="valid names"):
        get_solver("gmres")
    with pytest.raises(ValueError, match="unknown stage curvature 'hess'"):
        get_curvature("hess")


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_every_solver_solves_the_stage_system_through_one_call(name):
    """Same call for all five (common arguments a solver does not take are dropped)."""
    # Eigenvalues in [1, 4], A's in [1.5, 3]. Layer-wise CG is exact CG only per block: a block
    # diagonal C for it (whose repeated eigenvalues would stop a Lanczos basis short).
    c = block_diagonal_spd(SHAPES, seed=3) if name == "layerwise_cg" else random_spd(DIM, seed=3)
    b = random_tuple(4)
    system = StageSystem(
        DenseCurvature(c),
        LAM,
        DAMPING,
        name,
        basis_size=DIM,
        max_iter=60 if SOLVERS[name].iterative else 0,
        tol=1e-12,
        on_negative_curvature="raise",
        check_residual=True,
    )
    x, info = system.solve(b)
    tight = 1e-6 if name == "neumann" else 1e-9  # the series converges linearly
    torch.testing.assert_close(flatten(x), _expected(c, b), rtol=tight, atol=tight)
    assert info.solve_info.residual_is_true and info.solve_info.rel_residual < 1e-5
    # A second right-hand side: a stage basis is reused, costing no products beyond the solve's.
    before = system.stage_products()
    x2, info2 = system.solve(random_tuple(5))
    torch.testing.assert_close(flatten(x2), _expected(c, random_tuple(5)), rtol=tight, atol=tight)
    assert system.stage_products() - before == info2.products
    if SOLVERS[name].stage_basis:
        assert info2.products == 1  # the true residual only
        assert 1.5 - 1e-9 <= system.eigen[0] <= system.eigen[1] <= 3.0 + 1e-9
    system.release()


def test_solver_options_pass_through_and_misspelt_ones_fail():
    a, b = as_matvec(random_spd(DIM)), random_tuple()
    _, info = get_solver("neumann")(a, b, max_iter=3, on_negative_curvature="raise", alpha=0.2)
    assert info.iterations == 3
    with pytest.raises(TypeError, match="alhpa"):
        get_solver("neumann")(a, b, alhpa=0.2)


def test_direct_needs_an_exact_solve_and_no_head():
    products = ProductCurvature(as_matvec(random_spd(DIM)))
    with pytest.raises(ValueError, match="exact damped solve"):
        StageSystem(products, LAM, DAMPING, "direct")
    fisher = EmpiricalFisherCurvature(2)
    fisher.append(random_tuple())
    with pytest.raises(ValueError, match="joint"):
        StageSystem(fisher, LAM, DAMPING, "direct", head=(torch.zeros(2),))


def test_eigen_estimate_once_per_stage_not_counted_in_solves():
    c = random_spd(DIM, low=0.0, high=2.0, seed=7)
    system = StageSystem(ProductCurvature(as_matvec(c)), LAM, DAMPING, "cg", eigen_steps=DIM)
    system.options["max_iter"] = 3
    _, first = system.solve(random_tuple(8))
    _, second = system.solve(random_tuple(9))
    assert first.products == second.products == 3
    assert system.stage_products() == DIM + 6
    assert system.eigen == pytest.approx((1.0, 2.0), abs=1e-8)  # A = I + C/2, C in [0, 2]


@pytest.mark.parametrize("tol", [1e-2, 1e-6])
def test_adaptive_stage_basis_meets_tol_against_linalg_solve(tol):
    """BISSL.HYPERGRAD.ADAPTIVE_BASIS: the basis stops once its estimate meets tol."""
    c = random_spd(DIM, low=0.0, high=200.0, seed=41)  # A = I + C / 2: condition ~100
    b = random_tuple(42)
    system = StageSystem(
        DenseCurvature(c), LAM, DAMPING, "lanczos", basis_size=DIM, basis_tol=tol,
        max_iter=0, check_residual=True,
    )  # fmt: skip
    x, info = system.solve(b)
    exact = _expected(c, b)
    b_norm = torch.linalg.norm(flatten(b)).item()
    assert info.solve_info.rel_residual <= tol * (1 + 1e-6)  # the true residual
    assert torch.linalg.norm(flatten(x) - exact).item() <= tol * b_norm * (1 + 1e-6)  # A >= I
    assert system.basis_vectors < DIM or tol < 1e-3  # 14 unknowns: 1e-6 may need them all
    fixed = StageSystem(DenseCurvature(c), LAM, DAMPING, "lanczos", basis_size=DIM, max_iter=0)
    fixed.solve(b)
    assert fixed.basis_vectors == DIM


def test_adaptive_basis_needs_lanczos_and_a_tol():
    from bissl_det.config.defaults import add_bissl_config
    from bissl_det.config.hypergrad import check_hypergrad_config

    from detectron2.config import get_cfg

    hg = add_bissl_config(get_cfg()).BISSL.HYPERGRAD
    hg.ADAPTIVE_BASIS, hg.SOLVER, hg.TOL = True, "lanczos", 1e-2
    check_hypergrad_config(hg)
    for solver, tol in (("cg", 1e-2), ("lanczos", 0.0)):
        hg.SOLVER, hg.TOL = solver, tol
        with pytest.raises(ValueError, match="ADAPTIVE_BASIS"):
            check_hypergrad_config(hg)
