"""Everything about checkpoint files, in one package (no model code imported here).

* :mod:`.keys`, :mod:`.convert`: ResNet key layouts and the converters between formats.
* :mod:`.io`: the one atomic writer and the one safe reader (errors name the path).
* :mod:`.backbone`: MODEL.WEIGHTS must initialise every backbone tensor, or is refused.
* :mod:`.pretext`: backbone export and initialisation of the pretext models.
* :mod:`.pairing`: lining up a ResNet's tensors with their copies in another model.
* :mod:`.verify`: proof that a detector holds every backbone tensor of a file.
"""

from .backbone import (
    BackboneWeightsError,
    check_detector_weights,
    converter_command,
    load_backbone_weights,
    read_backbone_weights,
)
from .convert import (
    FORMATS,
    ConversionResult,
    convert_to_detectron2,
    detect_format,
    detectron2_backbone_name,
    extract_state_dict,
)
from .io import (
    CheckpointFileError,
    UntrustedCheckpointError,
    atomic_save,
    atomic_write_text,
    load_checkpoint_file,
    save_backbone_checkpoint,
)
from .keys import (
    check_complete,
    detectron2_to_torchvision,
    is_head_key,
    resnet50_detectron2_keys,
    resnet_detectron2_keys,
    torchvision_to_detectron2,
)
from .pairing import BackbonePairs, pair_by_suffix
from .pretext import (
    export_backbone,
    load_pretext_checkpoint,
    load_pretext_weights,
    lower_state_without_backbone,
)

__all__ = [
    "FORMATS",
    "BackbonePairs",
    "BackboneWeightsError",
    "CheckpointFileError",
    "ConversionResult",
    "UntrustedCheckpointError",
    "atomic_save",
    "atomic_write_text",
    "check_complete",
    "check_detector_weights",
    "convert_to_detectron2",
    "converter_command",
    "detect_format",
    "detectron2_backbone_name",
    "detectron2_to_torchvision",
    "export_backbone",
    "extract_state_dict",
    "is_head_key",
    "load_backbone_weights",
    "load_checkpoint_file",
    "load_pretext_checkpoint",
    "load_pretext_weights",
    "lower_state_without_backbone",
    "pair_by_suffix",
    "read_backbone_weights",
    "resnet50_detectron2_keys",
    "resnet_detectron2_keys",
    "save_backbone_checkpoint",
    "torchvision_to_detectron2",
]
