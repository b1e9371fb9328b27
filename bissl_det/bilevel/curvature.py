"""What a stage's curvature matrix ``C`` is: the pretext Hessian, its Gauss-Newton part, or the
empirical Fisher of recent lower-step gradients.

The implicit-gradient system is ``(I + C / (lam + delta)) x = g`` with ``C`` standing in for the
pretext Hessian. The Hessian of a trained network is indefinite, so that system is too and CG has
no guarantee; the generalised Gauss-Newton matrix ``J^T H_out J`` (``H_out`` the Hessian of a loss
convex in the network outputs) and the empirical Fisher ``(1/m) sum g_i g_i^T`` are PSD, which
makes the damped operator SPD with eigenvalues >= 1.

Every implementation has the same small interface (:class:`Curvature`): ``matvec(v)`` returns
``C v`` already averaged over processes, ``products`` counts them, ``release()`` frees what the
stage held, and ``solve_damped(b, scale)`` solves ``(I + scale C) x = b`` exactly where that is
cheap (the Fisher). Hessian and Gauss-Newton products reuse one graph built per stage.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from ..utils.warnings import import_quietly
from .hvp import HessianVectorProduct, check_vector
from .krylov import TensorTuple

AllReduce = Callable[[TensorTuple], TensorTuple]

__all__ = [
    "GGN_JV_MODES",
    "AllReduce",
    "Curvature",
    "GaussNewtonCurvature",
    "HessianCurvature",
    "ProductCurvature",
    "batch_statistics_only",
    "gauss_newton_of_batch",
    "hessian_of_batch",
    "output_jvp",
    "scratch_buffers",
]

# How a Gauss-Newton product gets ``J v`` (BISSL.HYPERGRAD.GGN_JV): "double_backward" through a
# retained ``J^T u`` graph (works for any model), or "forward" (one forward-mode pass per product:
# no second-order graph to build or keep; every op of the pretext model needs a forward-mode
# derivative, which torch's built-in ops and this package's collectives have).
GGN_JV_MODES = ("double_backward", "forward")


class Curvature(ABC):
    """A symmetric matrix ``C`` over tuples of tensors, given by its products.

    Attributes:
        products: Number of ``matvec`` calls so far.
        loss: The (local) loss value the matrix was built from, detached; None if none.
    """

    def __init__(self, all_reduce: AllReduce | None = None) -> None:
        """Args: all_reduce: averages a tuple over processes; None for one process."""
        self.all_reduce = all_reduce
        self.products = 0
        self.loss: torch.Tensor | None = None

    @abstractmethod
    def _local_matvec(self, v: TensorTuple) -> TensorTuple:
        """``C v`` on this process's data (before the average over processes)."""

    def matvec(self, v: TensorTuple) -> TensorTuple:
        """Return ``C v`` (detached), averaged over processes when ``all_reduce`` is set."""
        out = self._local_matvec(tuple(v))
        self.products += 1
        if self.all_reduce is not None:
            out = self.all_reduce(out)
        return out

    @property
    def has_exact_solve(self) -> bool:
        """Whether :meth:`solve_damped` is available."""
        return False

    def solve_damped(self, b: TensorTuple, scale: float) -> TensorTuple:
        """Solve ``(I + scale C) x = b`` exactly; only where cheap (see ``has_exact_solve``)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no exact damped solve; use an iterative solver"
        )

    def release(self) -> None:  # noqa: B027  (optional: a history-backed matrix keeps it)
        """Free what the matrix holds (graphs, activations). Later products raise."""


class ProductCurvature(Curvature):
    """Any ``v -> C v`` callable as a stage curvature, counted and averaged like the others.

    For products that are not built from a stage batch: the reference code's recomputing
    Hessian (:class:`~bissl_det.bilevel.hvp.RecomputingHessianVectorProduct`) in parity tests
    and benchmarks, or a dense matrix in closed-form tests.
    """

    def __init__(self, product: Callable[[TensorTuple], TensorTuple], all_reduce=None) -> None:
        super().__init__(all_reduce)
        self._product = product

    def _local_matvec(self, v: TensorTuple) -> TensorTuple:
        return self._product(v)


class HessianCurvature(Curvature):
    """The Hessian of a scalar loss, by double backward on a first-order graph built once.

    Args:
        loss: Scalar loss whose graph reaches ``params`` (this process's local loss).
        params: Tensors to differentiate with respect to (order defines the tuple layout).
        all_reduce: Averages ``H v`` over processes; None for one process.
    """

    def __init__(
        self,
        loss: torch.Tensor,
        params: Sequence[torch.Tensor],
        all_reduce: AllReduce | None = None,
    ) -> None:
        super().__init__(all_reduce)
        self._hvp = HessianVectorProduct(loss, params)
        self.params = self._hvp.params
        self.loss = loss.detach()

    def _local_matvec(self, v: TensorTuple) -> TensorTuple:
        return self._hvp(v)

    def release(self) -> None:
        self._hvp.release()


class GaussNewtonCurvature(Curvature):
    """The generalised Gauss-Newton matrix ``G = J^T H_out J`` of ``loss = f(outputs(params))``.

    ``J`` is the Jacobian of ``outputs`` w.r.t. ``params`` and ``H_out`` the Hessian of
    ``output_loss_fn`` w.r.t. the outputs; with ``f`` convex, ``G`` is PSD. One product is
    ``J v`` (differentiating the retained ``J^T u`` graph w.r.t. a dummy cotangent ``u``: the
    double-vjp trick, no forward mode needed), ``H_out (J v)`` (a small Hessian product in output
    space) and ``J^T (...)`` (one vjp). The graphs are built once, in the constructor: the same
    memory and passes as :class:`HessianCurvature`.

    With ``jvp`` given (``v -> J v``, e.g. :func:`output_jvp`: one forward-mode pass), that
    replaces the double-vjp: no ``J^T u`` graph is built or kept, and a product costs one
    forward-mode pass and one vjp instead of two passes through a second-order graph.

    Distributed: ``outputs`` are this process's (they may depend on every process through a
    differentiable gather) and ``output_loss_fn`` its local mean; the collectives in the graph
    make the all-reduce mean of the local products the ``G`` of the mean loss, like gradients.

    Args:
        outputs: Network outputs with their graph to ``params``.
        output_loss_fn: Maps a tensor shaped like ``outputs`` to the scalar loss (convex in it).
        params: Tensors to differentiate with respect to.
        all_reduce: Averages ``G v`` over processes; None for one process.
        jvp: ``v -> J v`` (shaped like ``outputs``); None: the double-vjp trick.
    """

    def __init__(
        self,
        outputs: torch.Tensor,
        output_loss_fn: Callable[[torch.Tensor], torch.Tensor],
        params: Sequence[torch.Tensor],
        all_reduce: AllReduce | None = None,
        jvp: Callable[[TensorTuple], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(all_reduce)
        who = type(self).__name__
        if not outputs.requires_grad:
            raise ValueError(f"{who}: outputs do not require grad (built under no_grad?)")
        self.params = tuple(params)
        self._outputs = outputs
        self._jvp = jvp
        if jvp is None:
            # J^T u is linear in u; its graph (create_graph) gives J v = d<J^T u, v>/du.
            self._dummy = torch.zeros_like(outputs, requires_grad=True)
            jt_u = torch.autograd.grad(
                outputs, self.params, self._dummy, create_graph=True, allow_unused=True
            )
            self._index = [i for i, t in enumerate(jt_u) if t is not None and t.requires_grad]
            self._jt_u = [jt_u[i] for i in self._index]
        # H_out: the loss on a detached copy of the outputs, its gradient graph kept.
        self._point = outputs.detach().requires_grad_(True)
        out_loss = output_loss_fn(self._point)
        if out_loss.dim() != 0:
            raise ValueError(f"{who}: output_loss_fn must return a scalar, got {out_loss.shape}")
        (self._out_grad,) = torch.autograd.grad(out_loss, self._point, create_graph=True)
        self.loss = out_loss.detach()
        self._released = False

    def _local_matvec(self, v: TensorTuple) -> TensorTuple:
        who = type(self).__name__
        if self._released:
            raise RuntimeError(f"{who} was released; build a new one")
        check_vector(v, self.params, who)
        if self._jvp is not None:
            jv = self._jvp(v).to(self._point.dtype)
        elif not self._index:
            return tuple(torch.zeros_like(p) for p in self.params)
        else:
            (jv,) = torch.autograd.grad(
                self._jt_u,
                self._dummy,
                [v[i].to(self._jt_u[k].dtype) for k, i in enumerate(self._index)],
                retain_graph=True,
            )
        if not self._out_grad.requires_grad:  # loss linear in the outputs: H_out = 0
            return tuple(torch.zeros_like(p) for p in self.params)
        (hjv,) = torch.autograd.grad(self._out_grad, self._point, jv, retain_graph=True)
        gv = torch.autograd.grad(
            self._outputs, self.params, hjv, retain_graph=True, allow_unused=True
        )
        # Zeros only for parameters the outputs ignore (not a full zero tuple per product).
        return tuple(
            torch.zeros_like(p) if t is None else t.detach()
            for t, p in zip(gv, self.params, strict=True)
        )

    def release(self) -> None:
        self._jt_u, self._index, self._jvp = [], [], None
        self._outputs = self._dummy = self._point = self._out_grad = None  # type: ignore[assignment]
        self._released = True


@contextlib.contextmanager
def scratch_buffers(module: nn.Module) -> Iterator[None]:
    """Run forwards whose buffer updates (BN running statistics) go to throw-away copies.

    Inside the block every buffer of ``module`` is a clone; on exit the originals are put back,
    untouched. Graphs built inside keep the clones they used.
    """
    saved = []
    for owner in module.modules():
        for name, buffer in list(owner.named_buffers(recurse=False)):
            saved.append((owner, name, buffer))
            setattr(owner, name, buffer.clone())
    try:
        yield
    finally:
        for owner, name, buffer in saved:
            setattr(owner, name, buffer)


@contextlib.contextmanager
def batch_statistics_only(module: nn.Module) -> Iterator[None]:
    """BN normalises with batch statistics and updates no running statistics inside the block.

    For torch.func transforms (``functional_hvp``), which cannot mutate buffers: the same
    Hessian as the trainer's (training-mode BN normalises with batch statistics too; the trainer
    only sends the statistic updates to :func:`scratch_buffers`).
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracking = [m.track_running_stats for m in norms]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, track in zip(norms, tracking, strict=True):
            m.track_running_stats = track


