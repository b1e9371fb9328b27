"""Pretext (lower-level) heads and losses: pure torch, no detectron2."""

from .byol import BYOL, byol_loss, cosine_ema_momentum
from .projection import ProjectionMLP
from .simclr import SimCLR, nt_xent_loss

__all__ = ["BYOL", "ProjectionMLP", "SimCLR", "byol_loss", "cosine_ema_momentum", "nt_xent_loss"]
