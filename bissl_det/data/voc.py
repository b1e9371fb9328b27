"""Pascal VOC folders: loaded by detectron2's ``load_voc_instances``, validated before use.

Boxes in VOC XML are 1-based inclusive pixel indices, as in the VOC devkit: a valid box has
``1 <= xmin <= xmax <= width`` (and the same for y). detectron2's loader turns them into the
continuous box ``[xmin - 1, ymin - 1, xmax, ymax]``; the geometry checks run on those dicts
(:func:`~bissl_det.data.validation.check_dataset_dicts`).

The XML pre-check (:func:`check_voc_annotations`) covers only what detectron2's loader would
crash on without naming the file (XML that does not parse, a missing tag or non-number, a class
not in the class list) and the tags its VOC evaluator reads at the end of training (``pose``,
``truncated``, ``difficult``). A split that lists an image twice is an error, not deduplicated:
VOC evaluation would count its objects twice (a perfect detector then scores below 100 AP), and
a repeated id usually means split files were merged wrongly, which the user should see.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from detectron2.data import MetadataCatalog
from detectron2.data.datasets.pascal_voc import load_voc_instances, register_pascal_voc

from .catalog import dataset_dicts, register_dataset
from .validation import DatasetValidationError, check_dataset_dicts, raise_problems, resolve_path

__all__ = [
    "VOC_YEARS",
    "VocObject",
    "check_voc_annotations",
    "check_voc_dataset",
    "check_voc_objects",
    "check_voc_root",
    "read_voc_split",
    "register_voc_folder",
    "validate_voc_folder",
]

# The VOC detection evaluator chooses its AP definition from the year (2007: 11-point).
VOC_YEARS = (2007, 2012)
_NUMBER_TAGS = ("bndbox/xmin", "bndbox/ymin", "bndbox/xmax", "bndbox/ymax")


@dataclass(frozen=True)
class VocObject:
    """What the XML says about one object beyond detectron2's dicts."""

    name: str
    difficult: bool


def read_voc_split(root: str, split: str) -> list[str]:
    """Image ids listed in ``<root>/ImageSets/Main/<split>.txt``, one per line.

    Raises:
        DatasetValidationError: The file is missing, lists fewer than 2 images (detectron2's
            loader cannot read one), has a malformed line, or lists an image more than once (the
            message gives the ids and their lines).
    """
    split_file = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
    if not os.path.isfile(split_file):
        raise DatasetValidationError(f"VOC split file {split_file!r} (split {split!r}) is missing")
    ids, lines = [], {}
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
            lines.setdefault(tokens[0], []).append(line_no)
    if not ids:
        raise DatasetValidationError(f"VOC split file {split_file!r} lists no images")
    if len(ids) == 1:  # numpy.loadtxt gives a 0-d array, which the loader cannot iterate
        raise DatasetValidationError(
            f"VOC split file {split_file!r} lists a single image: detectron2's "
            "load_voc_instances cannot read one-line split files; list at least 2 images"
        )
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    if repeated:
        listed = ", ".join(f"{i!r} (lines {lines[i]})" for i in repeated[:5])
        raise DatasetValidationError(
            f"VOC split file {split_file!r} lists {len(repeated)} image(s) more than once: "
            f"{listed}. Each would be trained and evaluated twice (lowering AP); remove the "
            "repeated lines"
        )
    return ids


def _text(node: ET.Element, tag: str, anno_file: str) -> str:
    found = node.find(tag)
    if found is None or found.text is None or not found.text.strip():
        raise DatasetValidationError(f"{anno_file}: missing or empty <{tag}>")
    return found.text.strip()


def _integer(node: ET.Element, tag: str, anno_file: str) -> int:
    text = _text(node, tag, anno_file)
    try:
        return int(text)
    except ValueError:
        raise DatasetValidationError(f"{anno_file}: <{tag}> is not an integer: {text!r}") from None


def _check_xml(anno_file: str, class_names: Sequence[str]) -> tuple[VocObject, ...]:
    if not os.path.isfile(anno_file):
        raise DatasetValidationError(f"VOC annotation file {anno_file!r} is missing")
    if os.path.getsize(anno_file) == 0:
        raise DatasetValidationError(f"VOC annotation file {anno_file!r} is empty")
    try:
        tree = ET.parse(anno_file)
    except ET.ParseError as e:
        raise DatasetValidationError(
            f"VOC annotation file {anno_file!r} is not valid XML: {e}"
        ) from None
    for tag in ("size/width", "size/height"):
        _integer(tree, tag, anno_file)
    objects = []
    for k, obj in enumerate(tree.findall("object")):
        name = _text(obj, "name", anno_file)
        if obj.find("name").text != name:  # detectron2's loader reads the text unstripped
            raise DatasetValidationError(
                f"{anno_file}: object {k} has class name {obj.find('name').text!r} with "
                f"surrounding whitespace; write <name>{name}</name>"
            )
        if name not in class_names:
            raise DatasetValidationError(
                f"{anno_file}: object {k} has class {name!r}, which is not in the class list "
                f"{list(class_names)}"
            )
        for tag in _NUMBER_TAGS:
            text = _text(obj, tag, anno_file)
            try:
                float(text)
            except ValueError:
                raise DatasetValidationError(
                    f"{anno_file}: object {k} <{tag}> is not a number: {text!r}"
                ) from None
        _text(obj, "pose", anno_file)
        _integer(obj, "truncated", anno_file)
        difficult = _integer(obj, "difficult", anno_file)
        if difficult not in (0, 1):
            raise DatasetValidationError(f"{anno_file}: object {k} has difficult={difficult}")
        objects.append(VocObject(name, bool(difficult)))
    return tuple(objects)


