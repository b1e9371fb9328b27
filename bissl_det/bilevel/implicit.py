"""Implicit gradient of the BiSSL upper objective through the regularised lower level.

Lower level: ``theta*(phi) = argmin_theta L_P(theta) + lam/2 ||theta - phi||^2``. Differentiating
its optimality condition ``grad L_P(theta*) + lam (theta* - phi) = 0`` gives
``d theta* / d phi = lam (H + lam I)^-1`` (symmetric), hence

    d/dphi L_D(theta*(phi)) = lam (H + lam I)^-1 g = (I + H / lam)^-1 g,

with ``H`` the Hessian of ``L_P`` at ``theta*`` and ``g = grad_theta L_D``. BiSSL solves the damped
system ``(I + H / (lam + delta)) x = g`` (``delta = 0`` is exact) with a few CG steps, using only
Hessian-vector products. Everything here works on tuples of tensors and knows nothing about models,
except :func:`functional_hvp`, which takes an ``nn.Module`` for the torch.func route.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .solvers import MatVec, TensorTuple, get_solver, tuple_cosine, tuple_norm

if TYPE_CHECKING:  # curvature.py imports this module
    from .curvature import Curvature

__all__ = [
    "HessianVectorProduct",
    "check_vector",
    "ImplicitGradInfo",
    "RecomputingHessianVectorProduct",
    "damped_matvec",
    "functional_hvp",
    "implicit_gradient",
    "implicit_gradient_from",
    "joint_damped_matvec",
]


def check_vector(v: TensorTuple, params: Sequence[torch.Tensor], who: str) -> None:
    """Raise ``ValueError`` naming ``who`` unless ``v`` matches ``params`` tensor by tensor."""
    if len(v) != len(params):
        raise ValueError(f"{who}: got {len(v)} tensors for {len(params)} parameters")
    for i, (t, p) in enumerate(zip(v, params, strict=True)):
        if t.shape != p.shape:
            raise ValueError(
                f"{who}: vector {i} has shape {tuple(t.shape)}, parameter {tuple(p.shape)}"
            )


def _first_order_graph(
    loss: torch.Tensor, params: Sequence[torch.Tensor], who: str
) -> tuple[list[int], list[torch.Tensor]]:
    """``grad loss`` with its graph; returns only the entries that still depend on ``params``."""
    if loss.dim() != 0:
        raise ValueError(f"{who}: loss must be a scalar, got shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise ValueError(f"{who}: loss does not require grad (built under no_grad?)")
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    # A parameter the loss ignores or uses only linearly has a constant gradient: zero rows of H.
    index = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    return index, [grads[i] for i in index]


def _grad_vector_product(
    index: list[int],
    grads: list[torch.Tensor],
    params: Sequence[torch.Tensor],
    v: TensorTuple,
    retain_graph: bool,
) -> TensorTuple:
    """``H v`` as the vector-Jacobian product of ``grad loss`` with ``v`` (H is symmetric)."""
    out: list[torch.Tensor | None] = [None] * len(params)
    if grads:
        hv = torch.autograd.grad(
            grads,
            params,
            grad_outputs=[v[i].to(grads[k].dtype) for k, i in enumerate(index)],
            retain_graph=retain_graph,
            allow_unused=True,
        )
        out = list(hv)
    return tuple(
        torch.zeros_like(p) if h is None else h.detach() for h, p in zip(out, params, strict=True)
    )


class HessianVectorProduct:
    """``v -> H v`` for the Hessian of a scalar loss w.r.t. ``params``, by double backward.

    The first-order graph (``autograd.grad(create_graph=True)``) is built once, in the constructor,
    and every product reuses it (``retain_graph=True``), so ``k`` products cost one forward, one
    backward and ``k`` double-backward passes. Call :meth:`release` to free the graph.
    """

    def __init__(self, loss: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
        """Build the first-order graph.

        Args:
            loss: Scalar loss whose graph reaches ``params``.
            params: Tensors to differentiate with respect to (order defines the tuple layout).
        """
        self.params = tuple(params)
        self._index, self._grads = _first_order_graph(loss, self.params, type(self).__name__)
        self._released = False

    def __call__(self, v: TensorTuple) -> TensorTuple:
        """Return ``H v`` (detached, same shapes as ``params``)."""
        if self._released:
            raise RuntimeError("HessianVectorProduct was released; build a new one")
        check_vector(v, self.params, type(self).__name__)
        return _grad_vector_product(self._index, self._grads, self.params, v, retain_graph=True)

    def release(self) -> None:
        """Drop the first-order graph (and the activations it holds)."""
        self._grads = []
        self._index = []
        self._released = True


class RecomputingHessianVectorProduct:
    """``v -> H v`` that recomputes the loss and its gradient graph for every product.

    This is how the BiSSL reference code does it (one forward + backward + double backward per
    product). Kept for parity tests and benchmarks against :class:`HessianVectorProduct`.
    """

    def __init__(self, closure: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]) -> None:
        """Store the closure.

        Args:
            closure: Returns the scalar loss, freshly computed, on each call.
            params: Tensors to differentiate with respect to.
        """
        self.closure = closure
        self.params = tuple(params)

    def __call__(self, v: TensorTuple) -> TensorTuple:
        """Return ``H v`` (detached, same shapes as ``params``)."""
        who = type(self).__name__
        check_vector(v, self.params, who)
        index, grads = _first_order_graph(self.closure(), self.params, who)
        return _grad_vector_product(index, grads, self.params, v, retain_graph=False)


def functional_hvp(
    module: nn.Module,
    loss_fn: Callable[[Any], torch.Tensor],
    params: Mapping[str, torch.Tensor],
    v: TensorTuple,
    args: tuple[Any, ...] = (),
    kwargs: Mapping[str, Any] | None = None,
) -> TensorTuple:
    """``H v`` by forward-over-reverse differentiation (``torch.func.jvp`` of ``torch.func.grad``).

    ``H`` is the Hessian of ``loss_fn(module(*args, **kwargs))`` w.r.t. the named parameters in
    ``params`` (other parameters and buffers keep the module's values). Recomputes the forward
    pass on every call. Modules that update buffers in place during the forward (BatchNorm in
    training mode with running statistics) are not supported by torch.func.

    Args:
        module: The model.
        loss_fn: Maps the module output to a scalar loss.
        params: ``name -> tensor`` (names as in ``module.named_parameters()``), the point of ``H``.
        v: Vector, one tensor per entry of ``params`` in its iteration order.
        args: Positional inputs of the module.
        kwargs: Keyword inputs of the module.

    Returns:
        ``H v`` as a tuple in the order of ``params``.
    """
    names = tuple(params)
    primals = tuple(params[n].detach() for n in names)
    check_vector(v, primals, "functional_hvp")
    kwargs = dict(kwargs or {})

    def loss_of(*theta: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(module, dict(zip(names, theta, strict=True)), args, kwargs)
        return loss_fn(out)

    grad_fn = torch.func.grad(loss_of, argnums=tuple(range(len(names))))
    _, hv = torch.func.jvp(grad_fn, primals, tuple(t.detach() for t in v))
    return tuple(hv)


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
    all_reduce: Callable[[TensorTuple], TensorTuple] | None = None,
) -> MatVec:
    """The operator ``v -> v + all_reduce(H v) / (lam + damping)`` of the implicit-gradient system.

    Args:
        hvp: ``v -> H v`` on this process's data.
        lam: Proximal weight of the lower level (> 0).
        damping: Extra damping ``delta`` (>= 0); 0 gives the exact system ``I + H / lam``.
        all_reduce: Averages a tuple over processes (so ``H`` is the Hessian of the global mean
            loss); None for a single process. Applied to ``H v`` only; ``v`` is already global.

    Returns:
        The matrix-vector product, for the solvers in :mod:`bissl_det.bilevel.solvers`.
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


@dataclass
class ImplicitGradInfo:
    """Diagnostics of one implicit-gradient solve.

    Attributes:
        iterations: Solver iterations (Hessian-vector products for CG).
        residual_norm: ``||g - A x||`` for the damped operator ``A``.
        converged: Whether the solver's tolerance was met.
        cosine: Cosine between ``x`` and ``g`` (1 when ``H`` has no effect).
        norm_ratio: ``||x|| / ||g||``.
        products: Curvature products used (:func:`implicit_gradient_from` only).
        solve_info: The solver's own diagnostics object, unchanged (None for ``"direct"``).
    """

    iterations: int
    residual_norm: float
    converged: bool
    cosine: float
    norm_ratio: float
    products: int = 0
    solve_info: Any = None


def implicit_gradient(
    hvp: Callable[[TensorTuple], TensorTuple],
    g: TensorTuple,
    lam: float = 1e-3,
    damping: float = 10.0,
    solver: str = "cg",
    max_iter: int = 5,
    tol: float = 0.0,
    all_reduce: Callable[[TensorTuple], TensorTuple] | None = None,
    **solver_kwargs: Any,
) -> tuple[TensorTuple, ImplicitGradInfo]:
    """Solve ``(I + H / (lam + damping)) x = g``: the (damped) implicit gradient w.r.t. ``phi``.

    With ``damping = 0`` and a converged solve, ``x = lam (H + lam I)^-1 g`` equals
    ``d/dphi L_D(theta*(phi))``.

    Args:
        hvp: ``v -> H v``, ``H`` the Hessian of the lower (pretext) loss at the lower parameters.
        g: Gradient of the upper loss w.r.t. the lower parameters (already averaged over
            processes when running distributed).
        lam: Proximal weight of the lower level.
        damping: Extra damping ``delta`` added to ``lam`` in the system.
        solver: ``"cg"``, ``"layerwise_cg"`` or ``"neumann"``.
        max_iter: Solver iterations.
        tol: Relative residual tolerance for early stopping (0: run ``max_iter`` iterations).
        all_reduce: Averages ``H v`` over processes; None for a single process.
        **solver_kwargs: Extra solver arguments (``alpha`` for Neumann, ``eps`` for layerwise CG).

    Returns:
        ``x`` (same shapes as ``g``) and an :class:`ImplicitGradInfo`.
    """
    solve = get_solver(solver)
    matvec = damped_matvec(hvp, lam, damping, all_reduce)
    x, info = solve(matvec, g, max_iter=max_iter, tol=tol, **solver_kwargs)
    return x, _diagnostics(x, g, info.iterations, info.residual_norm, info.converged, 0, info)


def _diagnostics(
    x: TensorTuple,
    g: TensorTuple,
    iterations: int,
    residual_norm: float,
    converged: bool,
    products: int,
    solve_info: Any,
) -> ImplicitGradInfo:
    g_norm = tuple_norm(g).item()
    return ImplicitGradInfo(
        iterations=iterations,
        residual_norm=residual_norm,
        converged=converged,
        cosine=tuple_cosine(x, g).item(),
        norm_ratio=tuple_norm(x).item() / g_norm if g_norm > 0 else 0.0,
        products=products,
        solve_info=solve_info,
    )


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


def implicit_gradient_from(
    curvature: Curvature,
    g: TensorTuple,
    lam: float = 1e-3,
    damping: float = 10.0,
    solver: str = "cg",
    head: Sequence[torch.Tensor] = (),
    **solver_kwargs: Any,
) -> tuple[TensorTuple, ImplicitGradInfo]:
    """Solve ``(I + C / (lam + damping)) x = g`` for a stage :class:`Curvature` ``C``.

    ``C`` replaces the Hessian of :func:`implicit_gradient` (its products are already averaged
    over processes). ``solver="direct"`` uses the curvature's exact ``solve_damped`` (the Fisher's
    Woodbury solve); any other name goes to :func:`~bissl_det.bilevel.solvers.get_solver` with
    ``solver_kwargs`` (``max_iter``, ``tol``, ...).

    With ``head`` (the pretext head's parameters, in the order ``C`` was built over
    ``(*backbone, *head)``) the joint system of :func:`joint_damped_matvec` is solved with
    right-hand side ``(g, 0)``, and the backbone part is returned.

    Args:
        curvature: The stage's matrix over the backbone (and ``head``) parameters.
        g: Gradient of the upper loss w.r.t. the lower backbone (averaged over processes).
        lam: Proximal weight of the lower level (> 0).
        damping: Extra damping ``delta`` (>= 0).
        solver: ``"direct"`` or a name known to ``get_solver``.
        head: Pretext-head tensors (templates for the zero right-hand side); empty: no head.
        **solver_kwargs: Passed to the iterative solver.

    Returns:
        ``x`` (shaped like ``g``) and an :class:`ImplicitGradInfo` whose ``residual_norm`` is
        the iterative solver's own (for ``"direct"``: ``||g - A x||``, one product more, and
        ``converged`` False if it exceeds ``1e-3 ||g||``, which only a wrong solve does).
    """
    scale = _damping_scale(lam, damping)
    g = tuple(t.detach() for t in g)
    start = curvature.products
    if head:
        rhs = (*g, *(torch.zeros_like(h, dtype=g[0].dtype) for h in head))
        matvec = joint_damped_matvec(curvature.matvec, len(g), scale)
    else:
        rhs, matvec = g, damped_matvec(curvature.matvec, lam, damping)
    if solver == "direct":
        if head:
            raise ValueError(
                "solver 'direct' cannot solve the joint (backbone, head) system: "
                "P + C/(lam+delta) is not of the form I + low rank; use an iterative solver"
            )
        if not curvature.has_exact_solve:
            raise ValueError(
                f"solver 'direct' needs a curvature with an exact damped solve; "
                f"{type(curvature).__name__} has none"
            )
        x = curvature.solve_damped(g, scale)
        with torch.no_grad():
            residual = tuple_norm(torch._foreach_sub(list(g), list(matvec(x)))).item()
        # Exact up to rounding: a larger residual means the solve is wrong, not unconverged.
        exact = residual <= 1e-3 * tuple_norm(g).item()
        return x, _diagnostics(x, g, 0, residual, exact, curvature.products - start, None)
    x, info = get_solver(solver)(matvec, rhs, **solver_kwargs)
    x, used = tuple(x[: len(g)]), curvature.products - start
    return x, _diagnostics(x, g, info.iterations, info.residual_norm, info.converged, used, info)
