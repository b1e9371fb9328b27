"""Small helpers shared by the loaders of both levels."""

from __future__ import annotations

from detectron2.config import CfgNode
from detectron2.utils import comm

__all__ = ["normalisation", "per_process_batch"]


def per_process_batch(total: int, what: str) -> int:
    """This process's share of a batch size given over all processes."""
    world = comm.get_world_size()
    if total <= 0 or total % world:
        raise ValueError(f"{what} = {total} must be a positive multiple of the {world} processes")
    return total // world


def normalisation(cfg: CfgNode) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """MODEL.PIXEL_MEAN/STD on the 0-1 scale, for loaders that normalise outside the model.

    The detector normalises inside the model; pretext and classification tensors must match it,
    so BiSSL configs use RGB input (MoCo's detection protocol).
    """
    if cfg.INPUT.FORMAT != "RGB":
        raise ValueError(
            f"INPUT.FORMAT = {cfg.INPUT.FORMAT!r}: BiSSL configs must use 'RGB' with "
            "MODEL.PIXEL_MEAN/STD in RGB order (torchvision-style SSL checkpoints)"
        )
    mean = tuple(m / 255.0 for m in cfg.MODEL.PIXEL_MEAN)
    std = tuple(s / 255.0 for s in cfg.MODEL.PIXEL_STD)
    return mean, std
