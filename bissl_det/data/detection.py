"""Register user detection data sets (Pascal VOC folders, COCO JSON) with Detectron2, validated.

Detectron2 registers its builtin VOC and COCO splits itself; this module adds user data sets under
new names, with the same metadata (``evaluator_type`` "pascal_voc" / "coco", ``dirname``,
``split``, ``year``, ``json_file``, ``image_root``) so its evaluators work unchanged.

Every data set is checked eagerly when it is registered, before any long work starts: a missing
folder, split file, annotation or image file, XML that does not parse, a class not in the class
list, a box outside the image or with no area, an empty annotation file or split, or a COCO JSON
missing required keys each raise :class:`DatasetValidationError` naming the file, key and value.
Bad boxes are an error, never silently clipped.

Boxes in VOC XML are 1-based inclusive pixel indices, as in the VOC devkit: a valid box has
``1 <= xmin <= xmax <= width`` (and the same for y). Detectron2 reads it as the continuous box
``[xmin - 1, xmax]``, so ``xmax < xmin`` is exactly the zero/negative-area case.

Config: :func:`add_dataset_config` adds ``DATASETS.CUSTOM``, a list of dicts, and
:func:`register_from_config` registers them::

    DATASETS:
      CUSTOM:
        - {NAME: demo_voc_trainval, FORMAT: voc, ROOT: datasets/demo/voc, SPLIT: trainval,
           CLASSES: [circle, square, triangle, cross]}
        - {NAME: my_coco_val, FORMAT: coco, JSON: data/val.json, IMAGE_ROOT: data/val}
      TRAIN: ("demo_voc_trainval",)
"""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

__all__ = [
    "DatasetValidationError",
    "VocObject",
    "VocRecord",
    "add_dataset_config",
    "load_voc_folder",
    "parse_voc_annotation",
    "read_voc_split",
    "register_coco_json",
    "register_from_config",
    "register_voc_folder",
    "resolve_path",
    "validate_coco_json",
    "validate_voc_folder",
]

# Env var naming a data root, as Detectron2's builtin data sets use it (default "datasets").
DATASETS_ENV = "DETECTRON2_DATASETS"
# The VOC detection evaluator chooses its AP definition from the year (2007: 11-point).
VOC_YEARS = (2007, 2012)
# COCO stores float boxes; rounding puts some a hair outside the image. Beyond this it is an error.
COCO_BOX_TOLERANCE = 1.0

# name -> the (format, resolved arguments) it was registered with, for idempotent re-registration.
_REGISTERED: dict[str, tuple] = {}


class DatasetValidationError(ValueError):
    """A user data set on disk or in the config is malformed; the message names where."""


@dataclass(frozen=True)
class VocObject:
    """One object of a VOC annotation. ``box`` is 1-based inclusive, as written in the XML."""

    name: str
    category_id: int
    box: tuple[float, float, float, float]
    difficult: bool


@dataclass(frozen=True)
class VocRecord:
    """One parsed VOC annotation file."""

    image_id: str
    file_name: str
    width: int
    height: int
    objects: tuple[VocObject, ...]


def resolve_path(path: str | os.PathLike, what: str) -> str:
    """Absolute path of a user-given file or folder.

    A relative path is taken relative to the current directory; if nothing is there and
    ``$DETECTRON2_DATASETS`` is set, relative to that root instead.

    Raises:
        DatasetValidationError: Nothing exists at any candidate; the message lists them.
    """
    path = os.fspath(path)
    candidates = [os.path.abspath(path)]
    env_root = os.environ.get(DATASETS_ENV)
    if not os.path.isabs(path) and env_root:
        candidates.append(os.path.abspath(os.path.join(env_root, path)))
    for candidate in candidates:
        if os.path.exists(candidate):
            return candidate
    tried = " or ".join(repr(c) for c in candidates)
    raise DatasetValidationError(f"{what} {path!r} does not exist (looked for {tried})")


