"""The rules of BISSL.HYPERGRAD: which curvature and solver combine, and the ranges of the rest.

Checked at start-up (before the data) and again when the trainer builds its hypergradient, so a
``main()`` called without the tool's set-up refuses the same values.
"""

from __future__ import annotations

from ..bilevel import (
    CURVATURES,
    GGN_JV_MODES,
    NEGATIVE_CURVATURE_MODES,
    SOLVERS,
    get_curvature,
    get_solver,
)
from .defaults import GRAPH_DTYPES

__all__ = ["check_hypergrad_config"]


def check_hypergrad_config(hg) -> None:
    """Refuse an invalid BISSL.HYPERGRAD combination before any work, naming the key."""

    def one_of(key: str, value, valid) -> None:
        if value not in valid:
            raise ValueError(f"BISSL.HYPERGRAD.{key} = {value!r}: valid values are {list(valid)}")

    one_of("CURVATURE", hg.CURVATURE, CURVATURES)
    one_of("SOLVER", hg.SOLVER, SOLVERS)
    one_of("ON_NEGATIVE_CURVATURE", hg.ON_NEGATIVE_CURVATURE, NEGATIVE_CURVATURE_MODES)
    one_of("FISHER_DEVICE", hg.FISHER_DEVICE, ("cpu", "model"))
    one_of("GRAPH_DTYPE", hg.GRAPH_DTYPE, GRAPH_DTYPES)
    one_of("GGN_JV", hg.GGN_JV, GGN_JV_MODES)
    for key in ("MAX_ITER", "EIGEN_STEPS"):
        if hg[key] < 0:
            raise ValueError(f"BISSL.HYPERGRAD.{key} = {hg[key]}: must be >= 0")
    for key in ("BASIS_SIZE", "FISHER_HISTORY"):
        if hg[key] < 1:
            raise ValueError(f"BISSL.HYPERGRAD.{key} = {hg[key]}: must be >= 1")
    solver, curvature = get_solver(hg.SOLVER), get_curvature(hg.CURVATURE)
    if solver.exact and not curvature.exact_solve:
        exact = " or ".join(repr(c.name) for c in CURVATURES.values() if c.exact_solve)
        iterative = [s.name for s in SOLVERS.values() if not s.exact]
        raise ValueError(
            f"BISSL.HYPERGRAD.SOLVER = {hg.SOLVER!r} needs CURVATURE {exact} (an exact inverse); "
            f"CURVATURE = {hg.CURVATURE!r} has none: use one of {iterative}"
        )
    if hg.INCLUDE_PRETEXT_HEAD and (curvature.from_batch is None or solver.exact):
        raise ValueError(
            "BISSL.HYPERGRAD.INCLUDE_PRETEXT_HEAD needs a curvature built over backbone and head "
            f"(one of {[c.name for c in CURVATURES.values() if c.from_batch is not None]}) and "
            f"an iterative solver; CURVATURE = {hg.CURVATURE!r}, SOLVER = {hg.SOLVER!r}"
        )
    if solver.iterative and hg.MAX_ITER < 1:
        raise ValueError(f"BISSL.HYPERGRAD.MAX_ITER = 0: solver {hg.SOLVER!r} needs >= 1")
    if hg.ADAPTIVE_BASIS and (not solver.stage_basis or hg.TOL <= 0):
        raise ValueError(
            "BISSL.HYPERGRAD.ADAPTIVE_BASIS grows a Lanczos stage basis until its residual "
            f"estimate meets TOL: it needs SOLVER 'lanczos' and TOL > 0; SOLVER = {hg.SOLVER!r}, "
            f"TOL = {hg.TOL}"
        )
