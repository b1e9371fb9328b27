"""Matrix-free linear solvers over tuples of tensors.

Every solver takes ``matvec`` (a linear operator ``A`` given as a function on tuples of tensors
shaped like ``b``) and returns an approximate solution of ``A x = b`` together with a
:class:`SolveInfo`. The tuples are never flattened into one vector: at ResNet-50 scale that would
copy every parameter on every iteration. Updates use in-place ``torch._foreach_*`` ops on buffers
allocated once per solve.

Inner products accumulate in at least float32 (float64 stays float64), so half-precision inputs do
not overflow or lose the residual in rounding. A non-finite quantity raises
:class:`NonFiniteError`; nothing is silently replaced by zeros.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

TensorTuple = tuple[torch.Tensor, ...]
MatVec = Callable[[TensorTuple], TensorTuple]

__all__ = [
    "SOLVERS",
    "MatVec",
    "NonFiniteError",
    "SolveInfo",
    "TensorTuple",
    "conjugate_gradient",
    "get_solver",
    "layerwise_conjugate_gradient",
    "neumann_series",
    "tuple_cosine",
    "tuple_dot",
    "tuple_norm",
]


class NonFiniteError(FloatingPointError):
    """A solver met a NaN or infinity (in ``b``, in ``A v`` or in a step size)."""


@dataclass
class SolveInfo:
    """What a solve did.

    Attributes:
        iterations: Iterations run (CG: matrix-vector products; Neumann: series terms added).
        residual_norm: ``||b - A x||`` of the returned ``x`` (CG: from the recurrence, no extra
            product; layer-wise CG: see its docstring).
        converged: Whether ``residual_norm <= tol * ||b||``.
    """

    iterations: int
    residual_norm: float
    converged: bool


def _accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    # float16/bfloat16 sums overflow or round away small residuals; float64 must not be demoted.
    return torch.promote_types(t.dtype, torch.float32)


def _check_pair(a: TensorTuple, b: TensorTuple) -> None:
    if len(a) != len(b):
        raise ValueError(f"tuple lengths differ: {len(a)} vs {len(b)}")
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.shape != y.shape:
            raise ValueError(f"shape mismatch at index {i}: {tuple(x.shape)} vs {tuple(y.shape)}")


def _dots(a: TensorTuple, b: TensorTuple) -> torch.Tensor:
    """Per-tensor inner products ``<a_i, b_i>`` as one 1-D tensor (accumulation dtype)."""
    if not a:
        return torch.zeros(0)
    acc = _accumulation_dtype(a[0])
    return torch.stack(
        [torch.dot(x.reshape(-1).to(acc), y.reshape(-1).to(acc)) for x, y in zip(a, b, strict=True)]
    )


def tuple_dot(a: TensorTuple, b: TensorTuple) -> torch.Tensor:
    """Inner product of two tuples of tensors, summed over all tensors.

    Args:
        a: Tensors.
        b: Tensors with the same shapes as ``a``.

    Returns:
        A 0-d tensor in float32 (float64 if the inputs are float64) on the inputs' device.
    """
    _check_pair(a, b)
    return _dots(a, b).sum()


def tuple_norm(ts: TensorTuple) -> torch.Tensor:
    """Euclidean norm of a tuple of tensors seen as one vector (0-d, float32 or float64)."""
    return tuple_dot(ts, ts).sqrt()


def tuple_cosine(a: TensorTuple, b: TensorTuple, eps: float = 1e-30) -> torch.Tensor:
    """Cosine similarity of two tuples of tensors seen as vectors (0 if either is zero)."""
    return tuple_dot(a, b) / (tuple_norm(a) * tuple_norm(b)).clamp_min(eps)


def _finite_or_raise(value: float, what: str, solver: str, iteration: int) -> float:
    if not math.isfinite(value):
        raise NonFiniteError(f"{solver}: {what} is {value} at iteration {iteration}")
    return value


def _prepare(b: TensorTuple, max_iter: int, tol: float, solver: str) -> TensorTuple:
    if max_iter < 0:
        raise ValueError(f"{solver}: max_iter must be >= 0, got {max_iter}")
    if tol < 0:
        raise ValueError(f"{solver}: tol must be >= 0, got {tol}")
    if len(b) == 0:
        raise ValueError(f"{solver}: b is an empty tuple")
    return tuple(t.detach() for t in b)


def _matvec(matvec: MatVec, v: TensorTuple, b: TensorTuple, solver: str) -> list[torch.Tensor]:
    out = list(matvec(v))
    try:
        _check_pair(tuple(out), b)
    except ValueError as e:
        raise ValueError(f"{solver}: matvec output does not match b: {e}") from None
    return [t.detach() for t in out]


def conjugate_gradient(
    matvec: MatVec, b: TensorTuple, max_iter: int = 5, tol: float = 0.0
) -> tuple[TensorTuple, SolveInfo]:
    """Conjugate gradient on the coupled system ``A x = b`` (``A`` symmetric positive definite).

    Starts from ``x0 = 0``. One step size and one conjugation coefficient are shared by all tensors,
    so this is exact CG: for an ``n x n`` SPD operator it solves the system in at most ``n`` steps
    (in exact arithmetic).

    Args:
        matvec: ``v -> A v`` on tuples shaped like ``b``.
        b: Right-hand side.
        max_iter: Maximum number of iterations (= matrix-vector products).
        tol: Stop once ``||b - A x|| <= tol * ||b||``; 0 runs all ``max_iter`` iterations.

    Returns:
        The solution tuple (same shapes and dtypes as ``b``) and a :class:`SolveInfo`.

    Raises:
        NonFiniteError: If ``b``, the residual or a step size becomes NaN/inf.
    """
    name = "conjugate_gradient"
    b = _prepare(b, max_iter, tol, name)
    with torch.no_grad():
        x = [torch.zeros_like(t) for t in b]
        r = [t.clone() for t in b]
        p = [t.clone() for t in b]
        rr = _finite_or_raise(tuple_dot(b, b).item(), "||b||^2", name, 0)
    b_norm = math.sqrt(rr)
    threshold = tol * b_norm
    residual = b_norm
    iterations = 0
    while iterations < max_iter and residual > threshold:
        ap = _matvec(matvec, tuple(p), b, name)
        iterations += 1
        with torch.no_grad():
            p_ap = tuple_dot(tuple(p), tuple(ap)).item()
            # p^T A p == 0 with r != 0 means A is not positive definite on p: a breakdown.
            alpha = _finite_or_raise(
                rr / p_ap if p_ap != 0.0 else math.inf, "step size alpha", name, iterations
            )
            torch._foreach_add_(x, p, alpha=alpha)
            torch._foreach_add_(r, ap, alpha=-alpha)
            rr_new = _finite_or_raise(
                tuple_dot(tuple(r), tuple(r)).item(), "residual ||r||^2", name, iterations
            )
            residual = math.sqrt(rr_new)
            if residual <= threshold:
                break
            torch._foreach_mul_(p, rr_new / rr)
            torch._foreach_add_(p, r)
            rr = rr_new
    return tuple(x), SolveInfo(iterations, residual, residual <= threshold)


def layerwise_conjugate_gradient(
    matvec: MatVec, b: TensorTuple, max_iter: int = 5, tol: float = 0.0, eps: float = 0.0
) -> tuple[TensorTuple, SolveInfo]:
    """The BiSSL reference code's CG variant: a separate step size per tensor.

    Each tensor ``i`` gets ``alpha_i = <r_i, r_i> / <p_i, (A p)_i>`` and
    ``beta_i = <r_i', r_i'> / <r_i, r_i>``. This is exact CG per block when ``A`` is block diagonal
    with one block per tensor, but NOT exact CG on a coupled system (residuals lose orthogonality).
    Kept for parity with the reference; prefer :func:`conjugate_gradient`.

    Args:
        matvec: ``v -> A v`` on tuples shaped like ``b``.
        b: Right-hand side.
        max_iter: Maximum number of iterations (= matrix-vector products).
        tol: Stop once the global ``||b - A x|| <= tol * ||b||``.
        eps: Added to both denominators, as the reference does with 1e-12 (0 here: exact; a zero
            denominator makes that tensor's step 0 instead).

    Returns:
        The solution tuple and a :class:`SolveInfo`. Its ``residual_norm`` is the norm of the
        recurrence residual (no extra product); it equals ``||b - A x||`` only when ``A`` is block
        diagonal, because per-tensor step sizes do not commute with a coupled ``A``.

    Raises:
        NonFiniteError: If ``b``, a residual or a step size becomes NaN/inf.
    """
    name = "layerwise_conjugate_gradient"
    b = _prepare(b, max_iter, tol, name)
    with torch.no_grad():
        x = [torch.zeros_like(t) for t in b]
        r = [t.clone() for t in b]
        p = [t.clone() for t in b]
        scratch = [torch.empty_like(t) for t in b]
        rr = _dots(b, b)
        b_norm = math.sqrt(_finite_or_raise(rr.sum().item(), "||b||^2", name, 0))
    threshold = tol * b_norm
    residual = b_norm
    iterations = 0

    def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        den = den + eps
        return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)

    while iterations < max_iter and residual > threshold:
        ap = _matvec(matvec, tuple(p), b, name)
        iterations += 1
        with torch.no_grad():
            alphas = ratio(rr, _dots(tuple(p), tuple(ap))).tolist()  # one host sync
            for a in alphas:
                _finite_or_raise(a, "step size alpha", name, iterations)
            torch._foreach_copy_(scratch, p)
            torch._foreach_mul_(scratch, alphas)
            torch._foreach_add_(x, scratch)
            torch._foreach_copy_(scratch, ap)
            torch._foreach_mul_(scratch, alphas)
            torch._foreach_sub_(r, scratch)
            rr_new = _dots(tuple(r), tuple(r))
            residual = math.sqrt(
                _finite_or_raise(rr_new.sum().item(), "residual ||r||^2", name, iterations)
            )
            if residual <= threshold:
                break
            torch._foreach_mul_(p, ratio(rr_new, rr).tolist())
            torch._foreach_add_(p, r)
            rr = rr_new
    return tuple(x), SolveInfo(iterations, residual, residual <= threshold)


def neumann_series(
    matvec: MatVec, b: TensorTuple, max_iter: int = 5, tol: float = 0.0, alpha: float = 1.0
) -> tuple[TensorTuple, SolveInfo]:
    """Truncated Neumann series ``x = alpha * sum_{k=0..max_iter} (I - alpha A)^k b``.

    Converges to ``A^-1 b`` when the spectral radius of ``I - alpha A`` is below 1 (for SPD ``A``:
    ``0 < alpha < 2 / lambda_max``). The residual of the partial sum through term ``k`` is
    ``(I - alpha A)^(k+1) b``, so reporting the exact residual of the returned ``x`` costs one
    matrix-vector product more than the series itself: ``max_iter + 1`` products in all.

    Args:
        matvec: ``v -> A v`` on tuples shaped like ``b``.
        b: Right-hand side.
        max_iter: Index of the last series term (``max_iter + 1`` terms).
        tol: Stop adding terms once ``||b - A x|| <= tol * ||b||``.
        alpha: Step size (scales ``A``).

    Returns:
        The solution tuple and a :class:`SolveInfo` (``iterations`` = terms after the first).

    Raises:
        NonFiniteError: If ``b`` or a series term becomes NaN/inf.
    """
    name = "neumann_series"
    b = _prepare(b, max_iter, tol, name)
    if not alpha > 0:
        raise ValueError(f"{name}: alpha must be > 0, got {alpha}")
    with torch.no_grad():
        term = [t.clone() for t in b]  # (I - alpha A)^k b, also the residual of the sum up to k-1
        total = [t.clone() for t in b]
        b_norm = math.sqrt(_finite_or_raise(tuple_dot(b, b).item(), "||b||^2", name, 0))
    threshold = tol * b_norm
    iterations = 0
    while True:
        a_term = _matvec(matvec, tuple(term), b, name)
        with torch.no_grad():
            torch._foreach_add_(term, a_term, alpha=-alpha)
            residual = math.sqrt(
                _finite_or_raise(
                    tuple_dot(tuple(term), tuple(term)).item(), "residual", name, iterations + 1
                )
            )
            if iterations == max_iter or residual <= threshold:
                break
            torch._foreach_add_(total, term)
        iterations += 1
    with torch.no_grad():
        torch._foreach_mul_(total, alpha)
    return tuple(total), SolveInfo(iterations, residual, residual <= threshold)


SOLVERS: dict[str, Callable[..., tuple[TensorTuple, SolveInfo]]] = {
    "cg": conjugate_gradient,
    "layerwise_cg": layerwise_conjugate_gradient,
    "neumann": neumann_series,
}


def get_solver(name: str) -> Callable[..., tuple[TensorTuple, SolveInfo]]:
    """Look up a solver by name (``"cg"``, ``"layerwise_cg"`` or ``"neumann"``).

    Raises:
        ValueError: For an unknown name; the message lists the valid ones.
    """
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(
            f"unknown implicit-gradient solver {name!r}; valid names: {sorted(SOLVERS)}"
        ) from None
