"""Training: the bilevel trainer, warm-up, pretraining, fine-tuning, their hooks and checkpoints."""

from .trainer import BilevelTrainer

__all__ = ["BilevelTrainer"]
