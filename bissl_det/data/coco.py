"""COCO-format JSON: loaded by detectron2's ``load_coco_json``, validated before use.

The pre-check (:func:`check_coco_json`) runs on the raw JSON because the COCO API and
detectron2's loader lose what it checks without an error: a repeated image id merges one image's
boxes into another's, a repeated file name trains on one file twice, a polygon with fewer than 3
points (or an odd number of coordinates) is dropped, and so is the object when none of its
polygons is left. Instance masks are checked here too, where their annotation ids are: an RLE
whose size is not its image's, a mask with no pixel. Boxes, categories and files are checked
on the loaded dicts by :func:`~bissl_det.data.validation.check_dataset_dicts`.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Hashable
from functools import partial

from detectron2.data import MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json, register_coco_instances

from .catalog import dataset_dicts, register_dataset
from .validation import DatasetValidationError, check_dataset_dicts, raise_problems, resolve_path

__all__ = [
    "COCO_BOX_TOLERANCE",
    "check_coco_dataset",
    "check_coco_json",
    "register_coco_json",
    "validate_coco_json",
]

# COCO stores float boxes; rounding puts some a hair outside the image. Beyond this it is an error.
COCO_BOX_TOLERANCE = 1.0
_REQUIRED = {
    "images": ("id", "file_name", "height", "width"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


def _repeated(json_file: str, entries: list[dict], key: str, what: str) -> list[str]:
    counts = Counter(entry[key] for entry in entries)
    return [
        f"{json_file}: {what} {key} {value!r} is used {n} times (each must be unique)"
        for value, n in counts.items()
        if n > 1
    ]


def _mask_problem(segm, height: int, width: int) -> str | None:
    """Polygons: >= 3 points each, even length; RLE: the image's size. Either: not empty."""
    import pycocotools.mask as mask_util

    if isinstance(segm, dict):
        if list(segm.get("size", [])) != [height, width]:
            return f"RLE mask size {segm.get('size')} is not the image's [{height}, {width}]"
        uncompressed = isinstance(segm.get("counts"), list)
        rles = [mask_util.frPyObjects(segm, height, width) if uncompressed else segm]
    elif isinstance(segm, list) and segm and all(isinstance(p, list) for p in segm):
        for k, poly in enumerate(segm):
            if len(poly) < 6 or len(poly) % 2:
                return (
                    f"polygon {k} has {len(poly)} coordinates (need an even number, at least 6: "
                    "3 points)"
                )
            if not all(isinstance(v, int | float) and math.isfinite(v) for v in poly):
                return f"polygon {k} has non-finite or non-numeric coordinates"
        rles = mask_util.frPyObjects(segm, height, width)
    else:
        return f"segmentation must be a list of polygons or an RLE dict, got {type(segm).__name__}"
    if int(mask_util.area(mask_util.merge(rles))) == 0:
        return "mask is empty (no pixel inside the image)"
    return None


