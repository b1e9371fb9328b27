"""Converters between torchvision/timm/SSL ResNet checkpoints and Detectron2 backbones."""

from .convert import (
    FORMATS,
    ConversionResult,
    check_complete,
    convert_to_detectron2,
    detect_format,
    detectron2_to_torchvision,
    extract_state_dict,
    is_head_key,
    resnet50_detectron2_keys,
    resnet_detectron2_keys,
    torchvision_to_detectron2,
)
from .io import UntrustedCheckpointError, load_checkpoint_file, save_backbone_checkpoint

__all__ = [
    "FORMATS",
    "ConversionResult",
    "UntrustedCheckpointError",
    "check_complete",
    "convert_to_detectron2",
    "detect_format",
    "detectron2_to_torchvision",
    "extract_state_dict",
    "is_head_key",
    "load_checkpoint_file",
    "resnet50_detectron2_keys",
    "resnet_detectron2_keys",
    "save_backbone_checkpoint",
    "torchvision_to_detectron2",
]
