"""One validation pass over detectron2 dataset dicts, whatever format they were loaded from.

Run on every data set a tool uses, at start-up, before any long work (see
:func:`bissl_det.data.detection.register_from_config`). Problems are collected, not raised one by
one, and reported together: the first :data:`MAX_LISTED`, each naming its file.

Checks on the dicts (:func:`check_dataset_dicts`): the set is not empty; no image id or file
listed twice; positive integer image sizes; every box finite, with positive area, inside the
image (never clipped) and, for VOC, on integer pixel indices (detectron2's VOC evaluator reads
them with ``int()``); a category id inside the class list; the image file exists. (Instance masks
are checked on the COCO JSON, where the annotation ids are: see :mod:`bissl_det.data.coco`.)
Checks on the files (:func:`check_image_files`): each image
exists, is readable (optionally decoded in full) and has the size its annotation says.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from detectron2.structures import BoxMode

from .images import ImageReadError, check_image_file

__all__ = [
    "MAX_LISTED",
    "DatasetValidationError",
    "check_dataset_dicts",
    "check_image_files",
    "check_image_paths",
    "raise_problems",
    "resolve_path",
]

# Problems listed in one error message (the count of the others is given).
MAX_LISTED = 5
# Threads reading image headers / decoding images (I/O bound; PIL releases the GIL).
CHECK_THREADS = min(8, os.cpu_count() or 1)
# Env var naming a data root, as detectron2's builtin data sets use it (default "datasets").
DATASETS_ENV = "DETECTRON2_DATASETS"


class DatasetValidationError(ValueError):
    """A data set on disk or in the config is malformed; the message names where."""


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


def raise_problems(what: str, problems: Sequence[str]) -> None:
    """Raise one DatasetValidationError listing the first problems, if there are any."""
    if not problems:
        return
    listed = "\n  - ".join(problems[:MAX_LISTED])
    more = f"\n  (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
    raise DatasetValidationError(f"{what}: {len(problems)} problem(s):\n  - {listed}{more}")


def _duplicates(values: list) -> list:
    return [v for v, n in Counter(values).items() if n > 1]


def _box_problem(box: list[float], width: int, height: int, voc: bool, tol: float) -> str | None:
    x0, y0, x1, y1 = box
    if voc:  # as written in the XML: 1-based inclusive pixel indices
        shown = f"(xmin, ymin, xmax, ymax)={(x0 + 1, y0 + 1, x1, y1)}"
    else:
        shown = f"[x, y, w, h]=[{x0:g}, {y0:g}, {x1 - x0:g}, {y1 - y0:g}]"
    if not all(math.isfinite(v) for v in box):
        return f"box {shown} is not finite"
    if voc and not all(float(v).is_integer() for v in box):
        return (
            f"box {shown} is not on integer pixel indices (VOC coordinates are integers; "
            "detectron2's VOC evaluator reads them with int())"
        )
    if not (x1 > x0 and y1 > y0):
        hint = " (VOC boxes are 1-based inclusive: need xmin <= xmax, ymin <= ymax)" if voc else ""
        return f"box {shown} has zero or negative area{hint}"
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        need = f"1 <= x <= {width}, 1 <= y <= {height}" if voc else f"{tol:g} px of rounding"
        return (
            f"box {shown} lies outside the {width}x{height} image (allowed: {need}); fix the "
            "annotation, boxes are not clipped"
        )
    return None


def check_dataset_dicts(
    name: str,
    dicts: list[dict],
    num_classes: int,
    describe: Callable[[dict], str],
    voc: bool = False,
    box_tolerance: float = 0.0,
) -> None:
    """Validate detectron2 dataset dicts (see the module docstring).

    Args:
        name: Data set name, for the message.
        dicts: The loader's output.
        num_classes: Categories are ``0 .. num_classes - 1``.
        describe: Where a record comes from, for the message (e.g. its annotation file).
        voc: VOC conventions: integer pixel boxes, shown as the XML's 1-based values.
        box_tolerance: Pixels a box may reach outside the image (COCO's float rounding).

    Raises:
        DatasetValidationError: Listing the first problems, each naming its file.
    """
    if not dicts:
        raise DatasetValidationError(f"dataset {name!r} has no images")
    problems = []
    for key in ("image_id", "file_name"):
        for value in _duplicates([d.get(key) for d in dicts]):
            files = sorted({describe(d) for d in dicts if d.get(key) == value})
            problems.append(
                f"{key} {value!r} is listed more than once ({', '.join(files)}): its boxes would "
                "be counted twice or merged"
            )
    for record in dicts:
        where = describe(record)
        height, width = record.get("height"), record.get("width")
        if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
            problems.append(f"{where}: image size {width}x{height} is not positive integers")
            continue
        if not os.path.isfile(record["file_name"]):
            problems.append(f"{where}: image {record['file_name']!r} is missing")
        for k, ann in enumerate(record.get("annotations", [])):
            label = f"{where}: object {k}" + (
                f" (annotation id {ann['id']})" if "id" in ann else ""
            )
            category = ann.get("category_id")
            if not (isinstance(category, int) and 0 <= category < num_classes):
                problems.append(f"{label}: category_id {category!r} is not in 0..{num_classes - 1}")
            box = BoxMode.convert(list(map(float, ann["bbox"])), ann["bbox_mode"], BoxMode.XYXY_ABS)
            problem = _box_problem(box, width, height, voc, box_tolerance)
            if problem:
                problems.append(f"{label}: {problem}")
    raise_problems(f"dataset {name!r}", problems)


def check_image_files(name: str, dicts: list[dict], decode: bool) -> None:
    """Every image exists, is readable (``decode``: in full) and has its annotated size.

    Raises:
        DatasetValidationError: Listing the first problems, each naming the image file.
    """

    def problem(record: dict) -> str | None:
        return _image_problem(record["file_name"], decode, (record["width"], record["height"]))

    _check_images(f"dataset {name!r}", dicts, problem, decode)


def check_image_paths(what: str, paths: Sequence[str], decode: bool) -> None:
    """Every image file exists and is readable (``decode``: in full); for sets without sizes.

    Raises:
        DatasetValidationError: Listing the first problems, each naming the image file.
    """
    _check_images(what, paths, lambda path: _image_problem(path, decode), decode)


def _image_problem(path: str, decode: bool, size: tuple[int, int] | None = None) -> str | None:
    """The problem with one image file (unreadable, or not ``size`` = (width, height)), or None."""
    try:
        width, height = check_image_file(path, decode=decode)
    except ImageReadError as e:
        return str(e)
    if size is not None and (width, height) != size:
        return f"image {path!r} is {width}x{height}, but its annotation says {size[0]}x{size[1]}"
    return None


def _check_images(
    what: str, items: Sequence, problem: Callable[[Any], str | None], decode: bool
) -> None:
    """Run ``problem`` over ``items`` on :data:`CHECK_THREADS` threads and raise what it finds."""
    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        problems = [p for p in pool.map(problem, items) if p]
    raise_problems(f"{what} (images {'decoded' if decode else 'header-checked'})", problems)
