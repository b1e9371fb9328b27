"""Detection data sets from the config: register ``DATASETS.CUSTOM``, validate every set in use.

User data sets are registered with detectron2's own ``register_pascal_voc`` /
``register_coco_instances`` (see :mod:`.voc`, :mod:`.coco`), so detectron2's loaders and
evaluators handle them exactly as its builtin sets. :func:`register_from_config`, called by every
tool's ``setup()``, then validates every data set the config uses (DATASETS.TRAIN, DATASETS.TEST,
BISSL.PRETEXT_DATA.DATASETS; builtin or custom) before any long work: :func:`validate_dataset`.

Config (keys defined by :func:`bissl_det.config.defaults.add_dataset_config`)::

    DATASETS:
      CUSTOM:
        - {NAME: demo_voc_trainval, FORMAT: voc, ROOT: datasets/demo/voc, SPLIT: trainval,
           CLASSES: [circle, square, triangle, cross]}
        - {NAME: my_coco_val, FORMAT: coco, JSON: data/val.json, IMAGE_ROOT: data/val}
      TRAIN: ("demo_voc_trainval",)
      CHECK_IMAGES: decode_test
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from functools import partial

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..config.defaults import CHECK_IMAGES_MODES, CUSTOM_DATASET_KEYS
from ..utils.rank_zero import on_rank_zero
from .catalog import dataset_dicts
from .class_names import check_split_classes
from .coco import check_coco_dataset, register_coco_json, validate_coco_json
from .tasks import downstream_task
from .validation import DatasetValidationError, check_dataset_dicts, check_image_files
from .voc import check_voc_dataset, register_voc_folder, validate_voc_folder

__all__ = [
    "DatasetValidationError",
    "datasets_in_use",
    "register_coco_json",
    "register_from_config",
    "register_voc_folder",
    "validate_coco_json",
    "validate_dataset",
    "validate_voc_folder",
]

logger = logging.getLogger(__name__)


def validate_dataset(name: str, images: str = "header") -> int:
    """Validate a registered data set (builtin or custom); return its number of images.

    The format's pre-check (VOC split and XML, COCO JSON) and the one pass over its dicts
    (:func:`~bissl_det.data.validation.check_dataset_dicts`), chosen by the set's
    ``evaluator_type``; then its image files.

    Args:
        name: A name in detectron2's DatasetCatalog.
        images: "none", "header" (every image's header: fast) or "decode" (every pixel).

    Raises:
        DatasetValidationError: Listing the first problems, each naming its file.
    """
    if name not in DatasetCatalog.list():
        raise DatasetValidationError(
            f"dataset {name!r} is not registered: add it to DATASETS.CUSTOM or use a builtin name"
        )
    meta = MetadataCatalog.get(name)
    load = partial(dataset_dicts, name)
    kind = meta.get("evaluator_type", None)
    if kind == "pascal_voc":
        dicts = check_voc_dataset(name, meta.dirname, meta.split, meta.thing_classes, load)
    elif kind == "coco":
        dicts = check_coco_dataset(name, meta.json_file, load)
    else:  # registered some other way: the format-free checks only
        dicts = load()
        num_classes = len(meta.get("thing_classes", [])) or 1 << 30
        check_dataset_dicts(name, dicts, num_classes, lambda r: r["file_name"])
    if images != "none":
        check_image_files(name, dicts, decode=images == "decode")
    return len(dicts)


# The config keys that name registered data sets (docs/own_data.md lists them all).
DATASET_KEYS = ("DATASETS.TRAIN", "DATASETS.TEST", "BISSL.PRETEXT_DATA.DATASETS")


def datasets_in_use(cfg, pretext: bool = True) -> dict[str, bool]:
    """Every data set name the config uses -> whether it is a test split.

    ``pretext`` False leaves out BISSL.PRETEXT_DATA.DATASETS (for tools that do not read it).
    """
    pretext_sets = cfg.BISSL.PRETEXT_DATA.DATASETS if pretext and "BISSL" in cfg else []
    used = dict.fromkeys([*cfg.DATASETS.TRAIN, *pretext_sets], False)
    return used | dict.fromkeys(cfg.DATASETS.TEST, True)


def keys_naming(cfg, name: str, origins=None) -> str:
    """Which config keys name data set ``name``, their values, and (with ``origins``, a
    :class:`~bissl_det.config.checks.ConfigOrigins`) the file that set each."""
    found = []
    for key in DATASET_KEYS:
        node = cfg
        for part in key.split("."):
            node = node.get(part, None) if node is not None else None
        if node is not None and name in node:
            where = f" (set in {origins.describe(key)})" if origins is not None else ""
            found.append(f"{key} = {list(node)}{where}")
    return "; ".join(found) or f"data set {name!r}"


def _register_entry(i: int, entry) -> str:
    where = f"DATASETS.CUSTOM[{i}]"
    if not isinstance(entry, Mapping):
        raise DatasetValidationError(f"{where} must be a dict, got {entry!r}")
    fmt = str(entry.get("FORMAT", "")).lower()
    if fmt not in CUSTOM_DATASET_KEYS:
        raise DatasetValidationError(
            f"{where}: FORMAT={entry.get('FORMAT')!r} must be one of {sorted(CUSTOM_DATASET_KEYS)}"
        )
    required, optional = CUSTOM_DATASET_KEYS[fmt]
    missing = sorted(required - set(entry))
    unknown = sorted(set(entry) - required - optional)
    if missing or unknown:
        raise DatasetValidationError(
            f"{where} (FORMAT {fmt}): missing keys {missing}, unknown keys {unknown}; "
            f"expected {sorted(required)} plus optional {sorted(optional)}"
        )
    try:  # validated below, once, with the other data sets in use
        if fmt == "voc":
            year = int(entry.get("YEAR", 2007))
            root, split, classes = entry["ROOT"], entry["SPLIT"], list(entry["CLASSES"])
            register_voc_folder(entry["NAME"], root, split, classes, year, validate=False)
        else:
            register_coco_json(entry["NAME"], entry["JSON"], entry["IMAGE_ROOT"], validate=False)
    except DatasetValidationError as e:
        raise DatasetValidationError(f"{where} (NAME {entry['NAME']!r}): {e}") from None
    return entry["NAME"]


def register_from_config(cfg, origins=None, pretext: bool = True) -> list[str]:
    """Register every entry of ``cfg.DATASETS.CUSTOM``, then validate every data set in use.

    Validation covers train and test splits alike (DATASETS.CHECK_IMAGES says which images are
    decoded in full), so bad data fails here, not after training; then the downstream task's
    own checks (classification folders' images; masks for Mask R-CNN). Return the custom names.
    Several processes: every one registers, rank 0 alone validates and tells the others (all
    must call it).
    ``pretext`` False: BISSL.PRETEXT_DATA.DATASETS is not validated (the tool does not read it).

    Raises:
        DatasetValidationError: A malformed entry (message names ``DATASETS.CUSTOM[i]`` and the
            key) or bad data (the message names the files); a data set's error starts with the
            keys that name it and, with ``origins`` (config.checks.ConfigOrigins), their files.
    """
    entries = cfg.DATASETS.get("CUSTOM", [])
    if not isinstance(entries, list | tuple):
        raise DatasetValidationError(f"DATASETS.CUSTOM must be a list of dicts, got {entries!r}")
    mode = cfg.DATASETS.get("CHECK_IMAGES", "decode_test")
    if mode not in CHECK_IMAGES_MODES:
        raise DatasetValidationError(
            f"DATASETS.CHECK_IMAGES = {mode!r} must be one of {list(CHECK_IMAGES_MODES)}"
        )
    names = [_register_entry(i, entry) for i, entry in enumerate(entries)]  # every process

    def validate() -> None:
        for name, is_test in datasets_in_use(cfg, pretext).items():
            start = time.perf_counter()
            decode = mode == "decode_all" or (mode == "decode_test" and is_test)
            try:
                count = validate_dataset(name, "decode" if decode else "header")
            except DatasetValidationError as e:
                raise DatasetValidationError(f"{keys_naming(cfg, name, origins)}: {e}") from None
            logger.info(
                "dataset %s: %d images validated (%s) in %.1f s",
                name,
                count,
                "decoded" if decode else "headers",
                time.perf_counter() - start,
            )
        check_split_classes(cfg.DATASETS.TRAIN, cfg.DATASETS.TEST)
        task = downstream_task(cfg, required=False) if "BISSL" in cfg else None
        if task is not None and task.check_data is not None:
            task.check_data(cfg, mode)

    # The same files and the same answer on every rank: rank 0 reads them, the others wait.
    on_rank_zero(validate, "validating the data sets")
    return names
