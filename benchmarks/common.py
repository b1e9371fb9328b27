"""Helpers of the benchmarks that are not the project's API: a reference solver.

The converged solution of the Hessian's implicit-gradient system needs a solver that is correct
for symmetric INDEFINITE operators (a trained network's pretext Hessian is indefinite, and so is
``I + H / (lambda + delta)``). CG has no guarantee there; MINRES (Paige and Saunders, 1975)
minimises the residual over the same Krylov space, so its residual never grows, and it keeps only
a handful of vectors (a ResNet-50 parameter tuple each).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from bissl_det.bilevel import tuple_dot, tuple_norm

import torch

TensorTuple = tuple[torch.Tensor, ...]


def minres(
    matvec: Callable[[TensorTuple], TensorTuple], b: TensorTuple, max_iter: int, tol: float
) -> tuple[TensorTuple, int, float]:
    """Solve symmetric ``A x = b`` by MINRES from ``x0 = 0``.

    Args:
        matvec: ``v -> A v`` (``A`` symmetric, possibly indefinite).
        b: Right-hand side.
        max_iter: Maximum number of iterations (= products).
        tol: Stop once the (recurrence) residual is ``<= tol * ||b||``.

    Returns:
        ``x``, the iterations run and the recurrence estimate of ``||b - A x|| / ||b||`` (check
        the true residual with one more product).
    """
    with torch.no_grad():
        b = [t.detach() for t in b]
        beta1 = tuple_norm(tuple(b)).item()
        if not math.isfinite(beta1) or beta1 == 0:
            raise ValueError(f"minres: ||b|| = {beta1}")
        x = [torch.zeros_like(t) for t in b]
        w, w2 = [torch.zeros_like(t) for t in b], [torch.zeros_like(t) for t in b]
        r1, r2, y = [t.clone() for t in b], [t.clone() for t in b], [t.clone() for t in b]
        old_beta, beta, dbar, epsilon, phibar, cs, sn = 0.0, beta1, 0.0, 0.0, beta1, -1.0, 0.0
        iterations = 0
        for iterations in range(1, max_iter + 1):
            v = torch._foreach_div(y, beta)
            y = [t.detach() for t in matvec(tuple(v))]
            if iterations >= 2:
                torch._foreach_add_(y, r1, alpha=-beta / old_beta)
            alpha = tuple_dot(tuple(v), tuple(y)).item()
            torch._foreach_add_(y, r2, alpha=-alpha / beta)
            r1, r2 = r2, y
            y = [t.clone() for t in r2]
            old_beta, beta = beta, tuple_norm(tuple(r2)).item()
            old_epsilon = epsilon
            delta = cs * dbar + sn * alpha  # the QR step on the tridiagonal's new column
            gbar = sn * dbar - cs * alpha
            epsilon, dbar = sn * beta, -cs * beta
            gamma = max(math.hypot(gbar, beta), 1e-300)
            cs, sn = gbar / gamma, beta / gamma
            phi, phibar = cs * phibar, sn * phibar
            w1, w2 = w2, w
            w = torch._foreach_sub(v, torch._foreach_mul(w1, old_epsilon))
            torch._foreach_sub_(w, torch._foreach_mul(w2, delta))
            torch._foreach_div_(w, gamma)
            torch._foreach_add_(x, w, alpha=phi)
            if not math.isfinite(phibar):
                raise FloatingPointError(f"minres: residual is {phibar} at iteration {iterations}")
            if phibar <= tol * beta1 or beta == 0:
                break
    return tuple(x), iterations, phibar / beta1