def hessian_of_batch(
    pretext_model: nn.Module,
    batch: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    all_reduce: AllReduce | None = None,
) -> HessianCurvature:
    """The pretext loss' Hessian on one batch (BN statistic updates go to scratch copies).

    Args:
        pretext_model: The lower (pretext) model; its forward returns the pretext loss.
        batch: Its inputs (e.g. the two views).
        params: Tensors the matrix is taken over (the lower backbone, plus the head for the
            joint system).
        all_reduce: Averages products over processes; None for one process.
    """
    with scratch_buffers(pretext_model):
        loss = pretext_model(*batch)
    return HessianCurvature(loss, params, all_reduce)


class _GGNOutputs(nn.Module):
    """``pretext_model.ggn_outputs(*batch)[0]`` as a module's forward, for ``functional_call``."""

    def __init__(self, pretext_model: nn.Module) -> None:
        super().__init__()
        self.model = pretext_model

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.model.ggn_outputs(*batch)[0]


def output_jvp(
    pretext_model: nn.Module, batch: Sequence[torch.Tensor], params: Sequence[torch.Tensor]
) -> Callable[[TensorTuple], torch.Tensor]:
    """``v -> J v`` for the outputs of ``pretext_model.ggn_outputs(*batch)`` by forward mode.

    Each call is one forward pass carrying tangents (``torch.func.jvp``, under ``no_grad``: no
    graph is kept), BN normalising with batch statistics and updating nothing, as in the stage's
    graph; an autocast active now (``GRAPH_DTYPE`` bf16) is active in every call too.
    """
    # torch loads its forward-mode decompositions at the first dual tensor, scripting them.
    import_quietly(("torch._decomp.decompositions_for_jvp",))
    names = {id(p): name for name, p in pretext_model.named_parameters()}
    unknown = [i for i, p in enumerate(params) if id(p) not in names]
    if unknown:
        raise ValueError(f"output_jvp: params {unknown} are not parameters of the pretext model")
    keys = [f"model.{names[id(p)]}" for p in params]
    primals = tuple(p.detach() for p in params)
    module, batch = _GGNOutputs(pretext_model), tuple(batch)
    device = batch[0].device.type
    autocast_on, autocast_dtype = (
        torch.is_autocast_enabled(device),
        torch.get_autocast_dtype(device),
    )

    def outputs_of(*theta: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(module, dict(zip(keys, theta, strict=True)), batch)

    def jvp(v: TensorTuple) -> torch.Tensor:
        tangents = tuple(t.detach().to(p.dtype) for t, p in zip(v, primals, strict=True))
        with (
            batch_statistics_only(pretext_model),
            torch.no_grad(),
            torch.autocast(device, dtype=autocast_dtype, enabled=autocast_on),
        ):
            return torch.func.jvp(outputs_of, primals, tangents)[1]

    return jvp


def gauss_newton_of_batch(
    pretext_model: nn.Module,
    batch: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    all_reduce: AllReduce | None = None,
    jv: str = "forward",
) -> GaussNewtonCurvature:
    """The pretext loss' Gauss-Newton matrix on one batch; arguments as :func:`hessian_of_batch`;
    ``jv``: how products get ``J v`` (:data:`GGN_JV_MODES`).

    Needs ``pretext_model.ggn_outputs(*batch) -> (outputs, loss_of_outputs)``.
    """
    if not hasattr(pretext_model, "ggn_outputs"):
        raise ValueError(
            f"curvature 'ggn': {type(pretext_model).__name__} has no ggn_outputs() method"
        )
    if jv not in GGN_JV_MODES:
        raise ValueError(f"curvature 'ggn': jv = {jv!r}; valid: {list(GGN_JV_MODES)}")
    with scratch_buffers(pretext_model):
        outputs, loss_of_outputs = pretext_model.ggn_outputs(*batch)
    jvp = output_jvp(pretext_model, batch, params) if jv == "forward" else None
    return GaussNewtonCurvature(outputs, loss_of_outputs, params, all_reduce, jvp=jvp)