def read_voc_split(root: str, split: str) -> list[str]:
    """Image ids listed in ``<root>/ImageSets/Main/<split>.txt``, one per line.

    Raises:
        DatasetValidationError: The file is missing, lists no image, or has a malformed line.
    """
    split_file = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
    if not os.path.isfile(split_file):
        raise DatasetValidationError(f"VOC split file {split_file!r} (split {split!r}) is missing")
    ids = []
    with open(split_file) as f:
        for line_no, line in enumerate(f, start=1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) != 1:
                raise DatasetValidationError(
                    f"{split_file}:{line_no}: expected one image id per line, got {line.strip()!r}"
                )
            ids.append(tokens[0])
    if not ids:
        raise DatasetValidationError(f"VOC split file {split_file!r} lists no images")
    return ids


def _xml_text(node: ET.Element, path: str, anno_file: str) -> str:
    found = node.find(path)
    if found is None or found.text is None or not found.text.strip():
        raise DatasetValidationError(f"{anno_file}: missing or empty <{path}>")
    return found.text.strip()


def _xml_number(node: ET.Element, path: str, anno_file: str, kind: type = float) -> Any:
    text = _xml_text(node, path, anno_file)
    try:
        value = float(text)
    except ValueError:
        raise DatasetValidationError(f"{anno_file}: <{path}> is not a number: {text!r}") from None
    if kind is int:
        if not value.is_integer():
            raise DatasetValidationError(f"{anno_file}: <{path}> is not an integer: {text!r}")
        return int(value)
    return value


def parse_voc_annotation(
    root: str, image_id: str, class_names: Sequence[str], check_image: bool = True
) -> VocRecord:
    """Parse and validate ``<root>/Annotations/<image_id>.xml``.

    Args:
        root: VOC folder holding ``Annotations`` and ``JPEGImages``.
        image_id: File stem of the annotation and the JPEG.
        class_names: Allowed object classes; ``category_id`` is the index in this list.
        check_image: Also require ``<root>/JPEGImages/<image_id>.jpg`` to exist.

    Raises:
        DatasetValidationError: Missing/empty/unparsable file, missing tag, unknown class, or a
            box outside the image or with no area. The message names the file (and the box).
    """
    anno_file = os.path.join(root, "Annotations", f"{image_id}.xml")
    jpeg_file = os.path.join(root, "JPEGImages", f"{image_id}.jpg")
    if not os.path.isfile(anno_file):
        raise DatasetValidationError(f"VOC annotation file {anno_file!r} is missing")
    if os.path.getsize(anno_file) == 0:
        raise DatasetValidationError(f"VOC annotation file {anno_file!r} is empty")
    if check_image and not os.path.isfile(jpeg_file):
        raise DatasetValidationError(f"VOC image {jpeg_file!r} (listed in the split) is missing")
    try:
        tree = ET.parse(anno_file)
    except ET.ParseError as e:
        raise DatasetValidationError(
            f"VOC annotation file {anno_file!r} is not valid XML: {e}"
        ) from None
    width = _xml_number(tree, "size/width", anno_file, int)
    height = _xml_number(tree, "size/height", anno_file, int)
    if width <= 0 or height <= 0:
        raise DatasetValidationError(f"{anno_file}: image size {width}x{height} is not positive")
    objects = []
    for k, obj in enumerate(tree.findall("object")):
        name = _xml_text(obj, "name", anno_file)
        if name not in class_names:
            raise DatasetValidationError(
                f"{anno_file}: object {k} has class {name!r}, which is not in the class list "
                f"{list(class_names)}"
            )
        # The VOC evaluator reads these tags; a missing one would crash it at the end of training.
        for tag in ("pose", "truncated", "difficult"):
            _xml_text(obj, tag, anno_file)
        difficult = _xml_number(obj, "difficult", anno_file, int)
        if difficult not in (0, 1):
            raise DatasetValidationError(f"{anno_file}: object {k} has difficult={difficult}")
        box = tuple(
            _xml_number(obj, f"bndbox/{c}", anno_file) for c in ("xmin", "ymin", "xmax", "ymax")
        )
        x0, y0, x1, y1 = box
        if not all(math.isfinite(v) for v in box) or x1 < x0 or y1 < y0:
            raise DatasetValidationError(
                f"{anno_file}: object {k} ({name}) box (xmin, ymin, xmax, ymax)={box} has zero or "
                "negative area (VOC boxes are 1-based inclusive: need xmin <= xmax, ymin <= ymax)"
            )
        if x0 < 1 or y0 < 1 or x1 > width or y1 > height:
            raise DatasetValidationError(
                f"{anno_file}: object {k} ({name}) box (xmin, ymin, xmax, ymax)={box} lies outside "
                f"the {width}x{height} image (VOC boxes are 1-based: need 1 <= x <= {width}, "
                f"1 <= y <= {height}); fix the annotation, boxes are not clipped"
            )
        objects.append(VocObject(name, list(class_names).index(name), box, bool(difficult)))
    return VocRecord(image_id, jpeg_file, width, height, tuple(objects))


