"""Pretext models <-> files: the backbone export, and initialisation from an SSL checkpoint.

Duck-typed on the project's pretext models (``encoder.resnet`` is the Detectron2 ResNet; the
rest is the pretext head) and on the BiSSL model (``lower``, ``lower_backbone``,
``copy_lower_backbone_to_upper``), so nothing here imports the model code.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from torch import nn

from .backbone import load_backbone_weights, read_backbone_weights
from .io import atomic_save, load_checkpoint_file, save_backbone_checkpoint
from .keys import detectron2_to_torchvision

__all__ = [
    "export_backbone",
    "load_pretext_checkpoint",
    "load_pretext_weights",
    "lower_state_without_backbone",
]

logger = logging.getLogger(__name__)


def lower_state_without_backbone(lower: nn.Module) -> dict:
    """The pretext head's state (projector, predictor, BYOL target): ``lower`` minus ``encoder``."""
    return {k: v for k, v in lower.state_dict().items() if not k.startswith("encoder.")}


def export_backbone(
    pretext_model: nn.Module,
    output_dir: str | os.PathLike,
    pretext: str,
    name: str,
    classes: list[str] | None = None,
) -> dict[str, Path]:
    """Write a pretext model's ResNet for fine-tuning, in Detectron2 and torchvision layouts.

    ``<name>.pth`` loads as MODEL.WEIGHTS (Detectron2's matching heuristics put res5 into
    ``roi_heads.res5`` for C4) and carries the pretext head so it can seed a BiSSL run;
    ``<name>_torchvision.pth`` is a torchvision ResNet state dict (no ``fc``). Both atomic.
    ``classes``: the downstream classes a BiSSL run tailored the backbone to, recorded as
    ``downstream_classes`` (fine-tuning on other classes is refused).
    """
    output_dir = Path(output_dir)
    resnet = pretext_model.encoder.resnet
    backbone = {k: v.detach().cpu() for k, v in resnet.state_dict().items()}
    d2_path = output_dir / f"{name}.pth"
    tv_path = output_dir / f"{name}_torchvision.pth"
    head = {k: v.detach().cpu() for k, v in lower_state_without_backbone(pretext_model).items()}
    extra = {"pretext": pretext, "pretext_head": head}
    if classes is not None:
        extra["downstream_classes"] = list(classes)
    save_backbone_checkpoint(d2_path, backbone, extra=extra)
    torchvision_sd, _ = detectron2_to_torchvision(backbone)
    atomic_save(torchvision_sd, tv_path)
    return {"detectron2": d2_path, "torchvision": tv_path}


def load_pretext_weights(pretext_model: nn.Module, path: str, pretext: str) -> bool:
    """Initialise a SimCLR/BYOL model from MODEL.WEIGHTS: every backbone tensor, or refuse.

    Any format :func:`~.convert.convert_to_detectron2` reads is accepted. The pretext head is
    loaded too when the file carries one of the same task (this project's exports do); else it
    keeps its fresh initialisation.

    Returns:
        Whether the head (with a BYOL target) was loaded; if not, the caller re-copies an EMA
        target from the loaded online network (:func:`~bissl_det.modeling.pretext.reset_target`).
    """
    checkpoint = load_checkpoint_file(path)
    backbone = read_backbone_weights(path, checkpoint=checkpoint)
    load_backbone_weights(pretext_model.encoder.resnet, backbone, source=path)
    head = checkpoint.get("pretext_head") if isinstance(checkpoint, dict) else None
    if head is not None and checkpoint.get("pretext") == pretext:
        own = lower_state_without_backbone(pretext_model)
        if set(head) != set(own):
            raise KeyError(f"{path}: pretext_head keys do not match the {pretext} head")
        pretext_model.load_state_dict({**pretext_model.state_dict(), **head})
        logger.info("Loaded the %s pretext head from %s", pretext, path)
    logger.info("Initialised the %s backbone from %s (every tensor loaded)", pretext, path)
    return head is not None and checkpoint.get("pretext") == pretext


def load_pretext_checkpoint(model: nn.Module, path: str, pretext: str) -> bool:
    """Initialise both levels of a BiSSL model: theta (and the pretext head) from ``path``, then
    phi <- theta. Returns whether the head was loaded; see :func:`load_pretext_weights`."""
    head_loaded = load_pretext_weights(model.lower, path, pretext)
    model.copy_lower_backbone_to_upper()
    return head_loaded
