"""Lanczos on tuples of tensors: extreme-eigenvalue estimates and a stage-level solver.

Within one BiSSL stage the damped operator ``A`` is fixed while several upper steps solve
``A x = b`` for nearly orthogonal right-hand sides. :class:`LanczosBasis` spends its products once
(``size`` of them) and then answers every right-hand side from the stored Ritz pairs without any
product, optionally polishing with a few preconditioned CG iterations. :func:`lanczos_extremes`
is the cheap three-term version that only estimates the spectrum's ends (is ``A`` definite?).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .flat import flat_problem, is_flat
from .krylov import (
    MatVec,
    SolveInfo,
    TensorTuple,
    accumulation_dtype,
    apply_matvec,
    check_mode,
    check_pair,
    finish_info,
    finite_or_raise,
    indefinite_error,
    krylov_cg,
    prepare_rhs,
    tuple_dot,
    tuple_norm,
)

__all__ = ["LanczosBasis", "RitzInfo", "lanczos_extremes", "lanczos_solve"]


@dataclass
class RitzInfo:
    """What an extreme-eigenvalue estimate did.

    Attributes:
        steps: Lanczos steps run (fewer than asked if the Krylov space became invariant).
        products: Matrix-vector products used (= ``steps``).
        ritz_values: All Ritz values, ascending; they lie inside ``[lambda_min, lambda_max]``.
        residual_min: ``||A u - theta u||`` of the smallest Ritz pair: ``A`` has an eigenvalue
            within this distance of ``lam_min``.
        residual_max: The same for the largest Ritz pair.
        invariant: Whether the Krylov space of ``v0`` became invariant (Ritz values exact).
    """

    steps: int
    products: int
    ritz_values: tuple[float, ...]
    residual_min: float
    residual_max: float
    invariant: bool


class _Basis:
    """Orthonormal Lanczos vectors: the rows of one ``(capacity, n)`` matrix for flat vectors
    (projections are two matrix products), else a list of tuples (a dot and an axpy per tensor
    and vector: the per-tensor path)."""

    def __init__(self, like: TensorTuple, capacity: int) -> None:
        self.flat = is_flat(like)
        self.rows = like[0].new_empty(capacity, like[0].numel()) if self.flat else None
        self.vectors: list[TensorTuple] = []

    def __len__(self) -> int:
        return len(self.vectors)

    def append(self, q: TensorTuple) -> TensorTuple:
        """Store ``q``; returns the stored vector (for flat vectors a row of the matrix)."""
        if self.rows is not None:
            row = self.rows[len(self.vectors)]
            row.copy_(q[0])
            q = (row,)
        self.vectors.append(tuple(q))
        return self.vectors[-1]

    def coefficients(self, r: TensorTuple) -> torch.Tensor:
        """``V^T r`` (1-D, accumulation dtype, on the vectors' device)."""
        if self.rows is None:
            return torch.stack([tuple_dot(v, r) for v in self.vectors])
        acc = accumulation_dtype(r[0])
        return self.rows[: len(self)].to(acc) @ r[0].to(acc)

    def add_(self, out: list[torch.Tensor], c: torch.Tensor) -> None:
        """``out += V c`` in place."""
        if self.rows is None:
            for v, ci in zip(self.vectors, c.tolist(), strict=True):
                torch._foreach_add_(out, list(v), alpha=ci)
            return
        rows = self.rows[: len(self)]
        acc = accumulation_dtype(rows)
        if acc == rows.dtype:  # in place, one pass over the basis (no n-vector temporary)
            out[0].addmv_(rows.T, c.to(rows.device, acc))
        else:
            out[0].add_((c.to(rows.device, acc) @ rows.to(acc)).to(rows.dtype))


def _lanczos(
    matvec: MatVec,
    v0: TensorTuple,
    steps: int,
    basis: _Basis | None,
    name: str,
    stop: Callable[[list[float], list[float]], bool] | None = None,
) -> tuple[list[float], list[float], bool]:
    """Up to ``steps`` Lanczos steps from ``v0`` (fewer once ``stop(alphas, betas)`` is true).

    Returns the diagonal ``alphas`` and the couplings ``betas`` of the tridiagonal ``T`` (the last
    beta couples to the next, unstored vector) and whether the Krylov space became invariant. With
    a ``basis``, each orthonormal vector is appended to it and every new vector is
    re-orthogonalised against all of them (classical Gram-Schmidt twice, which is enough); without
    one only three vectors are alive (plain recurrence: the extreme Ritz values still converge).
    """
    if steps < 1:
        raise ValueError(f"{name}: the number of Lanczos steps must be >= 1, got {steps}")
    if len(v0) == 0:
        raise ValueError(f"{name}: v0 is an empty tuple")
    v0 = tuple(t.detach() for t in v0)
    alphas: list[float] = []
    betas: list[float] = []
    with torch.no_grad():
        norm = finite_or_raise(tuple_norm(v0).item(), "||v0||", name, 0)
        if norm == 0:
            raise ValueError(f"{name}: the start vector v0 is zero")
        q, q_prev = torch._foreach_div(list(v0), norm), None
        # A beta this small relative to ||T|| means the Krylov space is invariant (rounding only).
        tiny = 100 * torch.finfo(accumulation_dtype(v0[0])).eps
        scale = 0.0
        for step in range(1, steps + 1):
            if basis is not None:  # q lives on as the basis' copy: one vector, not two
                q = list(basis.append(tuple(q)))
            aq = apply_matvec(matvec, tuple(q), v0, name)
            alpha = finite_or_raise(tuple_dot(tuple(q), tuple(aq)).item(), "alpha", name, step)
            w = torch._foreach_add(aq, q, alpha=-alpha)
            if q_prev is not None:
                torch._foreach_add_(w, q_prev, alpha=-betas[-1])
            for _ in range(2 if basis is not None else 0):
                basis.add_(w, -basis.coefficients(tuple(w)))
            beta = finite_or_raise(tuple_norm(tuple(w)).item(), "beta", name, step)
            scale = max(scale, abs(alpha) + beta + (betas[-1] if betas else 0.0))
            alphas.append(alpha)
            betas.append(beta)
            if beta <= tiny * scale:
                return alphas, betas, True
            if stop is not None and stop(alphas, betas):
                return alphas, betas, False
            if step < steps:
                q_prev, q = q, torch._foreach_div(w, beta)
    return alphas, betas, False


def start_vector_residual(alphas: list[float], betas: list[float]) -> float:
    """Relative residual of the basis solution of ``A x = v0``: ``beta_m |e_m^T T^-1 e_1|``.

    For ``b = v0`` the basis answer is the CG (Galerkin) iterate ``x = ||v0|| V T^-1 e_1``, and
    the Lanczos relation gives its residual ``||v0|| beta_m |(T^-1 e_1)_m|`` without a product.
    A singular ``T`` (an indefinite ``A``) gives inf.
    """
    t, _, _ = _ritz(alphas, betas)
    e1 = torch.zeros(len(alphas), dtype=torch.float64)
    e1[0] = 1.0
    try:
        y = torch.linalg.solve(t, e1)
    except RuntimeError:  # singular T
        return math.inf
    return abs(betas[-1] * y[-1].item())


def _ritz(
    alphas: list[float], betas: list[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``T`` (float64, CPU), its eigenvalues (ascending) and eigenvectors."""
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    off = torch.tensor(betas[:-1], dtype=torch.float64)
    t += torch.diag(off, 1) + torch.diag(off, -1)
    theta, s = torch.linalg.eigh(t)
    return t, theta, s


def lanczos_extremes(
    matvec: MatVec, v0: TensorTuple, steps: int = 10
) -> tuple[float, float, RitzInfo]:
    """Estimate the smallest and largest eigenvalue of symmetric ``A`` from ``steps`` products.

    In exact arithmetic the Ritz values of the Krylov space of ``v0`` lie inside the spectrum and
    its ends converge first, so ``lam_min <= 0`` proves that ``A`` is not positive definite. In
    floating point the plain recurrence loses orthogonality and a product carries rounding: Ritz
    values can leave the spectrum by about ``sqrt(eps) * lam_max`` (float32, a damped low-rank
    Fisher: below 0). Memory: three tuples shaped like ``v0`` besides ``matvec``'s output.

    Args:
        matvec: ``v -> A v`` on tuples shaped like ``v0``.
        v0: Start vector (nonzero), e.g. the right-hand side of the system to solve.
        steps: Lanczos steps (= products).

    Returns:
        ``(lam_min, lam_max, info)``.

    Raises:
        ValueError: For ``steps < 1`` or a zero ``v0``.
        NonFiniteError: If a product or coefficient is NaN/inf.
    """
    matvec, v0, _ = flat_problem(matvec, tuple(t.detach() for t in v0), "lanczos_extremes")
    alphas, betas, invariant = _lanczos(matvec, v0, steps, None, "lanczos_extremes")
    _, theta, s = _ritz(alphas, betas)
    bounds = (betas[-1] * s[-1].abs()).tolist()  # ||A u_i - theta_i u_i|| = beta_m |s_{m,i}|
    info = RitzInfo(
        len(alphas), len(alphas), tuple(theta.tolist()), bounds[0], bounds[-1], invariant
    )
    return theta[0].item(), theta[-1].item(), info


class LanczosBasis:
    """An orthonormal Krylov basis of a fixed operator, built once and reused for many solves.

    ``build`` runs ``size`` Lanczos steps with full re-orthogonalisation and keeps the basis ``V``
    and the tridiagonal ``T = V^T A V`` with its Ritz pairs ``(theta_i, s_i)``; the Ritz vectors of
    ``A`` are ``U = V S``. ``V`` is one ``(size, n)`` matrix (:mod:`.flat`), so projecting onto the
    basis is a matrix product. Memory: ``size`` copies of the parameter vector, allocated at once
    (an adaptive build that stops early keeps the whole allocation), plus two work vectors while
    building, held until :meth:`release`.

    Attributes:
        products: Matrix-vector products the build used.
    """

    def __init__(
        self,
        matvec: MatVec,
        basis: _Basis,
        alphas: list[float],
        betas: list[float],
        v0: TensorTuple,
        flat: bool,
    ) -> None:
        self._matvec: MatVec | None = matvec  # on the caller's tuples
        self._basis: _Basis | None = basis
        self._like = tuple(torch.empty(t.shape, device="meta") for t in v0)  # shapes only
        self._flat = flat
        self._t, self._theta, self._s = _ritz(alphas, betas)
        self._beta_next = betas[-1]  # A V = V T + beta_next q_next e_m^T
        self.products = len(alphas)

    @classmethod
    def build(
        cls, matvec: MatVec, v0: TensorTuple, size: int, tol: float = 0.0, flat: bool = True
    ) -> LanczosBasis:
        """Run ``size`` Lanczos steps from ``v0`` (fewer if its Krylov space is invariant sooner).

        Args:
            matvec: ``v -> A v`` (``A`` symmetric), kept for the solves' CG corrections.
            v0: Nonzero start vector, e.g. the stage's first right-hand side.
            size: Basis size (= products); 5..20 is typical. With ``tol`` the cap.
            tol: > 0: grow the basis only until the free residual estimate of ``A x = v0``
                (:func:`start_vector_residual`) is ``<= tol``, at most ``size`` vectors.
            flat: Keep the basis as one matrix (:mod:`.flat`); False: a list of tuples (the
                per-tensor path, same results up to rounding).
        """
        name = "LanczosBasis.build"
        if tol < 0:
            raise ValueError(f"{name}: tol must be >= 0, got {tol}")
        if size < 1:
            raise ValueError(f"{name}: the number of Lanczos steps must be >= 1, got {size}")
        v0 = tuple(t.detach() for t in v0)
        if len(v0) == 0:
            raise ValueError(f"{name}: v0 is an empty tuple")
        stop = (lambda a, b: start_vector_residual(a, b) <= tol) if tol > 0 else None
        flat_matvec, flat_v0, unpack = flat_problem(matvec, v0, name, flat)
        basis = _Basis(flat_v0, size)
        alphas, betas, _ = _lanczos(flat_matvec, flat_v0, size, basis, name, stop)
        return cls(matvec, basis, alphas, betas, v0, flat)

    @property
    def size(self) -> int:
        """Number of basis vectors."""
        return self._t.shape[0]

    @property
    def ritz_values(self) -> torch.Tensor:
        """Ritz values of ``A`` (float64, CPU, ascending); still available after release."""
        return self._theta.clone()

    def release(self) -> None:
        """Free the basis vectors and the operator (the end of a stage); solves then raise."""
        self._basis = None
        self._matvec = None

    def solve(
        self,
        b: TensorTuple,
        max_iter: int = 0,
        tol: float = 0.0,
        on_negative_curvature: str = "truncate",
        check_residual: bool = False,
    ) -> tuple[TensorTuple, SolveInfo]:
        """Solve ``A x = b`` with the low-rank inverse, then optionally ``max_iter`` PCG steps.

        ``x0 = P b`` with ``P = I + U diag(1/theta_i - 1) U^T``: ``A^-1`` on the Ritz space, the
        identity outside it. It is exact when ``b`` lies in an invariant ``span(V)``, and for ``b =
        v0`` it is the CG iterate after ``size`` steps. Ritz values ``<= 0`` are negative curvature
        (counted); ``"truncate"`` drops those directions (``P`` acts as the identity there),
        ``"continue"`` inverts them as they are, ``"raise"`` raises.

        ``max_iter > 0`` continues with CG preconditioned by ``M^-1 = P``, started at ``x0``
        (``1 + max_iter`` products). Chosen over deflated CG because deflation needs ``A V``
        exactly (the Lanczos relation gives it only up to the ``beta q_next`` term) while ``P``
        needs nothing beyond the stored basis and is SPD whenever the used ``theta_i > 0`` (its
        eigenvalues are ``1/theta_i`` and 1), so PCG keeps its monotone energy-norm decrease,
        and ``P A`` is ~ I on converged Ritz directions: those are effectively deflated.

        Args:
            b: Right-hand side, shaped like the basis vectors.
            max_iter: PCG correction iterations (0: the basis answer alone, no product).
            tol: Stop the corrections once the residual is ``<= tol * ||b||``.
            on_negative_curvature: ``"truncate"``, ``"continue"`` or ``"raise"``, for Ritz values
                and for the PCG directions alike.
            check_residual: Report the true ``||b - A x||`` (one more product).

        Returns:
            ``x`` and a :class:`SolveInfo` (``products`` of this solve only; the build's are in
            :attr:`products`). With ``max_iter = 0`` the residual is an estimate
            (``residual_is_true=False``): exact for the part of ``b`` in ``span(V)`` through the
            Lanczos relation, assuming ``A = I`` on the rest. With ``max_iter > 0`` it is PCG's
            recurrence started from the true ``b - A x0``.

        Raises:
            RuntimeError: After :meth:`release`.
            IndefiniteSystemError: With ``"raise"``, if a Ritz value or PCG direction is ``<= 0``.
            NonFiniteError: For NaN/inf (a zero Ritz value with ``"continue"``).
        """
        name = "LanczosBasis.solve"
        check_mode(on_negative_curvature, name)
        if self._matvec is None or self._basis is None:
            raise RuntimeError(f"{name}: the basis was released")
        b = prepare_rhs(b, max_iter, tol, name)
        try:
            check_pair(b, self._like)
        except ValueError as e:
            raise ValueError(f"{name}: b does not match the basis vectors: {e}") from None
        matvec, b, unpack = flat_problem(self._matvec, b, name, self._flat)
        basis = self._basis
        if basis.rows is not None and b[0].dtype != basis.rows.dtype:
            raise ValueError(f"{name}: b is {b[0].dtype}, the basis vectors are {basis.rows.dtype}")
        finite_or_raise(tuple_dot(b, b).item(), "||b||^2", name, 0)
        bent = self._theta <= 0
        negative = int(bent.sum())
        if negative and on_negative_curvature == "raise":
            raise indefinite_error(
                name, f"{negative} Ritz value(s) <= 0, smallest {self._theta[0]:.4g}"
            )
        with torch.no_grad():
            gains = 1.0 / self._theta - 1.0
            if on_negative_curvature == "truncate":
                gains = torch.where(bent, 0.0, gains)
            finite_or_raise(gains.abs().max().item(), "1/theta - 1 (a Ritz value is 0)", name, 0)
            g = self._s @ torch.diag(gains) @ self._s.T  # P = I + V g V^T

            def coefficients(r: TensorTuple) -> torch.Tensor:
                return basis.coefficients(r).to("cpu", torch.float64)

            def add_basis(r: TensorTuple, y: torch.Tensor) -> TensorTuple:
                out = [t.clone() for t in r]
                basis.add_(out, y)
                return tuple(out)

            def inverse(r: TensorTuple) -> TensorTuple:
                return add_basis(r, g @ coefficients(r))

            c = coefficients(b)
            x = add_basis(b, g @ c)
        truncated = negative > 0 and on_negative_curvature == "truncate"
        if max_iter > 0:
            x, info = krylov_cg(
                matvec,
                b,
                max_iter,
                tol,
                on_negative_curvature,
                check_residual,
                name,
                preconditioner=inverse,
                x0=x,
            )
            return unpack(x), dataclasses.replace(
                info,
                negative_curvature=info.negative_curvature + negative,
                truncated=info.truncated or truncated,
            )
        w = c + g @ c  # V^T x (x - V w is the part of b outside span(V))
        in_basis = c - self._t @ w
        estimate = math.hypot(in_basis.norm().item(), self._beta_next * w[-1].item())
        return unpack(x), finish_info(
            matvec,
            x,
            b,
            estimate,
            tol,
            check_residual,
            iterations=0,
            products=0,
            residual_is_true=False,
            negative_curvature=negative,
            truncated=truncated,
        )


def lanczos_solve(
    matvec: MatVec,
    b: TensorTuple,
    max_iter: int = 0,
    tol: float = 0.0,
    on_negative_curvature: str = "truncate",
    check_residual: bool = False,
    basis: LanczosBasis | None = None,
    basis_size: int = 20,
) -> tuple[TensorTuple, SolveInfo]:
    """Solve ``A x = b`` with a Lanczos basis: a stage's (``basis``) or one built from ``b`` now.

    The solver-table form of :meth:`LanczosBasis.solve`. A stage system builds the basis once
    from its first right-hand side and passes it to every solve; without one, ``basis_size``
    products build it here and are counted in the returned ``products``.

    Args:
        matvec: ``v -> A v`` (``A`` symmetric); only used when ``basis`` is None.
        b, max_iter, tol, on_negative_curvature, check_residual: As in :meth:`LanczosBasis.solve`.
        basis: A basis of this operator, or None.
        basis_size: Size of the basis built when ``basis`` is None.
    """
    if basis is not None:
        return basis.solve(b, max_iter, tol, on_negative_curvature, check_residual)
    basis = LanczosBasis.build(matvec, b, basis_size)
    try:
        x, info = basis.solve(b, max_iter, tol, on_negative_curvature, check_residual)
    finally:
        basis.release()
    return x, dataclasses.replace(info, products=info.products + basis.products)
