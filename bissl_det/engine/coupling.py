"""How the two levels are coupled (BISSL.COUPLING): BiSSL itself and the arms of a study.

================  =======================================  ===================================
BISSL.COUPLING    lower level                              upper backbone gradient
================  =======================================  ===================================
"bilevel"         L_P + lambda/2 ||theta - phi||^2         x + gamma grad L_D(phi): x solves
                                                           the stage's system (BiSSL)
"first_order"     L_P + lambda/2 ||theta - phi||^2         x = g (the system's matrix taken as 0)
"proximal"        L_P + lambda/2 ||theta - phi||^2         x = 0: phi trained by gamma L_D alone
"decoupled"       L_P alone: theta never depends on phi    x = 0 (the compute-matched control)
================  =======================================  ===================================

Every arm draws the same batches in the same order: a stage whose curvature would take a
pretext batch ("hessian", "ggn") draws it in every arm and discards it where no system is
solved, so that the lower steps of two arms with the same SEED see the same images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..bilevel import ImplicitGradInfo, SolveInfo, TensorTuple, get_curvature
from ..config.defaults import COUPLINGS

__all__ = ["COUPLINGS", "FixedStageSystem", "proximity_weight"]


def proximity_weight(bissl) -> float:
    """lambda of the lower level's pull toward phi: BISSL.LAMBDA, or 0 when decoupled."""
    if bissl.COUPLING not in COUPLINGS:
        raise ValueError(f"BISSL.COUPLING = {bissl.COUPLING!r}: valid values are {list(COUPLINGS)}")
    return 0.0 if bissl.COUPLING == "decoupled" else float(bissl.LAMBDA)


class FixedStageSystem:
    """The stage's "system" of an arm that solves none: x = g ("first_order") or x = 0.

    Has the interface of :class:`~bissl_det.bilevel.stage.StageSystem` the trainer uses;
    no curvature, no product. The residual is not defined (NaN is logged).
    """

    curvature = None
    eigen = None

    def __init__(self, coupling: str):
        if coupling not in COUPLINGS or coupling == "bilevel":
            raise ValueError(f"FixedStageSystem: coupling {coupling!r} solves a system")
        self.identity = coupling == "first_order"

    @classmethod
    def draw(
        cls, coupling: str, curvature: str, next_pretext_batch: Callable[[], Sequence]
    ) -> FixedStageSystem:
        """The system of one stage; takes (and discards) the pretext batch that the bilevel
        arm's curvature would take, so the data stream stays the bilevel arm's."""
        if get_curvature(curvature).from_batch is not None:
            next_pretext_batch()
        return cls(coupling)

    def solve(self, g: TensorTuple) -> tuple[TensorTuple, ImplicitGradInfo]:
        g = tuple(t.detach() for t in g)
        x = g if self.identity else tuple(torch.zeros_like(t) for t in g)
        ratio = 1.0 if self.identity else 0.0
        nothing_solved = SolveInfo(0, 0, math.nan, math.nan, False, 0, False, True)
        return x, ImplicitGradInfo(nothing_solved, 0, ratio, ratio)

    def stage_products(self) -> int:
        return 0

    def release(self) -> None:
        pass
