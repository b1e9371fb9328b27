"""Pretext (lower-level) heads and losses: pure torch, no detectron2."""

from .byol import BYOL, byol_loss, cosine_ema_momentum
from .ema import MomentumTarget, reset_target
from .projection import ProjectionMLP
from .simclr import SimCLR, nt_xent_loss

__all__ = [
    "BYOL",
    "MomentumTarget",
    "ProjectionMLP",
    "SimCLR",
    "byol_loss",
    "cosine_ema_momentum",
    "nt_xent_loss",
    "reset_target",
]