def check_voc_annotations(
    root: str, ids: Sequence[str], class_names: Sequence[str]
) -> dict[str, tuple[VocObject, ...]]:
    """XML pre-check of ``<root>/Annotations/<id>.xml`` for every id (see the module docstring).

    Returns:
        image id -> its objects' class names and difficult flags.

    Raises:
        DatasetValidationError: Listing the first bad files.
    """
    objects, problems = {}, []
    for image_id in ids:
        try:
            objects[image_id] = _check_xml(
                os.path.join(root, "Annotations", f"{image_id}.xml"), class_names
            )
        except DatasetValidationError as e:
            problems.append(str(e))
    raise_problems(f"VOC folder {root!r}", problems)
    return objects


def check_voc_root(root: str | os.PathLike, class_names: Sequence[str]) -> str:
    """The resolved VOC folder, after checking its sub-folders and the class list."""
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
    padded = [c for c in class_names if not isinstance(c, str) or c != c.strip() or not c]
    if padded:
        raise DatasetValidationError(
            f"class list {list(class_names)}: {padded} are empty, not text, or have surrounding "
            "whitespace (the XML names would never match them)"
        )
    return root


def check_voc_objects(
    name: str,
    root: str,
    split: str,
    class_names: Sequence[str],
    load: Callable[[], list[dict]],
) -> tuple[list[dict], dict[str, tuple[VocObject, ...]]]:
    """Split and XML pre-checks, then ``load()`` (detectron2's loader) and the validation pass.

    Returns:
        The loaded dicts, and the pre-check's objects of every image id (what
        :func:`check_voc_annotations` returns).

    Raises:
        DatasetValidationError: Naming the split file, annotation file, box or value.
    """
    objects = check_voc_annotations(root, read_voc_split(root, split), class_names)
    dicts = load()

    def describe(record: dict) -> str:
        return os.path.join(root, "Annotations", f"{record['image_id']}.xml")

    check_dataset_dicts(name, dicts, len(class_names), describe, voc=True)
    return dicts, objects


def check_voc_dataset(
    name: str,
    root: str,
    split: str,
    class_names: Sequence[str],
    load: Callable[[], list[dict]],
) -> list[dict]:
    """:func:`check_voc_objects`, returning the loaded dicts only."""
    return check_voc_objects(name, root, split, class_names, load)[0]


def validate_voc_folder(root: str | os.PathLike, split: str, class_names: Sequence[str]) -> int:
    """Check a VOC folder without registering it (images are not decoded); return its size.

    Raises:
        DatasetValidationError: See :func:`check_voc_dataset`.
    """
    root = check_voc_root(root, class_names)
    classes = list(class_names)
    load = partial(load_voc_instances, root, split, classes)
    return len(check_voc_dataset(f"{root}:{split}", root, split, classes, load))


def register_voc_folder(
    name: str,
    root: str | os.PathLike,
    split: str,
    class_names: Sequence[str],
    year: int = 2007,
    validate: bool = True,
) -> bool:
    """Register a Pascal VOC-format folder as detectron2 data set ``name``.

    Registration is detectron2's ``register_pascal_voc`` plus ``evaluator_type`` "pascal_voc",
    the metadata of its builtin VOC sets, so its VOC evaluator works unchanged.

    Args:
        name: New data set name (e.g. used in ``DATASETS.TRAIN``).
        root: Folder with ``Annotations``, ``JPEGImages``, ``ImageSets/Main``.
        split: Split file stem, e.g. "trainval" or "test".
        class_names: Object classes, in category-id order.
        year: 2007 (evaluation uses VOC07 11-point AP) or 2012 (area under the PR curve).
        validate: Check the annotations now (fast; images are checked at start-up).

    Returns:
        True if registered now, False if already registered with the same arguments.

    Raises:
        DatasetValidationError: Bad data (see module doc), bad ``year``, or ``name`` taken.
    """
    if year not in VOC_YEARS:
        raise DatasetValidationError(
            f"dataset {name!r}: YEAR={year!r} must be one of {VOC_YEARS} (it selects the AP metric)"
        )
    root = check_voc_root(root, class_names)
    classes = tuple(class_names)

    def register() -> None:
        register_pascal_voc(name, root, split, year, classes)
        MetadataCatalog.get(name).evaluator_type = "pascal_voc"

    check = partial(check_voc_dataset, name, root, split, classes, partial(dataset_dicts, name))
    return register_dataset(
        name, ("voc", root, split, classes, year), register, check if validate else None
    )
