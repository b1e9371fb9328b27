"""What flows in: detection data sets (VOC/COCO, validated), pretext views, classification sets.

- :mod:`.detection`: ``register_from_config(cfg)`` (DATASETS.CUSTOM, then validation of every data
  set in use), ``validate_dataset(name)``; :mod:`.voc`, :mod:`.coco` register single sets.
- :mod:`.validation`: the one validation pass over detectron2 dataset dicts.
- :mod:`.images`: the one image reader of every loader.
- :mod:`.tasks`: the downstream-task registry (upper meta-architecture -> loaders, evaluation).
- :mod:`.build`: the loaders of both levels from the config.
"""

from .detection import register_from_config, validate_dataset
from .tasks import DownstreamTask, downstream_task, register_downstream_task
from .validation import DatasetValidationError

__all__ = [
    "DatasetValidationError",
    "DownstreamTask",
    "downstream_task",
    "register_downstream_task",
    "register_from_config",
    "validate_dataset",
]
