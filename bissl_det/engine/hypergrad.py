"""The implicit gradient of a BiSSL stage, as configured by BISSL.HYPERGRAD.

This module only maps config values to :mod:`bissl_det.bilevel`'s objects (a curvature and a
solver from :mod:`~bissl_det.bilevel.registry`, assembled by
:class:`~bissl_det.bilevel.stage.StageSystem`) and turns their diagnostics into the logged
metrics; the math is in bilevel/, the alternation in ``trainer.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from detectron2.engine import HookBase
from torch import nn

from ..bilevel import (
    Curvature,
    ImplicitGradInfo,
    StageSystem,
    get_curvature,
)
from ..config.hypergrad import check_hypergrad_config
from ..utils.distributed import all_reduce_mean, world_size
from .curvature_batch import check_curvature_batch, curvature_images, graph_precision

__all__ = [
    "Hypergradient",
    "LogHypergradient",
    "solve_metrics",
    "stage_metrics",
]
logger = logging.getLogger(__name__)


def solve_metrics(info: ImplicitGradInfo) -> dict[str, float]:
    """One upper step's solve as logged metrics."""
    solve = info.solve_info
    return {
        "hypergrad_rel_residual": solve.rel_residual,
        "hypergrad_negative_curvature": float(solve.negative_curvature),
        "hypergrad_truncated": float(solve.truncated),
        "hypergrad_iterations": float(solve.iterations),
        "hypergrad_products": float(info.products),
        "hypergrad_cosine": info.cosine,
        "hypergrad_norm_ratio": info.norm_ratio,
    }


def stage_metrics(system: StageSystem) -> dict[str, float]:
    """Once per stage: the operator's extreme eigenvalue estimates and the stage's products."""
    out = {"hypergrad_stage_products": float(system.stage_products())}
    if system.eigen is not None:
        out["hypergrad_eig_min"], out["hypergrad_eig_max"] = system.eigen
    basis = getattr(system, "basis_vectors", None)  # a coupling arm's fixed system has none
    if basis is not None:
        out["hypergrad_basis_size"] = float(basis)
    return out


class Hypergradient:
    """Per-run state of the implicit gradient (the Fisher history), and the per-stage systems.

    Args:
        cfg: The run's config (BISSL.HYPERGRAD, BISSL.LAMBDA).
        model: The :class:`~bissl_det.modeling.meta_arch.BiSSL` model.
    """

    def __init__(self, cfg, model: nn.Module):
        self.hg, self.lam = cfg.BISSL.HYPERGRAD, cfg.BISSL.LAMBDA
        check_hypergrad_config(self.hg)
        self.curvature_per_process = check_curvature_batch(cfg, world_size())
        self.model = model
        self.kind = get_curvature(self.hg.CURVATURE)
        # A history-backed curvature (the Fisher) lives across stages; the lower steps fill it.
        self.fisher: Curvature | None = None
        if self.kind.from_history is not None:
            device = "cpu" if self.hg.FISHER_DEVICE == "cpu" else None
            self.fisher = self.kind.from_history(self.hg.FISHER_HISTORY, device)

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
        """The stage's system: its matrix from one pretext batch or from the history."""
        if self.fisher is not None:
            if len(self.fisher) == 0:
                raise RuntimeError(
                    f"BISSL.HYPERGRAD.CURVATURE {self.hg.CURVATURE!r}: no lower step has run yet"
                )
            return self.build_system(self.fisher, ())
        batch = curvature_images(next_pretext_batch(), self.curvature_per_process)
        with graph_precision(self.hg.GRAPH_DTYPE, batch[0].device):
            curvature = self.kind.from_batch(
                self.model.lower,
                batch,
                self.params,
                all_reduce_mean,
                **self.kind.options_from(self.hg),
            )
        return self.build_system(curvature, self.head)

    def build_system(self, curvature: Curvature, head: Sequence[torch.Tensor] = ()) -> StageSystem:
        """The configured stage system over ``curvature`` (the trainer's, or a parity test's)."""
        hg = self.hg
        return StageSystem(
            curvature,
            self.lam,
            hg.DAMPING,
            hg.SOLVER,
            head=head,
            eigen_steps=hg.EIGEN_STEPS,
            basis_size=hg.BASIS_SIZE,
            basis_tol=hg.TOL if hg.ADAPTIVE_BASIS else 0.0,
            max_iter=hg.MAX_ITER,
            tol=hg.TOL,
            on_negative_curvature=hg.ON_NEGATIVE_CURVATURE,
            check_residual=hg.TRUE_RESIDUAL,
        )


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