def check_coco_json(json_file: str) -> dict:
    """Pre-check a COCO JSON (see the module docstring); return the parsed content.

    Raises:
        DatasetValidationError: Listing the first problems; each names the file, the entry (index
            and id) and the key or value.
    """
    if os.path.getsize(json_file) == 0:
        raise DatasetValidationError(f"COCO JSON file {json_file!r} is empty")
    try:
        with open(json_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetValidationError(f"COCO JSON file {json_file!r} does not parse: {e}") from None
    if not isinstance(data, dict):
        raise DatasetValidationError(f"{json_file}: top level must be an object")
    for key, fields in _REQUIRED.items():
        if not isinstance(data.get(key), list):
            raise DatasetValidationError(f"{json_file}: missing top-level key {key!r} (a list)")
        for i, entry in enumerate(data[key]):
            missing = [k for k in fields if not isinstance(entry, dict) or k not in entry]
            if missing:
                raise DatasetValidationError(f"{json_file}: {key}[{i}] is missing key(s) {missing}")
        if key != "annotations" and not data[key]:
            raise DatasetValidationError(f"{json_file}: {key!r} is empty")
    problems = _repeated(json_file, data["images"], "id", "image")
    problems += _repeated(json_file, data["images"], "file_name", "image")
    problems += _repeated(json_file, data["annotations"], "id", "annotation")
    problems += _repeated(json_file, data["categories"], "id", "category")
    images = {img["id"]: img for img in data["images"]}
    category_ids = {cat["id"] for cat in data["categories"]}
    for i, ann in enumerate(data["annotations"]):
        where = f"{json_file}: annotations[{i}] (id {ann['id']})"
        if ann["image_id"] not in images:
            problems.append(f"{where}: unknown image_id {ann['image_id']!r}")
        category = ann["category_id"]
        if not isinstance(category, Hashable) or category not in category_ids:
            problems.append(
                f"{where}: category_id {category!r} is not in 'categories' {sorted(category_ids)}"
            )
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4):
            problems.append(f"{where}: bbox {bbox!r} must be [x, y, w, h]")
        elif not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in bbox
        ):
            problems.append(f"{where}: bbox {bbox!r} must hold 4 finite numbers (not text)")
        image = images.get(ann["image_id"])
        if ann.get("segmentation") and image is not None:
            problem = _mask_problem(ann["segmentation"], image["height"], image["width"])
            if problem:
                problems.append(f"{where}: {problem}")
    raise_problems(f"COCO JSON file {json_file!r}", problems)
    return data


def check_coco_dataset(name: str, json_file: str, load: Callable[[], list[dict]]) -> list[dict]:
    """JSON pre-check, then ``load()`` (detectron2's loader) and the validation pass.

    The class count is ``name``'s ``thing_classes``, which ``load()`` sets.

    Returns:
        The loaded dicts.

    Raises:
        DatasetValidationError: Naming the file, image or annotation id and the value.
    """
    check_coco_json(json_file)
    dicts = load()

    def describe(record: dict) -> str:
        file = os.path.basename(record["file_name"])
        return f"{json_file} (image id {record['image_id']!r}, {file!r})"

    num_classes = len(MetadataCatalog.get(name).thing_classes)
    check_dataset_dicts(name, dicts, num_classes, describe, box_tolerance=COCO_BOX_TOLERANCE)
    return dicts


def validate_coco_json(json_file: str | os.PathLike, image_root: str | os.PathLike) -> int:
    """Check a COCO JSON without registering it (images are not decoded); return its size.

    Raises:
        DatasetValidationError: See :func:`check_coco_dataset`.
    """
    json_file = resolve_path(json_file, "COCO JSON file")
    image_root = resolve_path(image_root, "COCO image folder")
    name = f"__validate__:{json_file}"  # load_coco_json maps category ids through metadata
    load = partial(load_coco_json, json_file, image_root, name)
    try:
        return len(check_coco_dataset(name, json_file, load))
    finally:
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)


def register_coco_json(
    name: str,
    json_file: str | os.PathLike,
    image_root: str | os.PathLike,
    validate: bool = True,
) -> bool:
    """Register a COCO-format JSON (boxes, optional polygon/RLE masks) as data set ``name``.

    Registration is detectron2's ``register_coco_instances`` (metadata ``json_file``,
    ``image_root``, ``evaluator_type`` "coco"; ``thing_classes`` once loaded), so its COCO
    evaluator works unchanged.

    Returns:
        True if registered now, False if already registered with the same arguments.

    Raises:
        DatasetValidationError: See :func:`check_coco_dataset`, or ``name`` taken.
    """
    json_file = resolve_path(json_file, "COCO JSON file")
    image_root = resolve_path(image_root, "COCO image folder")

    check = partial(check_coco_dataset, name, json_file, partial(dataset_dicts, name))
    return register_dataset(
        name,
        ("coco", json_file, image_root),
        partial(register_coco_instances, name, {}, json_file, image_root),
        check if validate else None,
    )
