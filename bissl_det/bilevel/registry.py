"""Every solver and every curvature of the implicit gradient, by the name the config uses.

``BISSL.HYPERGRAD.SOLVER`` and ``BISSL.HYPERGRAD.CURVATURE`` are looked up here and nowhere else.
A new variant is one entry in a table; what a caller must know about it (does it iterate, does it
need an exact inverse, is it built from a batch) is a field of the entry, not a name test.

Solvers share one call: ``SOLVERS[name](matvec, b, max_iter=..., tol=...,
on_negative_curvature=..., check_residual=..., exact_solve=..., basis=..., **options)``. Of these
common arguments each solver receives only those it takes (Neumann has no negative-curvature mode,
the exact solve no iteration count); solver-specific ``options`` (``alpha``, ``eps``,
``power_iters``, ``basis_size``) are passed as they are, so a misspelt one still fails.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .curvature import AllReduce, Curvature, gauss_newton_of_batch, hessian_of_batch
from .fisher import EmpiricalFisherCurvature
from .krylov import MatVec, SolveInfo, TensorTuple
from .lanczos import lanczos_solve
from .solvers import (
    conjugate_gradient,
    direct_solve,
    layerwise_conjugate_gradient,
    neumann_series,
)

__all__ = [
    "CURVATURES",
    "SOLVERS",
    "CurvatureKind",
    "Solver",
    "get_curvature",
    "get_solver",
    "pretext_curvature",
]

# Arguments every solver may be offered; a solver takes the ones its signature names.
COMMON_ARGUMENTS = frozenset(
    ("max_iter", "tol", "on_negative_curvature", "check_residual", "exact_solve", "basis")
)


@dataclass(frozen=True)
class Solver:
    """A linear solver ``(matvec, b, ...) -> (x, SolveInfo)`` and what callers must know of it.

    Attributes:
        name: The config name (``BISSL.HYPERGRAD.SOLVER``).
        solve: The function.
        iterative: Needs ``max_iter >= 1`` (the Lanczos basis answers with 0 iterations).
        exact: Needs the curvature's exact damped solve (``exact_solve``); backbone system only.
        stage_basis: Solves from a Lanczos basis a stage builds once (``basis``).
    """

    name: str
    solve: Callable[..., tuple[TensorTuple, SolveInfo]]
    iterative: bool = True
    exact: bool = False
    stage_basis: bool = False
    _takes: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_takes", frozenset(inspect.signature(self.solve).parameters))

    def __call__(self, matvec: MatVec, b: TensorTuple, **kwargs) -> tuple[TensorTuple, SolveInfo]:
        """Solve ``A x = b``; common arguments this solver does not take are dropped."""
        kwargs = {k: v for k, v in kwargs.items() if k in self._takes or k not in COMMON_ARGUMENTS}
        return self.solve(matvec, b, **kwargs)


SOLVERS: dict[str, Solver] = {
    s.name: s
    for s in (
        Solver("cg", conjugate_gradient),
        Solver("layerwise_cg", layerwise_conjugate_gradient),
        Solver("neumann", neumann_series),
        Solver("lanczos", lanczos_solve, iterative=False, stage_basis=True),
        Solver("direct", direct_solve, iterative=False, exact=True),
    )
}


def get_solver(name: str) -> Solver:
    """The solver called ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(
            f"unknown implicit-gradient solver {name!r}; valid names: {sorted(SOLVERS)}"
        ) from None


BatchBuilder = Callable[
    [nn.Module, Sequence[torch.Tensor], Sequence[torch.Tensor], AllReduce | None], Curvature
]


@dataclass(frozen=True)
class CurvatureKind:
    """How a stage's matrix ``C`` is made, and what it allows.

    Exactly one of ``from_batch`` / ``from_history`` is set.

    Attributes:
        name: The config name (``BISSL.HYPERGRAD.CURVATURE``).
        psd: Positive semi-definite by construction (the damped system is SPD).
        from_batch: ``(pretext_model, batch, params, all_reduce) -> Curvature``, once per stage;
            any parameter list works, so also the joint (backbone, pretext head) system.
        from_history: ``(history_size, device) -> Curvature`` made once per run, fed by the lower
            steps' gradients (backbone only).
        exact_solve: Has an exact damped solve (the ``"direct"`` solver's inverse).
        options: ``BISSL.HYPERGRAD`` key -> keyword argument of ``from_batch`` it sets.
    """

    name: str
    psd: bool
    from_batch: BatchBuilder | None = None
    from_history: Callable[[int, str | None], Curvature] | None = None
    exact_solve: bool = False
    options: dict[str, str] = field(default_factory=dict)

    def options_from(self, hypergrad) -> dict:
        """The builder's keyword arguments from a ``BISSL.HYPERGRAD`` mapping."""
        return {arg: hypergrad[key] for key, arg in self.options.items()}


CURVATURES: dict[str, CurvatureKind] = {
    c.name: c
    for c in (
        CurvatureKind("hessian", psd=False, from_batch=hessian_of_batch),
        CurvatureKind("ggn", psd=True, from_batch=gauss_newton_of_batch, options={"GGN_JV": "jv"}),
        CurvatureKind(
            "fisher",
            psd=True,
            from_history=lambda size, device: EmpiricalFisherCurvature(size, device=device),
            exact_solve=True,
        ),
    )
}


def get_curvature(name: str) -> CurvatureKind:
    """The curvature called ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return CURVATURES[name]
    except KeyError:
        raise ValueError(f"unknown stage curvature {name!r}; valid: {sorted(CURVATURES)}") from None


def pretext_curvature(
    kind: str,
    pretext_model: nn.Module,
    batch: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    all_reduce: AllReduce | None = None,
    **options,
) -> Curvature:
    """The stage matrix ``kind`` on one pretext batch (see :class:`CurvatureKind.from_batch`);
    ``options``: its builder's keyword arguments (:attr:`CurvatureKind.options`).

    Raises:
        ValueError: For an unknown name or a kind not built from a batch (the Fisher is a
            history the lower steps fill).
    """
    entry = get_curvature(kind)
    if entry.from_batch is None:
        raise ValueError(
            f"stage curvature {kind!r} is not built from a batch: it is a history the lower "
            "steps fill (CurvatureKind.from_history)"
        )
    return entry.from_batch(pretext_model, batch, params, all_reduce, **options)
