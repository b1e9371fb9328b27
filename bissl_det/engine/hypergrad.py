"""The implicit gradient of a BiSSL stage, as configured by BISSL.HYPERGRAD.

The trainer asks :class:`Hypergradient` (one per run) for "the stage's system" once per stage and
solves it for every upper step. This is the only place that maps config values to the
curvature (:mod:`bissl_det.bilevel.curvature`, :mod:`~bissl_det.bilevel.fisher`) and solver
(:mod:`~bissl_det.bilevel.solvers`, :mod:`~bissl_det.bilevel.lanczos`) objects and turns their
diagnostics into the logged metrics; the alternation itself stays in ``trainer.py``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from detectron2.engine import HookBase
from torch import nn

from ..bilevel import (
    CURVATURES,
    NEGATIVE_CURVATURE_MODES,
    SOLVERS,
    Curvature,
    EmpiricalFisherCurvature,
    LanczosBasis,
    SolveInfo,
    TensorTuple,
    damped_matvec,
    get_solver,
    joint_damped_matvec,
    lanczos_extremes,
    pretext_curvature,
    true_residual,
    tuple_cosine,
    tuple_norm,
)
from ..utils.distributed import all_reduce_mean

__all__ = [
    "HYPERGRAD_SOLVERS",
    "Hypergradient",
    "LogHypergradient",
    "StageSystem",
    "check_hypergrad_config",
]
logger = logging.getLogger(__name__)

HYPERGRAD_SOLVERS = (*SOLVERS, "lanczos", "direct")


def check_hypergrad_config(hg) -> None:
    """Refuse an invalid BISSL.HYPERGRAD combination before any work, naming the key."""

    def one_of(key: str, value, valid) -> None:
        if value not in valid:
            raise ValueError(f"BISSL.HYPERGRAD.{key} = {value!r}: valid values are {list(valid)}")

    one_of("CURVATURE", hg.CURVATURE, CURVATURES)
    one_of("SOLVER", hg.SOLVER, HYPERGRAD_SOLVERS)
    one_of("ON_NEGATIVE_CURVATURE", hg.ON_NEGATIVE_CURVATURE, NEGATIVE_CURVATURE_MODES)
    one_of("FISHER_DEVICE", hg.FISHER_DEVICE, ("cpu", "model"))
    for key in ("MAX_ITER", "EIGEN_STEPS"):
        if hg[key] < 0:
            raise ValueError(f"BISSL.HYPERGRAD.{key} = {hg[key]}: must be >= 0")
    for key in ("BASIS_SIZE", "FISHER_HISTORY"):
        if hg[key] < 1:
            raise ValueError(f"BISSL.HYPERGRAD.{key} = {hg[key]}: must be >= 1")
    if hg.SOLVER == "direct" and hg.CURVATURE != "fisher":
        raise ValueError(
            f"BISSL.HYPERGRAD.SOLVER = 'direct' needs CURVATURE 'fisher' (an exact Woodbury "
            f"inverse); CURVATURE = {hg.CURVATURE!r} has none: use 'cg' or 'lanczos'"
        )
    if hg.INCLUDE_PRETEXT_HEAD and (hg.CURVATURE == "fisher" or hg.SOLVER == "direct"):
        raise ValueError(
            "BISSL.HYPERGRAD.INCLUDE_PRETEXT_HEAD needs a curvature over backbone and head "
            "('hessian' or 'ggn') and an iterative solver; the Fisher history is the backbone's"
        )
    if hg.SOLVER in ("cg", "layerwise_cg", "neumann") and hg.MAX_ITER < 1:
        raise ValueError(f"BISSL.HYPERGRAD.MAX_ITER = 0: solver {hg.SOLVER!r} needs >= 1")


class StageSystem:
    """``A x = g``, ``A = I + C / (lambda + delta)``, for one stage (``C`` fixed): its solves.

    The Lanczos basis (SOLVER "lanczos") and the eigenvalue estimate are built at the first solve,
    from its right-hand side, and reused by the stage's other upper steps.
    """

    def __init__(self, hg, lam: float, curvature: Curvature, head: Sequence[torch.Tensor]):
        self.hg, self.curvature, self.head = hg, curvature, tuple(head)
        self.scale = 1.0 / (lam + hg.DAMPING)
        self._lam = lam
        self._basis: LanczosBasis | None = None
        self.eigen: tuple[float, float] | None = None  # extreme eigenvalues of A (estimates)

    def operator(self, num_backbone: int) -> Callable[[TensorTuple], TensorTuple]:
        if self.head:
            return joint_damped_matvec(self.curvature.matvec, num_backbone, self.scale)
        return damped_matvec(self.curvature.matvec, self._lam, self.hg.DAMPING)

    def solve(self, g: TensorTuple) -> tuple[TensorTuple, dict[str, float]]:
        """``x`` (shaped like ``g``) and the step's diagnostics as metrics."""
        hg = self.hg
        g = tuple(t.detach() for t in g)
        rhs = (*g, *(torch.zeros_like(h, dtype=g[0].dtype) for h in self.head))
        matvec = self.operator(len(g))
        start = self.curvature.products
        stage_products = 0
        if hg.SOLVER == "lanczos" and self._basis is None:
            self._basis = LanczosBasis.build(matvec, rhs, hg.BASIS_SIZE)
            theta = self._basis.ritz_values
            self.eigen = (theta[0].item(), theta[-1].item())
            stage_products = self._basis.products
        elif self.eigen is None and hg.EIGEN_STEPS > 0:
            lo, hi, ritz = lanczos_extremes(matvec, rhs, hg.EIGEN_STEPS)
            self.eigen, stage_products = (lo, hi), ritz.products
        mode, check = hg.ON_NEGATIVE_CURVATURE, hg.TRUE_RESIDUAL
        if hg.SOLVER == "direct":
            x = self.curvature.solve_damped(g, self.scale)
            info = _direct_info(matvec, x, g, check)
        elif hg.SOLVER == "lanczos":
            x, info = self._basis.solve(
                rhs, max_iter=hg.MAX_ITER, tol=hg.TOL, on_negative_curvature=mode,
                check_residual=check,
            )  # fmt: skip
        else:
            kwargs = {"check_residual": check}
            if hg.SOLVER != "neumann":
                kwargs["on_negative_curvature"] = mode
            x, info = get_solver(hg.SOLVER)(matvec, rhs, max_iter=hg.MAX_ITER, tol=hg.TOL, **kwargs)
        x = tuple(x[: len(g)])
        g_norm = tuple_norm(g).item()
        stats = {
            "hypergrad_rel_residual": info.rel_residual,
            "hypergrad_negative_curvature": float(info.negative_curvature),
            "hypergrad_truncated": float(info.truncated),
            "hypergrad_iterations": float(info.iterations),
            "hypergrad_products": float(self.curvature.products - start - stage_products),
            "hypergrad_cosine": tuple_cosine(x, g).item(),
            "hypergrad_norm_ratio": tuple_norm(x).item() / g_norm if g_norm > 0 else 0.0,
        }
        return x, stats

    def stage_metrics(self) -> dict[str, float]:
        """Once per stage: the operator's extreme eigenvalue estimates and the stage's products."""
        out = {"hypergrad_stage_products": float(self.curvature.products)}
        if self.eigen is not None:
            out["hypergrad_eig_min"], out["hypergrad_eig_max"] = self.eigen
        return out

    def release(self) -> None:
        if self._basis is not None:
            self._basis.release()
        self.curvature.release()