def _check_voc_args(root: str, split: str, class_names: Sequence[str]) -> str:
    root = resolve_path(root, "VOC folder")
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        if not os.path.isdir(os.path.join(root, sub)):
            raise DatasetValidationError(
                f"VOC folder {root!r} has no {sub}/ folder (expected Annotations/, JPEGImages/, "
                "ImageSets/Main/)"
            )
    if isinstance(class_names, str) or not class_names:
        raise DatasetValidationError(f"class list {class_names!r} must be a non-empty list")
    if len(set(class_names)) != len(class_names):
        raise DatasetValidationError(f"class list {list(class_names)} has duplicates")
    return root


def validate_voc_folder(root: str | os.PathLike, split: str, class_names: Sequence[str]) -> int:
    """Check a VOC folder eagerly (XML only, images are not decoded); return its number of images.

    Raises:
        DatasetValidationError: See :func:`parse_voc_annotation` and :func:`read_voc_split`.
    """
    root = _check_voc_args(os.fspath(root), split, class_names)
    ids = read_voc_split(root, split)
    for image_id in ids:
        parse_voc_annotation(root, image_id, class_names)
    return len(ids)


def load_voc_folder(root: str, split: str, class_names: Sequence[str]) -> list[dict]:
    """Detectron2 dataset dicts of a VOC folder: the same dicts as detectron2's
    ``load_voc_instances`` (difficult objects kept for training, as it does), after validation."""
    dicts = []
    for image_id in read_voc_split(root, split):
        rec = parse_voc_annotation(root, image_id, class_names)
        annotations = [
            {
                "category_id": obj.category_id,
                # 1-based inclusive pixels -> continuous coordinates.
                "bbox": [obj.box[0] - 1.0, obj.box[1] - 1.0, obj.box[2], obj.box[3]],
                "bbox_mode": BoxMode.XYXY_ABS,
            }
            for obj in rec.objects
        ]
        dicts.append(
            {
                "file_name": rec.file_name,
                "image_id": rec.image_id,
                "height": rec.height,
                "width": rec.width,
                "annotations": annotations,
            }
        )
    return dicts


def _already_registered(name: str, spec: tuple) -> bool:
    """True if ``name`` is registered with ``spec``; raises if the name is taken otherwise."""
    if not isinstance(name, str) or not name:
        raise DatasetValidationError(f"dataset name {name!r} must be a non-empty string")
    if name in _REGISTERED:
        if _REGISTERED[name] == spec:
            return True
        raise DatasetValidationError(
            f"dataset {name!r} is already registered with different arguments:\n"
            f"  before: {_REGISTERED[name]}\n  now:    {spec}"
        )
    if name in DatasetCatalog.list():
        raise DatasetValidationError(
            f"dataset name {name!r} is already taken in detectron2's DatasetCatalog (a builtin "
            "or another registration); choose another NAME"
        )
    return False


def _register(name: str, spec: tuple, loader: Callable[[], list[dict]], metadata: dict) -> None:
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)
    _REGISTERED[name] = spec


