"""Hessian-vector products on tuples of tensors: by double backward on a graph built once, by
recomputing the loss for every product (the BiSSL reference code's way), and by torch.func.

Nothing here knows about solvers or stages; :mod:`.curvature` wraps these products as matrices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .krylov import TensorTuple

__all__ = [
    "HessianVectorProduct",
    "RecomputingHessianVectorProduct",
    "check_vector",
    "functional_hvp",
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
