"""The interface of pretext methods with an EMA target network (BYOL; MoCo or DINO next)."""

from __future__ import annotations

from abc import ABC, abstractmethod

__all__ = ["MomentumTarget", "reset_target"]


class MomentumTarget(ABC):
    """A pretext model whose target network follows the online one by an exponential average.

    Trainers call :meth:`update_target` after every optimiser step of the online network, and
    with ``momentum=0`` to make the target a copy of freshly initialised or loaded weights. A
    method without a target is simply not a ``MomentumTarget``: nothing is called for it.
    """

    @abstractmethod
    def update_target(self, momentum: float | None = None) -> None:
        """``target = m * target + (1 - m) * online``; ``m`` None: the model's own momentum."""


def reset_target(model: object) -> None:
    """Make an EMA target a copy of the online network (nothing for a method without one)."""
    if isinstance(model, MomentumTarget):
        model.update_target(momentum=0.0)