def register_voc_folder(
    name: str,
    root: str | os.PathLike,
    split: str,
    class_names: Sequence[str],
    year: int = 2007,
    validate: bool = True,
) -> bool:
    """Register a Pascal VOC-format folder as detectron2 data set ``name``.

    Args:
        name: New data set name (e.g. used in ``DATASETS.TRAIN``).
        root: Folder with ``Annotations``, ``JPEGImages``, ``ImageSets/Main``.
        split: Split file stem, e.g. "trainval" or "test".
        class_names: Object classes, in category-id order.
        year: 2007 (evaluation uses VOC07 11-point AP) or 2012 (area under the PR curve).
        validate: Parse every annotation now (fast) instead of failing later.

    Returns:
        True if registered now, False if already registered with the same arguments.

    Raises:
        DatasetValidationError: Bad data (see module doc), bad ``year``, or ``name`` taken.
    """
    if year not in VOC_YEARS:
        raise DatasetValidationError(
            f"dataset {name!r}: YEAR={year!r} must be one of {VOC_YEARS} (it selects the AP metric)"
        )
    root = _check_voc_args(os.fspath(root), split, class_names)
    classes = tuple(class_names)
    spec = ("voc", root, split, classes, year)
    if _already_registered(name, spec):
        return False
    if validate:
        validate_voc_folder(root, split, classes)
    _register(
        name,
        spec,
        lambda: load_voc_folder(root, split, classes),
        {
            "thing_classes": list(classes),
            "dirname": root,
            "year": year,
            "split": split,
            "evaluator_type": "pascal_voc",
        },
    )
    return True


