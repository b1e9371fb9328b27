"""The implicit gradient of one BiSSL stage: the damped system, built once, solved per upper step.

Lower level: ``theta*(phi) = argmin_theta L_P(theta) + lam/2 ||theta - phi||^2``. Differentiating
its optimality condition ``grad L_P(theta*) + lam (theta* - phi) = 0`` gives
``d theta* / d phi = lam (H + lam I)^-1`` (symmetric), hence

    d/dphi L_D(theta*(phi)) = lam (H + lam I)^-1 g = (I + H / lam)^-1 g,

with ``H`` the Hessian of ``L_P`` at ``theta*`` and ``g = grad_theta L_D``. BiSSL solves the damped
system ``(I + C / (lam + delta)) x = g`` (``delta = 0`` is exact) with a few solver steps, ``C``
the Hessian or a PSD stand-in for it (:mod:`.curvature`, :mod:`.fisher`).

:class:`StageSystem` is the one place where a curvature, the damping and a solver of
:mod:`.registry` become that system: the trainer, the closed-form and finite-difference tests
and the benchmarks all solve through it. Callers pass tuples of tensors; the system is solved on
one flat buffer (:mod:`.flat`) and ``x`` returned as views of it shaped like ``g``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .curvature import AllReduce, Curvature, ProductCurvature
from .flat import FlatLayout, flat_problem
from .krylov import MatVec, SolveInfo, TensorTuple, apply_matvec, tuple_cosine, tuple_norm
from .lanczos import LanczosBasis, lanczos_extremes
from .registry import Solver, get_solver

__all__ = [
    "ImplicitGradInfo",
    "StageSystem",
    "damped_matvec",
    "implicit_gradient",
    "joint_damped_matvec",
]


def _damping_scale(lam: float, damping: float) -> float:
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    if not damping >= 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    return 1.0 / (lam + damping)


def damped_matvec(
    hvp: Callable[[TensorTuple], TensorTuple],
    lam: float,
    damping: float,
    all_reduce: AllReduce | None = None,
) -> MatVec:
    """The operator ``v -> v + all_reduce(H v) / (lam + damping)`` of the implicit-gradient system.

    Args:
        hvp: ``v -> H v`` on this process's data.
        lam: Proximal weight of the lower level (> 0).
        damping: Extra damping ``delta`` (>= 0); 0 gives the exact system ``I + H / lam``.
        all_reduce: Averages a tuple over processes (so ``H`` is the Hessian of the global mean
            loss); None for a single process. Applied to ``H v`` only; ``v`` is already global.

    Returns:
        The matrix-vector product, for the solvers in :mod:`bissl_det.bilevel.registry`.
    """
    scale = _damping_scale(lam, damping)

    def matvec(v: TensorTuple) -> TensorTuple:
        hv = hvp(v)
        if all_reduce is not None:
            hv = all_reduce(hv)
        with torch.no_grad():
            # Out of place: hvp may return tensors aliasing v (or buffers it reuses).
            return tuple(torch._foreach_add(list(v), [h.detach() for h in hv], alpha=scale))

    return matvec


def joint_damped_matvec(
    curvature_matvec: Callable[[TensorTuple], TensorTuple], num_backbone: int, scale: float
) -> MatVec:
    """``v -> P v + scale * C v`` with ``P = diag(I_backbone, 0_head)``.

    The operator of the exact implicit gradient when the pretext head ``theta_p`` is a lower
    variable too (unregularised): with ``C`` over ``(theta, theta_p)``, solving
    ``(P + C / lam) x = (g, 0)`` gives ``dL/dphi = x_theta``, equivalent to the Schur complement
    ``(I + (H_tt - H_tp H_pp^-1 H_pt) / lam)^-1 g``. The first ``num_backbone`` tensors are
    ``theta``. ``C`` must be nonsingular on the head block (``H_pp``) for a unique solution.
    """
    if not scale > 0:
        raise ValueError(f"joint_damped_matvec: scale must be > 0, got {scale}")

    def matvec(v: TensorTuple) -> TensorTuple:
        cv = curvature_matvec(v)
        with torch.no_grad():
            out = [c.detach() * scale for c in cv]
            torch._foreach_add_(out[:num_backbone], list(v[:num_backbone]))
        return tuple(out)

    return matvec


@dataclass
class ImplicitGradInfo:
    """Diagnostics of one implicit-gradient solve.

    Attributes:
        solve_info: The solver's own :class:`SolveInfo` (iterations, residual, negative
            curvature, ...), for the whole system (with the head rows in the joint system).
        products: Curvature products this solve used (not the stage's basis or eigenvalue
            estimate, see :meth:`StageSystem.stage_products`).
        cosine: Cosine between ``x`` and ``g`` (1 when ``C`` has no effect).
        norm_ratio: ``||x|| / ||g||``.
    """

    solve_info: SolveInfo
    products: int
    cosine: float
    norm_ratio: float

    @property
    def iterations(self) -> int:
        return self.solve_info.iterations

    @property
    def residual_norm(self) -> float:
        return self.solve_info.residual_norm

    @property
    def converged(self) -> bool:
        return self.solve_info.converged


class StageSystem:
    """``A x = g`` with ``A = I + C / (lam + damping)`` for one stage (``C`` fixed): its solves.

    With ``head`` (the pretext head's tensors, ``C`` built over ``(*backbone, *head)``) the
    joint system of :func:`joint_damped_matvec` is solved with right-hand side ``(g, 0)`` and the
    backbone part returned. A solver with a stage basis (``"lanczos"``) builds it at the first
    solve, from that right-hand side; with ``eigen_steps > 0`` the other solvers estimate the
    extreme eigenvalues of ``A`` then. Both are reused by the stage's later solves.

    Args:
        curvature: The stage's matrix ``C`` (products already averaged over processes).
        lam: Proximal weight of the lower level (> 0).
        damping: Extra damping ``delta`` (>= 0; 0: the exact system).
        solver: A name in :data:`~bissl_det.bilevel.registry.SOLVERS`, or a :class:`Solver`.
        head: Pretext-head tensors (templates of the zero right-hand side); empty: no head.
        eigen_steps: Lanczos steps of the eigenvalue estimate (0: none).
        basis_size: Size of a stage basis (with ``basis_tol``: its cap).
        basis_tol: > 0: the stage basis grows only until the free residual estimate of its
            first right-hand side meets it (:meth:`LanczosBasis.build`); 0: ``basis_size``.
        **solver_options: Passed to every solve (``max_iter``, ``tol``,
            ``on_negative_curvature``, ``check_residual``, solver-specific options).

    Attributes:
        eigen: ``(lambda_min, lambda_max)`` estimates of ``A`` once known, else None.
    """

    def __init__(
        self,
        curvature: Curvature,
        lam: float,
        damping: float,
        solver: str | Solver = "cg",
        *,
        head: Sequence[torch.Tensor] = (),
        eigen_steps: int = 0,
        basis_size: int = 20,
        basis_tol: float = 0.0,
        **solver_options: Any,
    ) -> None:
        self.curvature, self.head = curvature, tuple(head)
        self.scale = _damping_scale(lam, damping)
        self._lam, self._damping = lam, damping
        self.solver = get_solver(solver) if isinstance(solver, str) else solver
        if self.solver.exact and self.head:
            raise ValueError(
                f"solver {self.solver.name!r} cannot solve the joint (backbone, head) system: "
                "P + C/(lam+delta) is not of the form I + low rank; use an iterative solver"
            )
        if self.solver.exact and not curvature.has_exact_solve:
            raise ValueError(
                f"solver {self.solver.name!r} needs a curvature with an exact damped solve; "
                f"{type(curvature).__name__} has none"
            )
        self.eigen_steps, self.basis_size, self.basis_tol = eigen_steps, basis_size, basis_tol
        self.options = solver_options
        self.eigen: tuple[float, float] | None = None
        self._start = curvature.products  # a Fisher history is counted across stages
        self._basis: LanczosBasis | None = None

    def operator(self, num_backbone: int) -> MatVec:
        """``v -> A v`` for a right-hand side with ``num_backbone`` backbone tensors."""
        if self.head:
            return joint_damped_matvec(self.curvature.matvec, num_backbone, self.scale)
        return damped_matvec(self.curvature.matvec, self._lam, self._damping)

    def solve(self, g: TensorTuple) -> tuple[TensorTuple, ImplicitGradInfo]:
        """The implicit gradient ``x`` (shaped like ``g``) and its diagnostics."""
        g = tuple(t.detach() for t in g)
        rhs = (*g, *(torch.zeros_like(h, dtype=g[0].dtype) for h in self.head))
        matvec = self.operator(len(g))
        exact = self.curvature.solve_damped if self.solver.exact else None
        exact_solve = None if exact is None else (lambda b: exact(b, self.scale))
        # Solved on one flat buffer (one kernel per inner product, a basis as one matrix); the
        # backbone part of x and g is the buffer's first n_g numbers.
        layout = FlatLayout.of(rhs)
        n_g = sum(t.numel() for t in g)
        if layout is not None:
            if self.head:
                matvec, rhs = flat_problem(matvec, rhs, "StageSystem.solve")[:2]
            else:
                matvec, rhs = self._flat_operator(layout), (layout.flatten(rhs),)
            if exact_solve is not None:
                solve_tuple = exact_solve

                def exact_solve(b: TensorTuple) -> TensorTuple:
                    return (layout.flatten(tuple(solve_tuple(layout.views(b[0])))),)

        if self.solver.stage_basis and self._basis is None:
            self._basis = LanczosBasis.build(matvec, rhs, self.basis_size, tol=self.basis_tol)
            theta = self._basis.ritz_values
            self.eigen = (theta[0].item(), theta[-1].item())
        elif self.eigen is None and self.eigen_steps > 0:
            low, high, _ = lanczos_extremes(matvec, rhs, self.eigen_steps)
            self.eigen = (low, high)
        start = self.curvature.products
        x, info = self.solver(
            matvec, rhs, basis=self._basis, exact_solve=exact_solve, **self.options
        )
        if layout is None:
            x = x_g = tuple(x[: len(g)])
            g_flat = g
        else:
            x_g, g_flat = (x[0][:n_g],), (rhs[0][:n_g],)
            x = layout.views(x[0])[: len(g)]
        g_norm = tuple_norm(g_flat).item()
        return x, ImplicitGradInfo(
            solve_info=info,
            products=self.curvature.products - start,
            cosine=tuple_cosine(x_g, g_flat).item(),
            norm_ratio=tuple_norm(x_g).item() / g_norm if g_norm > 0 else 0.0,
        )

    def _flat_operator(self, layout: FlatLayout) -> MatVec:
        """``v -> v + scale * C v`` on flat buffers: ``C v`` concatenated into the output buffer
        and the damping added there, so a product holds one flat vector beyond ``C``'s own."""

        def matvec(v: TensorTuple) -> TensorTuple:
            views = layout.views(v[0])
            cv = apply_matvec(self.curvature.matvec, views, views, "StageSystem.solve")
            out = layout.flatten(tuple(cv))
            del cv
            return (torch.add(v[0], out, alpha=self.scale, out=out),)

        return matvec

    @property
    def basis_vectors(self) -> int | None:
        """Size of the stage basis once built (an adaptive one may be below ``basis_size``)."""
        return None if self._basis is None else self._basis.size

    def stage_products(self) -> int:
        """Curvature products since this system was built (basis, estimates and solves)."""
        return self.curvature.products - self._start

    def release(self) -> None:
        """Free the stage basis and what the curvature holds; later solves raise."""
        if self._basis is not None:
            self._basis.release()
        self.curvature.release()


def implicit_gradient(
    curvature: Curvature | Callable[[TensorTuple], TensorTuple],
    g: TensorTuple,
    lam: float = 1e-3,
    damping: float = 10.0,
    solver: str = "cg",
    all_reduce: AllReduce | None = None,
    **options: Any,
) -> tuple[TensorTuple, ImplicitGradInfo]:
    """One solve of :class:`StageSystem`: ``(I + C / (lam + damping)) x = g``.

    With ``damping = 0`` and a converged solve, ``x = lam (C + lam I)^-1 g``, for ``C = H`` the
    derivative ``d/dphi L_D(theta*(phi))``.

    Args:
        curvature: A :class:`Curvature`, or any ``v -> C v`` callable (products on this
            process's data; ``all_reduce`` averages them).
        g: Gradient of the upper loss w.r.t. the lower parameters (averaged over processes).
        lam, damping, solver: As in :class:`StageSystem`.
        all_reduce: Averages the callable's products over processes; None for one process.
        **options: :class:`StageSystem` keywords (``head``, ``eigen_steps``, ...) and solver
            options (``max_iter``, ``tol``, ``alpha``, ...).
    """
    if not isinstance(curvature, Curvature):
        curvature = ProductCurvature(curvature, all_reduce)
    elif all_reduce is not None:
        raise ValueError("implicit_gradient: a Curvature averages its own products (all_reduce)")
    return StageSystem(curvature, lam, damping, solver, **options).solve(g)
