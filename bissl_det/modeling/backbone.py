"""The Detectron2 ResNet shared by both levels, and its pooled-feature view for pretext heads."""

from __future__ import annotations

import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import ResNet, build_resnet_backbone
from torch import nn


def build_resnet_trunk(cfg: CfgNode, norm: str | None = None) -> ResNet:
    """The full ResNet (stem, res2..res5) of ``cfg.MODEL.RESNETS``, nothing frozen.

    This is the BiSSL "backbone": the lower level trains all of it, the upper detector holds the
    same tensors (stem..res4 in ``backbone``, res5 in ``roi_heads`` for C4), and it is what gets
    exported. ``norm`` overrides MODEL.RESNETS.NORM: the lower level needs plain "BN" because
    SyncBatchNorm has no double backward.
    """
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    if norm is not None:
        cfg.MODEL.RESNETS.NORM = norm
    return build_resnet_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))


class PooledEncoder(nn.Module):
    """A ResNet trunk followed by global average pooling: images -> (N, C) features."""

    def __init__(self, resnet: ResNet):
        super().__init__()
        self.resnet = resnet
        self.feat_dim = resnet.output_shape()["res5"].channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.resnet(images)["res5"].mean(dim=(2, 3))