def validate_coco_json(json_file: str | os.PathLike, image_root: str | os.PathLike) -> int:
    """Check a COCO detection JSON and its images eagerly; return its number of images.

    Requires top-level ``images``, ``annotations``, ``categories``; each image ``id``,
    ``file_name``, ``height``, ``width``; each annotation ``image_id``, ``category_id``, ``bbox``
    (XYWH, positive size, inside the image up to ``COCO_BOX_TOLERANCE`` px) referring to a known
    image and category; each category ``id``, ``name``.

    Raises:
        DatasetValidationError: The message names the file, the entry and the key or value.
    """
    json_file = resolve_path(json_file, "COCO JSON file")
    image_root = resolve_path(image_root, "COCO image folder")
    if os.path.getsize(json_file) == 0:
        raise DatasetValidationError(f"COCO JSON file {json_file!r} is empty")
    try:
        with open(json_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetValidationError(f"COCO JSON file {json_file!r} does not parse: {e}") from None
    if not isinstance(data, dict):
        raise DatasetValidationError(f"{json_file}: top level must be an object")
    required = {
        "images": ("id", "file_name", "height", "width"),
        "annotations": ("image_id", "category_id", "bbox"),
        "categories": ("id", "name"),
    }
    for key, fields in required.items():
        if not isinstance(data.get(key), list):
            raise DatasetValidationError(f"{json_file}: missing top-level key {key!r} (a list)")
        for i, entry in enumerate(data[key]):
            missing = [k for k in fields if not isinstance(entry, dict) or k not in entry]
            if missing:
                raise DatasetValidationError(f"{json_file}: {key}[{i}] is missing key(s) {missing}")
    if not data["images"]:
        raise DatasetValidationError(f"{json_file}: 'images' is empty")
    if not data["categories"]:
        raise DatasetValidationError(f"{json_file}: 'categories' is empty")
    images = {img["id"]: img for img in data["images"]}
    category_ids = {cat["id"] for cat in data["categories"]}
    for img in data["images"]:
        path = os.path.join(image_root, img["file_name"])
        if not os.path.isfile(path):
            raise DatasetValidationError(f"{json_file}: image {img['id']} file {path!r} is missing")
    tol = COCO_BOX_TOLERANCE
    for i, ann in enumerate(data["annotations"]):
        where = f"{json_file}: annotations[{i}] (id {ann.get('id')})"
        if ann["image_id"] not in images:
            raise DatasetValidationError(f"{where}: unknown image_id {ann['image_id']!r}")
        if ann["category_id"] not in category_ids:
            raise DatasetValidationError(
                f"{where}: category_id {ann['category_id']!r} is not in 'categories' "
                f"{sorted(category_ids)}"
            )
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise DatasetValidationError(f"{where}: bbox {bbox!r} must be [x, y, w, h]")
        x, y, w, h = (float(v) for v in bbox)
        if not (w > 0 and h > 0):
            raise DatasetValidationError(f"{where}: bbox [x, y, w, h]={bbox} has no area")
        img = images[ann["image_id"]]
        if x < -tol or y < -tol or x + w > img["width"] + tol or y + h > img["height"] + tol:
            raise DatasetValidationError(
                f"{where}: bbox [x, y, w, h]={bbox} lies outside image {img['file_name']!r} "
                f"({img['width']}x{img['height']}); fix the annotation, boxes are not clipped"
            )
    return len(data["images"])


def register_coco_json(
    name: str,
    json_file: str | os.PathLike,
    image_root: str | os.PathLike,
    validate: bool = True,
) -> bool:
    """Register a COCO-format detection JSON as detectron2 data set ``name``.

    Loading is detectron2's ``load_coco_json`` (it sets ``thing_classes`` and the category-id
    mapping when the data set is first loaded); the metadata matches its builtin COCO sets.

    Returns:
        True if registered now, False if already registered with the same arguments.

    Raises:
        DatasetValidationError: See :func:`validate_coco_json`, or ``name`` taken.
    """
    from detectron2.data.datasets.coco import load_coco_json

    json_file = resolve_path(json_file, "COCO JSON file")
    image_root = resolve_path(image_root, "COCO image folder")
    spec = ("coco", json_file, image_root)
    if _already_registered(name, spec):
        return False
    if validate:
        validate_coco_json(json_file, image_root)
    _register(
        name,
        spec,
        lambda: load_coco_json(json_file, image_root, name),
        {"json_file": json_file, "image_root": image_root, "evaluator_type": "coco"},
    )
    return True


def add_dataset_config(cfg) -> None:
    """Add ``DATASETS.CUSTOM`` (user data sets registered by :func:`register_from_config`)."""
    # List of dicts, one per user data set, registered under NAME before training/evaluation:
    #   {NAME, FORMAT: "voc", ROOT, SPLIT, CLASSES: [...], YEAR (optional, 2007)}
    #   {NAME, FORMAT: "coco", JSON, IMAGE_ROOT}
    # Relative paths: current directory first, then $DETECTRON2_DATASETS.
    cfg.DATASETS.CUSTOM = []


_CONFIG_KEYS = {
    "voc": ({"NAME", "FORMAT", "ROOT", "SPLIT", "CLASSES"}, {"YEAR"}),
    "coco": ({"NAME", "FORMAT", "JSON", "IMAGE_ROOT"}, set()),
}


def register_from_config(cfg) -> list[str]:
    """Register every entry of ``cfg.DATASETS.CUSTOM``; return their names.

    Raises:
        DatasetValidationError: A malformed entry (message names ``DATASETS.CUSTOM[i]`` and the
            key) or bad data on disk.
    """
    entries = cfg.DATASETS.get("CUSTOM", [])
    if not isinstance(entries, list | tuple):
        raise DatasetValidationError(f"DATASETS.CUSTOM must be a list of dicts, got {entries!r}")
    names = []
    for i, entry in enumerate(entries):
        where = f"DATASETS.CUSTOM[{i}]"
        if not isinstance(entry, Mapping):
            raise DatasetValidationError(f"{where} must be a dict, got {entry!r}")
        fmt = str(entry.get("FORMAT", "")).lower()
        if fmt not in _CONFIG_KEYS:
            raise DatasetValidationError(
                f"{where}: FORMAT={entry.get('FORMAT')!r} must be one of {sorted(_CONFIG_KEYS)}"
            )
        required, optional = _CONFIG_KEYS[fmt]
        missing = sorted(required - set(entry))
        unknown = sorted(set(entry) - required - optional)
        if missing or unknown:
            raise DatasetValidationError(
                f"{where} (FORMAT {fmt}): missing keys {missing}, unknown keys {unknown}; "
                f"expected {sorted(required)} plus optional {sorted(optional)}"
            )
        try:
            if fmt == "voc":
                register_voc_folder(
                    entry["NAME"],
                    entry["ROOT"],
                    entry["SPLIT"],
                    list(entry["CLASSES"]),
                    year=int(entry.get("YEAR", 2007)),
                )
            else:
                register_coco_json(entry["NAME"], entry["JSON"], entry["IMAGE_ROOT"])
        except DatasetValidationError as e:
            raise DatasetValidationError(f"{where} (NAME {entry['NAME']!r}): {e}") from None
        names.append(entry["NAME"])
    return names
