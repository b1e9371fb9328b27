"""The pretext tasks by their config name (MODEL.BISSL.PRETEXT), as Detectron2 registers models.

A task is a function ``name(cfg, encoder) -> nn.Module`` registered here under its config name;
the returned model's forward maps two views to the pretext loss (see :mod:`.pretext`). Adding a
task is one decorated function; nothing else tests the name.
"""

from __future__ import annotations

from detectron2.utils.registry import Registry
from torch import nn

from .backbone import PooledEncoder
from .pretext import BYOL, SimCLR

__all__ = ["PRETEXT_REGISTRY", "build_pretext_model", "pretext_names"]

PRETEXT_REGISTRY = Registry("PRETEXT")
PRETEXT_REGISTRY.__doc__ = "Pretext tasks: name(cfg, encoder) -> model whose forward is the loss."


@PRETEXT_REGISTRY.register()
def simclr(cfg, encoder: PooledEncoder) -> nn.Module:
    """SimCLR: NT-Xent between the two views' projections (MODEL.SIMCLR)."""
    return SimCLR(
        encoder,
        feat_dim=encoder.feat_dim,
        projector_dims=(encoder.feat_dim, *cfg.MODEL.SIMCLR.PROJECTOR_DIMS),
        temperature=cfg.MODEL.SIMCLR.TEMPERATURE,
        gather=cfg.MODEL.SIMCLR.GATHER,
        separate_views=cfg.MODEL.SIMCLR.SEPARATE_VIEWS,
    )


@PRETEXT_REGISTRY.register()
def byol(cfg, encoder: PooledEncoder) -> nn.Module:
    """BYOL: the online prediction regresses an EMA target's projection (MODEL.BYOL)."""
    projector = (encoder.feat_dim, *cfg.MODEL.BYOL.PROJECTOR_DIMS)
    return BYOL(
        encoder,
        feat_dim=encoder.feat_dim,
        projector_dims=projector,
        predictor_dims=(projector[-1], *cfg.MODEL.BYOL.PREDICTOR_DIMS),
        ema_momentum=cfg.MODEL.BYOL.EMA_MOMENTUM,
    )


def pretext_names() -> list[str]:
    """The registered task names, sorted."""
    return sorted(name for name, _ in PRETEXT_REGISTRY)


def build_pretext_model(cfg, encoder: PooledEncoder) -> nn.Module:
    """The pretext model MODEL.BISSL.PRETEXT on top of ``encoder``."""
    name = cfg.MODEL.BISSL.PRETEXT.lower()
    if name not in PRETEXT_REGISTRY:
        raise ValueError(
            f"MODEL.BISSL.PRETEXT: unknown pretext task {name!r} ({', '.join(pretext_names())})"
        )
    return PRETEXT_REGISTRY.get(name)(cfg, encoder)
