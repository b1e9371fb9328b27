"""Building blocks of the Krylov solvers over tuples of tensors: inner products, diagnostics,
errors and the one CG loop (plain, per-tensor, preconditioned) the solvers share.

Every solver (:mod:`.solvers`, :mod:`.lanczos`) takes ``matvec`` (a linear operator ``A`` given as
a function on tuples of tensors shaped like ``b``) and returns an approximate solution of
``A x = b`` together with a :class:`SolveInfo`. The code here works on any tuple; the solvers
hand it 1-tuples of one flat buffer (:mod:`.flat`), so an inner product or an update is one
kernel, not one per tensor. Updates use in-place ``torch._foreach_*`` ops on buffers allocated
once per solve.

Inner products accumulate in at least float32 (float64 stays float64), so half-precision inputs do
not overflow or lose the residual in rounding. A non-finite quantity raises
:class:`NonFiniteError`; nothing is silently replaced by zeros. A direction of non-positive
curvature (``p^T A p <= 0``: ``A`` is not positive definite) is counted in every
:class:`SolveInfo` and handled as the caller asks: truncate, continue or raise
:class:`IndefiniteSystemError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

TensorTuple = tuple[torch.Tensor, ...]
MatVec = Callable[[TensorTuple], TensorTuple]

NEGATIVE_CURVATURE_MODES = ("truncate", "continue", "raise")

__all__ = [
    "NEGATIVE_CURVATURE_MODES",
    "IndefiniteSystemError",
    "MatVec",
    "NonFiniteError",
    "SolveInfo",
    "TensorTuple",
    "krylov_cg",
    "true_residual",
    "tuple_cosine",
    "tuple_dot",
    "tuple_norm",
]


class NonFiniteError(FloatingPointError):
    """A solver met a NaN or infinity (in ``b``, in ``A v`` or in a step size)."""


class IndefiniteSystemError(ValueError):
    """The operator is not positive definite where the solver needs it to be."""


@dataclass
class SolveInfo:
    """What a solve did; the same fields for every solver.

    Attributes:
        iterations: Iterations run (CG: search directions tried; Neumann: series terms added
            after the first; Lanczos basis: CG correction iterations).
        products: Matrix-vector products this call used, including those for an eigenvalue
            estimate or a final true residual (not those of a prebuilt Lanczos basis).
        residual_norm: ``||b - A x||`` of the returned ``x``, or an estimate of it: see
            ``residual_is_true``.
        rel_residual: ``residual_norm / ||b||`` (0 when ``b = 0``).
        residual_is_true: True when ``residual_norm`` equals ``||b - A x||`` in exact arithmetic
            (computed with a product, or by a recurrence that is exact for this method: CG,
            Neumann); False when it is an estimate that can differ by construction (layer-wise
            CG's per-tensor recurrence, the Lanczos basis' model of ``A`` outside its span).
        negative_curvature: Directions with ``p^T A p <= 0`` met (layer-wise CG: per tensor;
            Lanczos basis: Ritz values ``<= 0``).
        truncated: Whether the solve stopped at (or dropped) a negative-curvature direction.
        converged: Whether ``residual_norm <= tol * ||b||``.
    """

    iterations: int
    products: int
    residual_norm: float
    rel_residual: float
    residual_is_true: bool
    negative_curvature: int
    truncated: bool
    converged: bool


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    # float16/bfloat16 sums overflow or round away small residuals; float64 must not be demoted.
    return torch.promote_types(t.dtype, torch.float32)


def check_pair(a: TensorTuple, b: TensorTuple) -> None:
    if len(a) != len(b):
        raise ValueError(f"tuple lengths differ: {len(a)} vs {len(b)}")
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.shape != y.shape:
            raise ValueError(f"shape mismatch at index {i}: {tuple(x.shape)} vs {tuple(y.shape)}")


def _dots(a: TensorTuple, b: TensorTuple) -> torch.Tensor:
    """Per-tensor inner products ``<a_i, b_i>`` as one 1-D tensor (accumulation dtype)."""
    if not a:
        return torch.zeros(0)
    acc = accumulation_dtype(a[0])
    if len(a) == 1:  # one flat buffer (:mod:`.flat`): one kernel
        return torch.dot(a[0].reshape(-1).to(acc), b[0].reshape(-1).to(acc)).reshape(1)
    return torch.stack(
        [torch.dot(x.reshape(-1).to(acc), y.reshape(-1).to(acc)) for x, y in zip(a, b, strict=True)]
    )


def _total(dots: torch.Tensor) -> torch.Tensor:
    """Sum of per-tensor dots; for one flat buffer its single dot (no reduction kernel)."""
    return dots[0] if dots.numel() == 1 else dots.sum()


def tuple_dot(a: TensorTuple, b: TensorTuple) -> torch.Tensor:
    """Inner product of two tuples of tensors, summed over all tensors.

    Args:
        a: Tensors.
        b: Tensors with the same shapes as ``a``.

    Returns:
        A 0-d tensor in float32 (float64 if the inputs are float64) on the inputs' device.
    """
    check_pair(a, b)
    return _total(_dots(a, b))


def tuple_norm(ts: TensorTuple) -> torch.Tensor:
    """Euclidean norm of a tuple of tensors seen as one vector (0-d, float32 or float64)."""
    if len(ts) <= 1:
        return tuple_dot(ts, ts).sqrt()
    # One foreach kernel for the per-tensor norms (not one dot per tensor), then their norm.
    acc = accumulation_dtype(ts[0])
    norms = torch._foreach_norm(list(ts), 2, dtype=acc)
    return torch.linalg.vector_norm(torch.stack(norms))


def tuple_cosine(a: TensorTuple, b: TensorTuple, eps: float = 1e-30) -> torch.Tensor:
    """Cosine similarity of two tuples of tensors seen as vectors (0 if either is zero)."""
    return tuple_dot(a, b) / (tuple_norm(a) * tuple_norm(b)).clamp_min(eps)


def finite_or_raise(value: float, what: str, solver: str, iteration: int) -> float:
    if not math.isfinite(value):
        raise NonFiniteError(f"{solver}: {what} is {value} at iteration {iteration}")
    return value


def prepare_rhs(b: TensorTuple, max_iter: int, tol: float, solver: str) -> TensorTuple:
    if max_iter < 0:
        raise ValueError(f"{solver}: max_iter must be >= 0, got {max_iter}")
    if tol < 0:
        raise ValueError(f"{solver}: tol must be >= 0, got {tol}")
    if len(b) == 0:
        raise ValueError(f"{solver}: b is an empty tuple")
    return tuple(t.detach() for t in b)


def check_mode(mode: str, solver: str) -> None:
    if mode not in NEGATIVE_CURVATURE_MODES:
        raise ValueError(
            f"{solver}: on_negative_curvature must be one of {NEGATIVE_CURVATURE_MODES}, "
            f"got {mode!r}"
        )


def apply_matvec(matvec: MatVec, v: TensorTuple, b: TensorTuple, solver: str) -> list[torch.Tensor]:
    out = list(matvec(v))
    try:
        check_pair(tuple(out), b)
    except ValueError as e:
        raise ValueError(f"{solver}: matvec output does not match b: {e}") from None
    return [t.detach() for t in out]


def indefinite_error(solver: str, what: str) -> IndefiniteSystemError:
    """The error every solver raises for ``on_negative_curvature="raise"`` (one wording)."""
    return IndefiniteSystemError(
        f"{solver}: {what}: the operator A is not positive definite, so CG-type methods lose "
        "their guarantee (the iterate can grow far longer than b and point away from it). "
        "Make A positive definite (a PSD curvature such as the Gauss-Newton or Fisher matrix, "
        "or more damping) or pass on_negative_curvature='truncate'."
    )


def true_residual(matvec: MatVec, x: TensorTuple, b: TensorTuple) -> tuple[float, float]:
    """``(||b - A x||, ||b - A x|| / ||b||)`` at the cost of one matrix-vector product.

    The relative residual is 0 when ``b = 0`` and ``A x = 0``, and ``inf`` when only ``b = 0``.
    """
    b = tuple(t.detach() for t in b)
    check_pair(tuple(x), b)
    ax = apply_matvec(matvec, tuple(t.detach() for t in x), b, "true_residual")
    with torch.no_grad():
        r = torch._foreach_sub(list(b), ax)
        norm = tuple_norm(tuple(r)).item()
        b_norm = tuple_norm(b).item()
    if b_norm > 0:
        return norm, norm / b_norm
    return norm, 0.0 if norm == 0 else math.inf


def finish_info(
    matvec: MatVec,
    x: TensorTuple,
    b: TensorTuple,
    residual: float,
    tol: float,
    check_residual: bool,
    *,
    iterations: int,
    products: int,
    residual_is_true: bool,
    negative_curvature: int,
    truncated: bool,
) -> SolveInfo:
    """Builds the :class:`SolveInfo`, replacing ``residual`` by the true one if asked to."""
    if check_residual:
        residual, _ = true_residual(matvec, x, b)
        products, residual_is_true = products + 1, True
    b_norm = tuple_norm(b).item()
    return SolveInfo(
        iterations=iterations,
        products=products,
        residual_norm=residual,
        rel_residual=residual / b_norm if b_norm > 0 else 0.0,
        residual_is_true=residual_is_true,
        negative_curvature=negative_curvature,
        truncated=truncated,
        converged=residual <= tol * b_norm,
    )


def krylov_cg(
    matvec: MatVec,
    b: TensorTuple,
    max_iter: int,
    tol: float,
    on_negative_curvature: str,
    check_residual: bool,
    solver: str,
    per_tensor: bool = False,
    eps: float = 0.0,
    preconditioner: Callable[[TensorTuple], TensorTuple] | None = None,
    x0: TensorTuple | None = None,
) -> tuple[TensorTuple, SolveInfo]:
    """The one CG loop (plain, per-tensor, preconditioned) behind every CG-type solver.

    Args:
        matvec, b, max_iter, tol, on_negative_curvature, check_residual: As in
            :func:`~bissl_det.bilevel.solvers.conjugate_gradient`.
        solver: Name used in error messages.
        per_tensor: One step size per tensor (layer-wise CG) instead of one for all.
        eps: Added to the per-tensor denominators.
        preconditioner: ``r -> M^-1 r`` (symmetric); None for ``M = I``.
        x0: Initial iterate (costs one product for ``r0 = b - A x0``); None for 0. A first
            direction of negative curvature returns ``x0``, or ``M^-1 b`` when ``x0`` is None.

    Returns:
        ``x`` and its :class:`SolveInfo`.
    """
    check_mode(on_negative_curvature, solver)
    b = prepare_rhs(b, max_iter, tol, solver)
    precond = preconditioner or (lambda r: r)
    products = 0
    with torch.no_grad():
        b_norm = math.sqrt(finite_or_raise(tuple_dot(b, b).item(), "||b||^2", solver, 0))
        if x0 is None:
            x, r = [torch.zeros_like(t) for t in b], [t.clone() for t in b]
        else:
            x = [t.detach().clone() for t in x0]
            r = torch._foreach_sub(list(b), apply_matvec(matvec, tuple(x), b, solver))
            products += 1
        p = [t.clone() for t in precond(tuple(r))]
        rz = _dots(tuple(r), tuple(p))
        scratch = [torch.empty_like(t) for t in b] if per_tensor else []
        residual = math.sqrt(
            finite_or_raise(_total(_dots(tuple(r), tuple(r))).item(), "||r0||^2", solver, 0)
        )
    threshold = tol * b_norm
    iterations = negative = 0
    truncated = False
    is_true = not per_tensor  # CG's recurrence residual is b - A x in exact arithmetic

    def ratio(num: torch.Tensor, den: torch.Tensor) -> list[float]:
        # Layer-wise: a zero denominator gives that tensor a zero step, as in the reference.
        den = den + eps
        return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0).tolist()

    while iterations < max_iter and residual > threshold:
        ap = apply_matvec(matvec, tuple(p), b, solver)
        products += 1
        iterations += 1
        with torch.no_grad():
            pap = _dots(tuple(p), tuple(ap))
            dens = pap.tolist() if per_tensor else [_total(pap).item()]
            for d in dens:
                finite_or_raise(d, "p^T A p", solver, iterations)
            # Per tensor, a zero direction p_i (a block already solved) has no curvature to test.
            sizes = _dots(tuple(p), tuple(p)).tolist() if per_tensor else [1.0]
            met = sum(d <= 0 and s > 0 for d, s in zip(dens, sizes, strict=True))
            negative += met
            if met and on_negative_curvature == "raise":
                raise indefinite_error(
                    solver, f"p^T A p = {min(dens):.4g} at iteration {iterations}"
                )
            if met and on_negative_curvature == "truncate":
                truncated = True
                if iterations == 1 and x0 is None:  # nothing before: the first-order M^-1 b
                    x, r = p, torch._foreach_sub(list(b), ap)
                    residual, is_true = tuple_norm(tuple(r)).item(), True
                break
            if per_tensor:
                alphas = ratio(rz, pap)
                for a in alphas:
                    finite_or_raise(a, "step size alpha", solver, iterations)
                torch._foreach_copy_(scratch, p)
                torch._foreach_mul_(scratch, alphas)
                torch._foreach_add_(x, scratch)
                torch._foreach_copy_(scratch, ap)
                torch._foreach_mul_(scratch, alphas)
                torch._foreach_sub_(r, scratch)
            else:
                # p^T A p == 0 exactly (possible with "continue") is a breakdown: alpha = inf.
                alpha = _total(rz).item() / dens[0] if dens[0] != 0 else math.inf
                finite_or_raise(alpha, "step size alpha", solver, iterations)
                torch._foreach_add_(x, p, alpha=alpha)
                torch._foreach_add_(r, ap, alpha=-alpha)
            rr = _total(_dots(tuple(r), tuple(r))).item()
            residual = math.sqrt(finite_or_raise(rr, "residual ||r||^2", solver, iterations))
            if residual <= threshold or iterations == max_iter:
                break
            z = precond(tuple(r))
            rz_new = _dots(tuple(r), z)
            if per_tensor:
                torch._foreach_mul_(p, ratio(rz_new, rz))
            else:
                beta = finite_or_raise(
                    _total(rz_new).item() / _total(rz).item(), "beta", solver, iterations
                )
                torch._foreach_mul_(p, beta)
            torch._foreach_add_(p, list(z))
            rz = rz_new
    return tuple(x), finish_info(
        matvec,
        tuple(x),
        b,
        residual,
        tol,
        check_residual,
        iterations=iterations,
        products=products,
        residual_is_true=is_true,
        negative_curvature=negative,
        truncated=truncated,
    )
