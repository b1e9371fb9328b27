"""How training runs: the bilevel trainer, its hooks and checkpoints, multi-process launch."""

from .launch import launch
from .trainer import BilevelTrainer

__all__ = ["BilevelTrainer", "launch"]
