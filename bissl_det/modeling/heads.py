"""Downstream heads: the ResNet image classifier and the C4 ROI head with an extra res5 norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import get_norm
from detectron2.modeling import META_ARCH_REGISTRY, ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import Res5ROIHeads
from torch import nn

from .backbone import PooledEncoder, build_resnet_trunk


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """R50-C4 ROI head (Faster or Mask R-CNN) with a normalisation layer after res5.

    The SSL detection-transfer protocol (MoCo) adds it because SSL features are scaled differently
    from supervised ones; the norm is part of the head, not of the transferred backbone. It is the
    last module of ``res5``, and detectron2's :class:`Res5ROIHeads` computes every ROI feature
    through that one block (``_shared_roi_transform``): the mask branch sees the normalised
    features too, in training (the foreground rows of the box features) and at inference (the
    predicted boxes' features, computed again).
    """

    @classmethod
    def _build_res5_block(cls, cfg):
        res5, out_channels = super()._build_res5_block(cfg)
        res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return res5, out_channels


@META_ARCH_REGISTRY.register()
class ResNetClassifier(nn.Module):
    """ResNet trunk + global pooling + linear layer: the classification upper level.

    Batches are dicts ``{"images": (N, 3, H, W) normalised tensor, "targets": (N,) class ids or
    (N, C) multi-hot}``. Training mode returns ``{"loss_cls": loss}`` (like GeneralizedRCNN returns
    its loss dict); eval mode returns the logits.
    """

    @configurable
    def __init__(self, *, encoder: PooledEncoder, num_classes: int, multi_label: bool = False):
        super().__init__()
        self.backbone = encoder.resnet
        self.linear = nn.Linear(encoder.feat_dim, num_classes)
        self.multi_label = multi_label

    @classmethod
    def from_config(cls, cfg):
        return {
            "encoder": PooledEncoder(build_resnet_trunk(cfg)),
            "num_classes": cfg.MODEL.CLASSIFIER.NUM_CLASSES,
            "multi_label": cfg.MODEL.CLASSIFIER.MULTI_LABEL,
        }

    @property
    def device(self) -> torch.device:
        return self.linear.weight.device

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(self.backbone(images)["res5"].mean(dim=(2, 3)))

    def forward(self, batch: dict[str, torch.Tensor]):
        logits = self.logits(batch["images"].to(self.device, non_blocking=True))
        if not self.training:
            return logits
        targets = batch["targets"].to(self.device, non_blocking=True)
        if self.multi_label:
            # VOC07 convention: 1 present, 0 absent, -1 "difficult only" (ignored).
            known = targets >= 0
            loss = F.binary_cross_entropy_with_logits(
                logits[known], targets[known].float(), reduction="mean"
            )
        else:
            loss = F.cross_entropy(logits, targets)
        return {"loss_cls": loss}
