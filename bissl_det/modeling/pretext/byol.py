"""BYOL: an online network regresses an EMA target network's projection of the other view."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ema import MomentumTarget
from .projection import ProjectionMLP

__all__ = ["BYOL", "byol_loss", "cosine_ema_momentum"]


def _squared_distances(q: Tensor, t: Tensor) -> Tensor:
    """Per-row ``||q - t||^2``; for unit rows it equals ``2 - 2 cos(q, t)``."""
    return (q - t).pow(2).sum(dim=1)


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """``2 - 2 cos(p, z)`` averaged over samples; ``z`` is treated as a constant target.

    Computed as the squared distance of the normalised vectors (the same value), the form that
    is convex in the normalised prediction (see :meth:`BYOL.ggn_outputs`).

    Args:
        p: Online predictions, shape ``(n, d)``.
        z: Target projections, shape ``(n, d)`` (detached here).

    Returns:
        Scalar loss in ``[0, 4]``.
    """
    if p.dim() != 2 or p.shape != z.shape:
        raise ValueError(
            f"byol_loss needs two (n, d) tensors of equal shape, got {tuple(p.shape)} "
            f"and {tuple(z.shape)}"
        )
    return _squared_distances(F.normalize(p, dim=1), F.normalize(z.detach(), dim=1)).mean()


def cosine_ema_momentum(base: float, step: int, total: int) -> float:
    """BYOL's target-momentum schedule: ``1 - (1 - base) * (cos(pi * step / total) + 1) / 2``.

    Goes from ``base`` at step 0 to 1 at ``total`` (steps beyond are clamped).
    """
    if total <= 0:
        raise ValueError(f"cosine_ema_momentum: total must be > 0, got {total}")
    if not 0.0 <= base <= 1.0:
        raise ValueError(f"cosine_ema_momentum: base must be in [0, 1], got {base}")
    progress = min(max(step, 0), total) / total
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


class BYOL(nn.Module, MomentumTarget):
    """Online encoder + projector + predictor; EMA target encoder + projector.

    The target modules are deep copies with ``requires_grad=False``. They follow the online
    modules' train/eval mode (so BatchNorm uses batch statistics in both during training) and
    always run under ``no_grad``. Only :meth:`update_target` moves their parameters - the trainer
    calls it after each lower-level optimiser step, never inside :meth:`forward`, so
    Hessian-vector products (which re-run forward) leave the target untouched. The target's
    BatchNorm running statistics are its own (updated by its forward passes, unused in training
    mode) and are not averaged.

    Args:
        encoder: Maps images ``(N, 3, H, W)`` to pooled features ``(N, feat_dim)``.
        feat_dim: Encoder output width.
        projector_dims: Projector widths; the first must equal ``feat_dim``.
        predictor_dims: Predictor widths; first and last must equal ``projector_dims[-1]``.
        ema_momentum: Default target momentum for :meth:`update_target`.
    """

    def __init__(
        self,
        encoder: nn.Module,
        feat_dim: int = 2048,
        projector_dims: Sequence[int] = (2048, 256, 256, 256),
        predictor_dims: Sequence[int] = (256, 256, 256, 256),
        ema_momentum: float = 0.9995,
    ) -> None:
        super().__init__()
        if projector_dims[0] != feat_dim:
            raise ValueError(
                f"BYOL: projector_dims[0] ({projector_dims[0]}) must equal feat_dim ({feat_dim})"
            )
        if predictor_dims[0] != projector_dims[-1] or predictor_dims[-1] != projector_dims[-1]:
            raise ValueError(
                f"BYOL: predictor_dims {tuple(predictor_dims)} must start and end with the "
                f"projection width {projector_dims[-1]}"
            )
        self._check_momentum(ema_momentum)
        self.encoder = encoder
        # No bias on the last layers, as in the BiSSL authors' code.
        self.projector = ProjectionMLP(projector_dims, last_bias=False)
        self.predictor = ProjectionMLP(predictor_dims, last_bias=False)
        self.target_encoder = copy.deepcopy(encoder)
        self.target_projector = copy.deepcopy(self.projector)
        for p in self.target_parameters():
            p.requires_grad_(False)
        self.ema_momentum = float(ema_momentum)

    @staticmethod
    def _check_momentum(m: float) -> None:
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"BYOL: EMA momentum must be in [0, 1], got {m}")

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """The trainable pretext head (theta_p): projector then predictor parameters."""
        yield from self.projector.parameters()
        yield from self.predictor.parameters()

    def target_parameters(self) -> Iterator[nn.Parameter]:
        """Target encoder then target projector parameters (EMA copies, no gradients)."""
        yield from self.target_encoder.parameters()
        yield from self.target_projector.parameters()

    def _online_pairs(self) -> list[tuple[Tensor, Tensor]]:
        online = [*self.encoder.parameters(), *self.projector.parameters()]
        target = list(self.target_parameters())
        if len(online) != len(target):
            raise RuntimeError(
                f"BYOL: online has {len(online)} parameters, target {len(target)}; the encoder "
                "was changed after construction"
            )
        return list(zip(target, online, strict=True))

    @torch.no_grad()
    def update_target(self, momentum: float | None = None) -> None:
        """EMA step ``target = m * target + (1 - m) * online`` (``m`` defaults to ema_momentum)."""
        m = self.ema_momentum if momentum is None else float(momentum)
        self._check_momentum(m)
        for t, o in self._online_pairs():
            t.mul_(m).add_(o.detach(), alpha=1.0 - m)

    def _target_projection(self, view: Tensor) -> Tensor:
        with torch.no_grad():
            return self.target_projector(self.target_encoder(view))

    def ggn_outputs(
        self, view1: Tensor, view2: Tensor
    ) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """The loss split as ``loss_of_outputs(outputs)`` with a loss convex in the outputs.

        Outputs are the normalised online predictions ``[q1; q2]`` (shape ``(2n, d)``); the
        convex part is the squared distance to the constant normalised targets ``[t2; t1]``,
        summed over rows and divided by ``n`` (Hessian ``2/n I``). ``loss_of_outputs(outputs)``
        equals :meth:`forward`'s loss, ``byol_loss(p1, t2) + byol_loss(p2, t1)``.

        Views are encoded separately (per-view BatchNorm statistics, as in BYOL).
        """
        if view1.shape != view2.shape:
            raise ValueError(
                f"BYOL: views must have equal shapes, got {tuple(view1.shape)} "
                f"and {tuple(view2.shape)}"
            )
        p1 = self.predictor(self.projector(self.encoder(view1)))
        p2 = self.predictor(self.projector(self.encoder(view2)))
        t1 = self._target_projection(view1)
        t2 = self._target_projection(view2)
        predictions = F.normalize(torch.cat([p1, p2]), dim=1)
        targets = F.normalize(torch.cat([t2, t1]), dim=1)
        n = view1.shape[0]

        def loss_of_outputs(outputs: Tensor) -> Tensor:
            return _squared_distances(outputs, targets).sum() / n

        return predictions, loss_of_outputs

    def forward(self, view1: Tensor, view2: Tensor) -> Tensor:
        """Symmetric BYOL loss ``byol_loss(p1, t2) + byol_loss(p2, t1)`` (as in the BYOL paper)."""
        outputs, loss_of_outputs = self.ggn_outputs(view1, view2)
        return loss_of_outputs(outputs)