def _direct_info(matvec, x: TensorTuple, g: TensorTuple, check: bool) -> SolveInfo:
    """Diagnostics of an exact solve: its true residual costs one product (rounding only)."""
    norm, rel = true_residual(matvec, x, g) if check else (math.nan, math.nan)
    return SolveInfo(0, int(check), norm, rel, check, 0, False, True)


class Hypergradient:
    """Per-run state of the implicit gradient (the Fisher history), and the per-stage systems.

    Args:
        cfg: The run's config (BISSL.HYPERGRAD, BISSL.LAMBDA).
        model: The :class:`~bissl_det.modeling.meta_arch.BiSSL` model.
    """

    def __init__(self, cfg, model: nn.Module):
        self.hg, self.lam = cfg.BISSL.HYPERGRAD, cfg.BISSL.LAMBDA
        check_hypergrad_config(self.hg)
        self.model = model
        self.fisher: EmpiricalFisherCurvature | None = None
        if self.hg.CURVATURE == "fisher":
            device = "cpu" if self.hg.FISHER_DEVICE == "cpu" else None
            self.fisher = EmpiricalFisherCurvature(self.hg.FISHER_HISTORY, device=device)

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        """What the curvature is taken over: theta (and the pretext head for the joint system)."""
        backbone = tuple(self.model.backbone_pairs.lower)
        return (*backbone, *self.head) if self.hg.INCLUDE_PRETEXT_HEAD else backbone

    @property
    def head(self) -> tuple[torch.Tensor, ...]:
        if not self.hg.INCLUDE_PRETEXT_HEAD:
            return ()
        return tuple(p for p in self.model.lower_head_parameters() if p.requires_grad)

    def record_lower_gradient(self, grads: Sequence[torch.Tensor]) -> None:
        """A lower step's pretext gradient of theta (averaged over processes), for "fisher"."""
        if self.fisher is not None:
            self.fisher.append(tuple(grads))

    def stage_system(self, next_pretext_batch: Callable[[], Sequence[torch.Tensor]]) -> StageSystem:
        """The stage's matrix: one pretext batch ("hessian", "ggn") or the history ("fisher")."""
        if self.fisher is not None:
            if len(self.fisher) == 0:
                raise RuntimeError("BISSL.HYPERGRAD.CURVATURE 'fisher': no lower step has run yet")
            self.fisher.products = 0
            return StageSystem(self.hg, self.lam, self.fisher, ())
        curvature = pretext_curvature(
            self.hg.CURVATURE, self.model.lower, next_pretext_batch(), self.params, all_reduce_mean
        )
        return StageSystem(self.hg, self.lam, curvature, self.head)


class LogHypergradient(HookBase):
    """One console line per logged stage with the implicit gradient's diagnostics.

    Detectron2's CommonMetricPrinter shows losses, lr and ETA only; this line says whether the
    stage's systems were well-posed (residual, negative curvature, eigenvalues of ``A``).
    """

    def __init__(self, period: int):
        self.period = max(1, period)

    def after_step(self) -> None:
        stage = self.trainer.iter + 1
        if stage % self.period and stage != self.trainer.max_iter:
            return
        latest = {k: v for k, (v, _) in self.trainer.storage.latest().items()}
        if "hypergrad_rel_residual" not in latest:
            return
        eig = ""
        if "hypergrad_eig_min" in latest:
            eig = f"  eig(A) [{latest['hypergrad_eig_min']:.3g}, {latest['hypergrad_eig_max']:.3g}]"
        logger.info(
            "stage %d/%d hypergradient: rel_residual %.2e (max %.2e)  negative_curvature %g  "
            "cos(x,g) %.3f  |x|/|g| %.3g  products %g%s",
            stage,
            self.trainer.max_iter,
            latest["hypergrad_rel_residual"],
            latest["hypergrad_rel_residual_max"],
            latest["hypergrad_negative_curvature"],
            latest["hypergrad_cosine"],
            latest["hypergrad_norm_ratio"],
            latest["hypergrad_stage_products"],
            eig,
        )
