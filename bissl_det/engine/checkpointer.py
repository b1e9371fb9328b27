"""Checkpoints of a BiSSL run: crash-safe writes, resumable state, the lower-backbone export."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..checkpoint import convert_to_detectron2, load_checkpoint_file, save_backbone_checkpoint
from ..checkpoint.convert import detectron2_to_torchvision

logger = logging.getLogger(__name__)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, then rename over ``path``.

    A crash mid-write leaves the previous file intact; readers never see a partial file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class AtomicCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose checkpoint and ``last_checkpoint`` tag are written atomically."""

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        tag = Path(self.save_dir) / "last_checkpoint"
        tmp = tag.with_name(".last_checkpoint.tmp")
        tmp.write_text(last_filename_basename)
        os.replace(tmp, tag)


class TrainingProgress:
    """Trainer state beyond weights: warm-up done, batches drawn per level, RNG states.

    Checkpointed with the weights so that ``--resume`` continues with the same data and the same
    random augmentations as an uninterrupted run (exact with NUM_WORKERS = 0).
    """

    def __init__(self) -> None:
        self.warmup_done = False
        self.pretext_batches = 0
        self.downstream_batches = 0

    def state_dict(self) -> dict:
        np_state = np.random.get_state()
        state = {
            "warmup_done": self.warmup_done,
            "pretext_batches": self.pretext_batches,
            "downstream_batches": self.downstream_batches,
            # Plain tensors and lists only, so checkpoints load with torch.load(weights_only=True).
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": [
                np_state[0],
                torch.from_numpy(np_state[1].astype(np.int64)),
                *np_state[2:],
            ],
            "python_rng": random.getstate(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.warmup_done = bool(state["warmup_done"])
        self.pretext_batches = int(state["pretext_batches"])
        self.downstream_batches = int(state["downstream_batches"])
        torch.set_rng_state(state["torch_rng"])
        kind, keys, *rest = state["numpy_rng"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])


def lower_state_without_backbone(lower: torch.nn.Module) -> dict:
    """The pretext head's state (projector, predictor, BYOL target): ``lower`` minus ``encoder``."""
    return {k: v for k, v in lower.state_dict().items() if not k.startswith("encoder.")}


def export_backbone(
    pretext_model: torch.nn.Module, output_dir: str | os.PathLike, pretext: str, name: str
) -> dict[str, Path]:
    """Write a pretext model's ResNet for fine-tuning, in Detectron2 and torchvision layouts.

    ``<name>.pth`` loads as MODEL.WEIGHTS (Detectron2's matching heuristics put res5 into
    ``roi_heads.res5`` for C4) and carries the pretext head so it can seed a BiSSL run;
    ``<name>_torchvision.pth`` is a torchvision ResNet state dict (no ``fc``).
    """
    output_dir = Path(output_dir)
    resnet = pretext_model.encoder.resnet
    backbone = {k: v.detach().cpu() for k, v in resnet.state_dict().items()}
    d2_path = output_dir / f"{name}.pth"
    tv_path = output_dir / f"{name}_torchvision.pth"
    head = {k: v.detach().cpu() for k, v in lower_state_without_backbone(pretext_model).items()}
    save_backbone_checkpoint(d2_path, backbone, extra={"pretext": pretext, "pretext_head": head})
    torchvision_sd, _ = detectron2_to_torchvision(backbone)
    atomic_torch_save(torchvision_sd, tv_path)
    return {"detectron2": d2_path, "torchvision": tv_path}


def load_pretext_checkpoint(model, path: str, pretext: str) -> None:
    """Initialise both levels of a BiSSL model from a pretext (SSL) checkpoint.

    Any format :func:`convert_to_detectron2` knows is accepted (torchvision, MoCo, solo-learn,
    lightly, Detectron2, ours). theta and phi both start from its backbone; the pretext head is
    loaded too when the checkpoint carries one of the same task (ours do), else it starts fresh.
    """
    checkpoint = load_checkpoint_file(path)
    result = convert_to_detectron2(checkpoint)
    own = model.lower_backbone.state_dict()
    # load_state_dict's size-mismatch error would not name the file; list every mismatch here.
    mismatched = [
        f"{k}: {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
        for k, v in result.model.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if mismatched:
        raise ValueError(
            f"{path}: backbone shapes do not match MODEL.RESNETS ({len(mismatched)} tensors), "
            f"e.g. {mismatched[:5]}"
        )
    incompatible = model.lower_backbone.load_state_dict(result.model, strict=False)
    missing = [k for k in incompatible.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or incompatible.unexpected_keys:
        raise KeyError(
            f"{path}: backbone does not match MODEL.RESNETS - missing keys {missing}, "
            f"unexpected keys {incompatible.unexpected_keys}"
        )
    head = checkpoint.get("pretext_head") if isinstance(checkpoint, dict) else None
    if head is not None and checkpoint.get("pretext") == pretext:
        own = lower_state_without_backbone(model.lower)
        if set(head) != set(own):
            raise KeyError(f"{path}: pretext_head keys do not match the {pretext} head")
        model.lower.load_state_dict({**model.lower.state_dict(), **head})
        logger.info("Loaded the %s pretext head from %s", pretext, path)
    elif hasattr(model.lower, "target_encoder"):
        # A fresh BYOL target starts as a copy of the online network.
        model.lower.update_target(momentum=0.0)
    model.copy_lower_backbone_to_upper()
    logger.info(
        "Initialised both levels from %s (%s format; dropped heads: %d keys)",
        path,
        result.source_format,
        len(result.dropped_heads),
    )
