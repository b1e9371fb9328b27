"""Linear solvers over tuples of tensors: CG, layer-wise CG, Neumann series, the exact solve.

Every solver is ``solve(matvec, b, max_iter=..., tol=..., ...) -> (x, SolveInfo)``, ``matvec`` being
``v -> A v`` on tuples shaped like ``b``; the iterative ones work on one flat buffer inside
(:mod:`.flat`); the shared pieces (inner products, :class:`SolveInfo`, errors, the CG loop) live
in :mod:`.krylov`, the stage-level Lanczos solver in :mod:`.lanczos`,
and the table of all of them by name in :mod:`.registry`.
No solver fails silently: a NaN/inf raises :class:`NonFiniteError`, and an operator that is not
positive definite is counted in ``SolveInfo.negative_curvature`` and truncated, continued through
or refused (:class:`IndefiniteSystemError`) as the caller asks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .flat import flat_problem
from .krylov import (
    IndefiniteSystemError,
    MatVec,
    SolveInfo,
    TensorTuple,
    accumulation_dtype,
    apply_matvec,
    finish_info,
    finite_or_raise,
    krylov_cg,
    prepare_rhs,
    true_residual,
    tuple_dot,
)
from .lanczos import lanczos_extremes

__all__ = [
    "conjugate_gradient",
    "direct_solve",
    "layerwise_conjugate_gradient",
    "neumann_series",
]


def conjugate_gradient(
    matvec: MatVec,
    b: TensorTuple,
    max_iter: int = 5,
    tol: float = 0.0,
    on_negative_curvature: str = "truncate",
    check_residual: bool = False,
    flat: bool = True,
) -> tuple[TensorTuple, SolveInfo]:
    """Conjugate gradient on the coupled system ``A x = b`` (``A`` symmetric).

    Starts from ``x0 = 0``. One step size and one conjugation coefficient are shared by all tensors,
    so this is exact CG: for an ``n x n`` SPD operator it solves the system in at most ``n`` steps
    (in exact arithmetic). A search direction ``p`` with ``p^T A p <= 0`` proves that ``A`` is not
    positive definite; what happens then is ``on_negative_curvature``:

    - ``"truncate"`` (truncated-Newton / Steihaug CG): return the iterate before that direction. If
      the very first direction (``p = b``) is one, there is no iterate before it and ``x = b`` is
      returned: the first-order answer, exact for ``A = I``.
    - ``"continue"``: take the step anyway (negative ``alpha``), as the BiSSL paper's CG does.
    - ``"raise"``: raise :class:`IndefiniteSystemError`.

    Args:
        matvec: ``v -> A v`` on tuples shaped like ``b``.
        b: Right-hand side.
        max_iter: Maximum number of iterations (= matrix-vector products).
        tol: Stop once ``||b - A x|| <= tol * ||b||``; 0 runs all ``max_iter`` iterations.
        on_negative_curvature: ``"truncate"``, ``"continue"`` or ``"raise"``.
        check_residual: Recompute ``||b - A x||`` at the end with one more product.
        flat: Work on one flat buffer (:mod:`.flat`); False: per tensor (same result up to
            rounding, many more kernels).

    Returns:
        The solution tuple (same shapes and dtypes as ``b``) and a :class:`SolveInfo`. Its residual
        is CG's recurrence residual, equal to ``||b - A x||`` in exact arithmetic
        (``residual_is_true``); rounding makes them drift apart over many iterations, which
        ``check_residual`` rules out.

    Raises:
        NonFiniteError: If ``b``, ``p^T A p``, the residual or a step size becomes NaN/inf.
        IndefiniteSystemError: With ``on_negative_curvature="raise"``, at the first
            ``p^T A p <= 0``.
    """
    name = "conjugate_gradient"
    matvec, b, unpack = flat_problem(matvec, prepare_rhs(b, max_iter, tol, name), name, flat)
    x, info = krylov_cg(matvec, b, max_iter, tol, on_negative_curvature, check_residual, name)
    return unpack(x), info


def layerwise_conjugate_gradient(
    matvec: MatVec,
    b: TensorTuple,
    max_iter: int = 5,
    tol: float = 0.0,
    on_negative_curvature: str = "truncate",
    check_residual: bool = False,
    eps: float = 0.0,
) -> tuple[TensorTuple, SolveInfo]:
    """The BiSSL reference code's CG variant: a separate step size per tensor.

    Each tensor ``i`` gets ``alpha_i = <r_i, r_i> / <p_i, (A p)_i>`` and
    ``beta_i = <r_i', r_i'> / <r_i, r_i>``. This is exact CG per block when ``A`` is block diagonal
    with one block per tensor, but NOT exact CG on a coupled system (residuals lose orthogonality).
    Kept for parity with the reference; prefer :func:`conjugate_gradient`. Its per-tensor step
    sizes need per-tensor inner products, so it works on the tuple (not one flat buffer: one
    dot per tensor either way). Every tensor whose
    denominator ``<p_i, (A p)_i>`` is ``<= 0`` (with ``p_i != 0``) counts as one negative-curvature
    direction, handled as in :func:`conjugate_gradient` (``"truncate"`` drops the whole step). On a
    coupled system such a denominator also occurs for SPD ``A`` (``(A p)_i`` contains the coupling
    to the other tensors), so it proves indefiniteness only for block-diagonal ``A``; the
    reference code steps on: ``"continue"``.

    Args:
        matvec, b, max_iter, on_negative_curvature: As in :func:`conjugate_gradient`.
        tol: Stop once the reported residual is ``<= tol * ||b||``.
        check_residual: Report the true ``||b - A x||`` (one more product), not the recurrence.
        eps: Added to both denominators, as the reference does with 1e-12 (0 here: exact; a zero
            denominator makes that tensor's step 0 instead).

    Returns:
        The solution tuple and a :class:`SolveInfo`. Without ``check_residual`` its residual is the
        norm of the per-tensor recurrence (``residual_is_true=False``): it equals ``||b - A x||``
        only when ``A`` is block diagonal, because per-tensor steps do not commute with a coupled
        ``A``.

    Raises:
        NonFiniteError: If ``b``, a residual or a step size becomes NaN/inf.
        IndefiniteSystemError: With ``on_negative_curvature="raise"``, at the first negative
            per-tensor denominator.
    """
    return krylov_cg(
        matvec,
        b,
        max_iter,
        tol,
        on_negative_curvature,
        check_residual,
        "layerwise_conjugate_gradient",
        per_tensor=True,
        eps=eps,
    )


def neumann_series(
    matvec: MatVec,
    b: TensorTuple,
    max_iter: int = 5,
    tol: float = 0.0,
    alpha: float | None = None,
    power_iters: int = 10,
    check_residual: bool = False,
    flat: bool = True,
) -> tuple[TensorTuple, SolveInfo]:
    """Truncated Neumann series ``x = alpha * sum_{k=0..max_iter} (I - alpha A)^k b``.

    Converges to ``A^-1 b`` iff the spectral radius of ``I - alpha A`` (on the eigenvectors present
    in ``b``) is below 1; for SPD ``A``: ``0 < alpha < 2 / lambda_max``. ``power_iters`` Lanczos
    steps from ``b`` (:func:`.lanczos_extremes`) estimate the extreme eigenvalues first. In exact
    arithmetic Ritz values lie inside the spectrum; in floating point a product carries rounding of
    about ``sqrt(eps) * lambda_max`` (a float32 dot over millions of terms), and a Ritz value
    within that of 0 cannot tell a small positive eigenvalue (the damping of a low-rank Fisher)
    from an indefinite ``A``. So:

    - ``lambda_min`` estimate ``<= -sqrt(eps) * lambda_max``: beyond rounding, ``A`` is not
      positive definite and no step size converges: :class:`IndefiniteSystemError`.
    - within ``sqrt(eps) * lambda_max`` of 0: the series runs (``|1 - alpha lambda|`` exceeds 1 by
      at most that rounding level, so ``max_iter`` terms do not diverge; those components
      converge slowly, as the logged residual shows).
    - ``alpha`` given and ``|1 - alpha * theta| >= 1`` for an extreme Ritz value ``theta``: the
      series diverges: ``ValueError``.

    ``alpha=None`` uses ``alpha = 1 / lambda_max`` estimate. The optimal ``2 / (min + max)`` is not
    used because Ritz values underestimate ``lambda_max``: with ``1 / theta_max`` the series still
    converges as long as the true ``lambda_max < 2 theta_max`` (rate ``1 - lambda_min/theta_max``).

    The residual of the partial sum through term ``k`` is ``(I - alpha A)^(k+1) b``, so reporting
    the exact residual of the returned ``x`` costs one product more than the series itself.

    Args:
        matvec: ``v -> A v`` on tuples shaped like ``b``.
        b: Right-hand side.
        max_iter: Index of the last series term (``max_iter + 1`` terms).
        tol: Stop adding terms once ``||b - A x|| <= tol * ||b||``.
        alpha: Step size; None estimates it.
        power_iters: Lanczos steps of the eigenvalue estimate (0: no estimate and no check; only
            with a given ``alpha``).
        check_residual: Recompute ``||b - A x||`` directly at the end (one more product).
        flat: Work on one flat buffer (:mod:`.flat`); False: per tensor.

    Returns:
        The solution tuple and a :class:`SolveInfo` (``iterations`` = terms after the first;
        ``products`` include the estimate's and the residual's).

    Raises:
        IndefiniteSystemError: If the smallest eigenvalue estimate is ``<= 0``.
        ValueError: For ``alpha <= 0``, or a given ``alpha`` the estimate shows divergent.
        NonFiniteError: If ``b`` or a series term becomes NaN/inf.
    """
    name = "neumann_series"
    matvec, b, unpack = flat_problem(matvec, prepare_rhs(b, max_iter, tol, name), name, flat)
    if alpha is not None and not alpha > 0:
        raise ValueError(f"{name}: alpha must be > 0, got {alpha}")
    if power_iters < 0 or (alpha is None and power_iters == 0):
        raise ValueError(f"{name}: power_iters must be >= 1 to estimate alpha, got {power_iters}")
    with torch.no_grad():
        b_norm = math.sqrt(finite_or_raise(tuple_dot(b, b).item(), "||b||^2", name, 0))
    products = 0
    if power_iters > 0 and b_norm > 0:
        lam_min, lam_max, est = lanczos_extremes(matvec, b, steps=power_iters)
        products += est.products
        seen = (
            f"Lanczos estimate from b ({est.steps} steps): lambda in [{lam_min:.4g}, {lam_max:.4g}]"
        )
        rounding = math.sqrt(torch.finfo(accumulation_dtype(b[0])).eps) * abs(lam_max)
        if lam_min <= -rounding or lam_max <= 0:
            raise IndefiniteSystemError(
                f"{name}: {seen}; the smallest eigenvalue is < 0 beyond rounding "
                f"({rounding:.3g}), so A is not positive definite "
                "and the spectral radius of I - alpha A is >= 1 for every alpha: the series cannot "
                "converge. Use a PSD curvature (Gauss-Newton, Fisher), more damping, or solver "
                "'cg' with on_negative_curvature='truncate'."
            )
        if alpha is None:
            alpha = 1.0 / lam_max
        elif alpha * lam_max >= 2:  # |1 - alpha lambda| >= 1 at the top (the bottom: above)
            raise ValueError(
                f"{name}: alpha = {alpha:.4g} makes the spectral radius of I - alpha A >= 1 "
                f"({seen}), so the series diverges; use alpha < {2 / lam_max:.4g} or alpha=None."
            )
    alpha = 1.0 if alpha is None else alpha  # b = 0: any step gives x = 0
    with torch.no_grad():
        term = [t.clone() for t in b]  # (I - alpha A)^k b, also the residual of the sum up to k-1
        total = [t.clone() for t in b]
    threshold = tol * b_norm
    iterations = 0
    while True:
        a_term = apply_matvec(matvec, tuple(term), b, name)
        products += 1
        with torch.no_grad():
            torch._foreach_add_(term, a_term, alpha=-alpha)
            residual = math.sqrt(
                finite_or_raise(
                    tuple_dot(tuple(term), tuple(term)).item(), "residual", name, iterations + 1
                )
            )
            if iterations == max_iter or residual <= threshold:
                break
            torch._foreach_add_(total, term)
        iterations += 1
    with torch.no_grad():
        torch._foreach_mul_(total, alpha)
    x = tuple(total)
    return unpack(x), finish_info(
        matvec,
        x,
        b,
        residual,
        tol,
        check_residual,
        iterations=iterations,
        products=products,
        residual_is_true=True,
        negative_curvature=0,
        truncated=False,
    )


def direct_solve(
    matvec: MatVec,
    b: TensorTuple,
    check_residual: bool = False,
    exact_solve: Callable[[TensorTuple], TensorTuple] | None = None,
) -> tuple[TensorTuple, SolveInfo]:
    """``x = exact_solve(b)``: the operator's own exact inverse (the Fisher's Woodbury solve).

    Args:
        matvec: ``v -> A v``; used only for the true residual.
        b: Right-hand side.
        check_residual: Report ``||b - A x||`` (one product). Without it the residual is NaN and
            the solve counts as converged: it is exact up to rounding by construction.
        exact_solve: ``b -> A^-1 b``; a stage system passes its curvature's damped solve.

    Returns:
        ``x`` and a :class:`SolveInfo` with no iterations; with ``check_residual``, ``converged``
        is False if the residual exceeds ``1e-3 ||b||``, which only a wrong inverse gives.

    Raises:
        ValueError: Without ``exact_solve``.
        NonFiniteError: If ``b`` or ``x`` is NaN/inf.
    """
    name = "direct_solve"
    if exact_solve is None:
        raise ValueError(
            f"{name}: needs a curvature with an exact damped solve (the Fisher's Woodbury "
            "inverse); use an iterative solver"
        )
    b = prepare_rhs(b, 0, 0.0, name)
    with torch.no_grad():
        finite_or_raise(tuple_dot(b, b).item(), "||b||^2", name, 0)
        x = tuple(exact_solve(b))
        finite_or_raise(tuple_dot(x, x).item(), "||x||^2", name, 0)
    if not check_residual:
        return x, SolveInfo(0, 0, math.nan, math.nan, False, 0, False, True)
    norm, rel = true_residual(matvec, x, b)
    return x, SolveInfo(0, 1, norm, rel, True, 0, False, rel <= 1e-3)
