"""Write the SYNTHETIC demo data set: coloured shapes on textured noise, VOC and ImageFolder.

Nothing here is real data. It exists so that every stage of the pipeline (pretext training, BiSSL,
detection fine-tuning, classification evaluation) can run end to end in minutes on a laptop, with
the same file formats as the real data sets:

- ``<out>/voc/``: Pascal VOC detection layout (``JPEGImages``, ``Annotations``,
  ``ImageSets/Main/{train,val,trainval,test}.txt``), loadable by detectron2's own
  ``load_voc_instances`` and evaluable by its ``PascalVOCDetectionEvaluator``.
- ``<out>/coco/instances_{trainval,test}.json``: the same images and boxes in COCO format, with
  the exact instance masks (the shapes are drawn, so their pixels are known): polygons for
  squares and triangles, RLE for circles and crosses (drawn with an empty centre square).
  Images: ``<out>/voc/JPEGImages``. Because of the RLE masks, Mask R-CNN training on it needs
  ``INPUT.MASK_FORMAT: bitmask``.
- ``<out>/cls/{train,test}/<class>/*.png``: ImageFolder classification, one shape per image, the
  training split deliberately imbalanced (3:2:1:1) so top-1 and mean per-class accuracy differ.
- Unlabeled pretext images: the pretext task reuses ``<out>/voc/JPEGImages`` (labels ignored).
- ``<out>/demo_info.json``: class names, counts, seed and sizes.

Output is a pure function of the arguments: the same seed gives byte-identical files. The command
line is ``python datasets/make_demo_data.py --out datasets/demo --seed 0``; tests and benchmarks
call :func:`make_demo_data`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Training-split class weights of the classification set (imbalanced on purpose).
CLS_TRAIN_WEIGHTS: tuple[int, ...] = (3, 2, 1, 1)
# A VOC object is marked "difficult" (ignored by VOC evaluation) when its box is this small.
DIFFICULT_MAX_SIDE = 16
JPEG_QUALITY = 90
INFO_FILE = "demo_info.json"


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour field plus thin distractor lines; float32 HxWx3 in [0, 255]."""
    coarse = rng.uniform(40.0, 215.0, size=(6, 6, 3)).astype(np.float32)
    image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    # Fine texture, so a detector cannot find objects just by looking for flat regions.
    fine = rng.normal(0.0, 18.0, size=(size // 4, size // 4, 3)).astype(np.float32)
    image += cv2.resize(fine, (size, size), interpolation=cv2.INTER_LINEAR)
    for _ in range(int(rng.integers(2, 6))):
        p1 = tuple(int(v) for v in rng.integers(0, size, size=2))
        p2 = tuple(int(v) for v in rng.integers(0, size, size=2))
        colour = tuple(float(v) for v in rng.uniform(0.0, 255.0, size=3))
        cv2.line(image, p1, p2, colour, thickness=1, lineType=cv2.LINE_8)
    return image


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated RGB colour (float32, 0..255)."""
    hsv = np.array(
        [[[rng.uniform(0, 180), rng.uniform(150, 255), rng.uniform(120, 255)]]], dtype=np.uint8
    )
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).reshape(3).astype(np.float32)


def _rotated(points: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate Nx2 points (centred at the origin) by ``angle_deg``."""
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return points @ rot.T


def _shape_polygons(
    cls: str, center: tuple[float, float], side: float, angle: float
) -> list[np.ndarray] | None:
    """Integer vertices (Nx2, x then y) of the polygons a shape is filled from; None: a circle."""
    cx, cy = center
    h = side / 2.0
    if cls == "circle":
        return None
    if cls == "square":
        polys = [np.array([[-h, -h], [h, -h], [h, h], [-h, h]])]
    elif cls == "triangle":
        polys = [np.array([[0.0, -h], [h, h * 0.75], [-h, h * 0.75]])]
    elif cls == "cross":
        t = side / 6.0  # half the arm thickness
        polys = [
            np.array([[-h, -t], [h, -t], [h, t], [-h, t]]),
            np.array([[-t, -h], [t, -h], [t, h], [-t, h]]),
        ]
    else:
        raise ValueError(f"unknown shape class {cls!r}; expected one of {CLASS_NAMES}")
    return [np.round(_rotated(p, angle) + (cx, cy)).astype(np.int32) for p in polys]


def _shape_mask(
    cls: str, size: int, center: tuple[float, float], side: float, angle: float
) -> np.ndarray:
    """Binary uint8 mask of one shape. ``side`` is its nominal extent in pixels."""
    return _fill_shape(size, center, side, _shape_polygons(cls, center, side, angle))


def _fill_shape(
    size: int, center: tuple[float, float], side: float, polys: list[np.ndarray] | None
) -> np.ndarray:
    """Binary uint8 mask of the polygons ``polys`` (None: the circle of diameter ``side``)."""
    mask = np.zeros((size, size), dtype=np.uint8)
    if polys is None:
        cx, cy = center
        cv2.circle(mask, (round(cx), round(cy)), max(1, round(side / 2.0)), 1, -1, cv2.LINE_8)
    else:
        cv2.fillPoly(mask, polys, 1, cv2.LINE_8)
    return mask


def _segmentation(mask: np.ndarray, polys: list[np.ndarray] | None) -> list | dict:
    """COCO segmentation of a drawn shape: its polygon (vertices at pixel centres, +0.5 in COCO's
    continuous coordinates) for a square or triangle, else the exact mask as RLE. A cross is two
    polygons filled in one even-odd pass, so its centre square stays empty; COCO polygons (a
    union) cannot say that."""
    if polys is not None and len(polys) == 1:
        return [(polys[0].astype(np.float64) + 0.5).ravel().tolist()]
    rle = mask_util.encode(np.asfortranarray(mask))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight 0-based inclusive pixel box (x0, y0, x1, y1) of a non-empty mask."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _boxes_overlap(a: tuple[int, ...], b: tuple[int, ...], gap: int = 2) -> bool:
    return not (a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1])


def _paint(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    """Fill ``mask`` with a colour that stands out from the background under it."""
    under = image[mask.astype(bool)].mean(axis=0)
    colour = _random_colour(rng)
    for _ in range(10):  # resample colours too close to the local background
        if np.abs(colour - under).sum() > 120:
            break
        colour = _random_colour(rng)
    image[mask.astype(bool)] = colour


def _finish(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Add pixel noise (objects included) and quantise to uint8 RGB."""
    image = image + rng.normal(0.0, 10.0, size=image.shape).astype(np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


Object = tuple[str, tuple[int, int, int, int], "list | dict"]


def _detection_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[Object]]:
    """One detection image with 1-4 non-overlapping shapes: (class, 0-based inclusive box,
    COCO segmentation) each."""
    image = _background(rng, size)
    objects: list[Object] = []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(30):
            cls = CLASS_NAMES[int(rng.integers(len(CLASS_NAMES)))]
            side = float(rng.uniform(0.1, 0.4) * size)
            margin = side * 0.75 + 1
            center = (rng.uniform(margin, size - margin), rng.uniform(margin, size - margin))
            angle = float(rng.uniform(-25, 25))
            polys = _shape_polygons(cls, center, side, angle)
            mask = _fill_shape(size, center, side, polys)
            if not mask.any():
                continue
            box = _mask_box(mask)
            if all(not _boxes_overlap(box, other) for _, other, _ in objects):
                _paint(image, mask, rng)
                objects.append((cls, box, _segmentation(mask, polys)))
                break
    return _finish(image, rng), objects


def _classification_image(rng: np.random.Generator, size: int, cls: str) -> np.ndarray:
    """One classification image: a single shape of class ``cls``, roughly centred."""
    image = _background(rng, size)
    side = float(rng.uniform(0.35, 0.65) * size)
    jitter = size * 0.1
    center = (size / 2 + rng.uniform(-jitter, jitter), size / 2 + rng.uniform(-jitter, jitter))
    _paint(image, _shape_mask(cls, size, center, side, float(rng.uniform(-25, 25))), rng)
    return _finish(image, rng)


def _voc_xml(image_id: str, size: int, objects: list[Object]) -> bytes:
    """VOC annotation XML; boxes are written 1-based and inclusive, as in the VOC devkit."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "voc"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = "bissl_det synthetic demo data (not real images)"
    size_el = ET.SubElement(root, "size")
    ET.SubElement(size_el, "width").text = str(size)
    ET.SubElement(size_el, "height").text = str(size)
    ET.SubElement(size_el, "depth").text = "3"
    ET.SubElement(root, "segmented").text = "0"
    for cls, (x0, y0, x1, y1), *_ in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = cls
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        difficult = max(x1 - x0 + 1, y1 - y0 + 1) < DIFFICULT_MAX_SIDE
        ET.SubElement(obj, "difficult").text = str(int(difficult))
        bndbox = ET.SubElement(obj, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), (x0, y0, x1, y1), strict=True):
            ET.SubElement(bndbox, tag).text = str(value + 1)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8") + b"\n"


def _split_counts(total: int, weights: tuple[int, ...]) -> list[int]:
    """Split ``total`` in proportion to ``weights`` (largest remainder, so it sums exactly)."""
    exact = np.asarray(weights, dtype=np.float64) * total / sum(weights)
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts.tolist()


def _write_voc(
    out: Path, rng: np.random.Generator, num_trainval: int, num_test: int, size: int
) -> tuple[dict, dict[str, list[str]], dict[str, list[Object]]]:
    """Write the VOC folder; return its description, its splits' image ids and each image's
    objects."""
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"{i:06d}" for i in range(num_trainval + num_test)]
    instances = {split: dict.fromkeys(CLASS_NAMES, 0) for split in ("trainval", "test")}
    difficult = 0
    objects_by_id = {}
    for i, image_id in enumerate(ids):
        image, objects = _detection_image(rng, size)
        ok = cv2.imwrite(
            str(out / "JPEGImages" / f"{image_id}.jpg"),
            cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
            [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY],
        )
        if not ok:
            raise OSError(f"could not write {out / 'JPEGImages' / image_id}.jpg")
        (out / "Annotations" / f"{image_id}.xml").write_bytes(_voc_xml(image_id, size, objects))
        objects_by_id[image_id] = objects
        split = "trainval" if i < num_trainval else "test"
        for cls, (x0, y0, x1, y1), _ in objects:
            instances[split][cls] += 1
            difficult += max(x1 - x0 + 1, y1 - y0 + 1) < DIFFICULT_MAX_SIDE
    trainval, test = ids[:num_trainval], ids[num_trainval:]
    # VOC itself halves trainval into train and val.
    splits = {"trainval": trainval, "train": trainval[0::2], "val": trainval[1::2], "test": test}
    for name, members in splits.items():
        (out / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(m + "\n" for m in members))
    info = {
        "root": "voc",
        "images": {name: len(members) for name, members in splits.items()},
        "instances": instances,
        "difficult_instances": int(difficult),
    }
    return info, splits, objects_by_id


def _coco_split(ids: list[str], objects_by_id: dict[str, list[Object]], size: int) -> dict:
    """COCO instances JSON content of the images ``ids`` (file names relative to JPEGImages)."""
    images, annotations = [], []
    for image_id in ids:
        images.append(
            {"id": int(image_id), "file_name": f"{image_id}.jpg", "height": size, "width": size}
        )
        for cls, (x0, y0, x1, y1), segmentation in objects_by_id[image_id]:
            rles = (
                mask_util.frPyObjects(segmentation, size, size)
                if isinstance(segmentation, list)
                else [segmentation]
            )
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": int(image_id),
                    "category_id": CLASS_NAMES.index(cls) + 1,
                    # The tight box of the drawn pixels, as in the VOC XML (there 1-based).
                    "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
                    "area": int(mask_util.area(mask_util.merge(rles))),
                    "segmentation": segmentation,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(CLASS_NAMES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _write_coco(
    out: Path, splits: dict[str, list[str]], objects_by_id: dict[str, list[Object]], size: int
):
    """``<out>/instances_{trainval,test}.json``: the VOC splits with instance masks."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in ("trainval", "test"):
        path = out / f"instances_{split}.json"
        path.write_text(json.dumps(_coco_split(splits[split], objects_by_id, size)) + "\n")
        files[split] = f"{out.name}/{path.name}"
    return {
        "root": out.name,
        "json": files,
        "image_root": "voc/JPEGImages",
        "format": "coco",
        "masks": "polygons (vertices at pixel centres) for squares and triangles; exact RLE for "
        "circles and crosses",
    }


def _write_cls(
    out: Path, rng: np.random.Generator, num_train: int, num_test: int, size: int
) -> dict:
    counts = {
        "train": dict(zip(CLASS_NAMES, _split_counts(num_train, CLS_TRAIN_WEIGHTS), strict=True)),
        "test": dict(
            zip(CLASS_NAMES, _split_counts(num_test, (1,) * len(CLASS_NAMES)), strict=True)
        ),
    }
    for split, per_class in counts.items():
        for cls, n in per_class.items():
            folder = out / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(n):
                image = _classification_image(rng, size, cls)
                path = folder / f"{cls}_{j:05d}.png"
                if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
                    raise OSError(f"could not write {path}")
    return {"root": "cls", "images": counts}


def make_demo_data(
    out: Path | str,
    seed: int = 0,
    num_train: int = 400,
    num_test: int = 100,
    image_size: int = 128,
    num_cls_train: int = 300,
    num_cls_test: int = 100,
    cls_image_size: int = 64,
) -> dict:
    """Write the synthetic demo data set under ``out`` and return its ``demo_info.json`` content.

    Args:
        out: Output folder. A previous demo set there (recognised by its ``demo_info.json``) is
            replaced; a folder holding other ``voc``/``cls`` data is refused.
        seed: Random seed; the same seed gives byte-identical files.
        num_train: Detection images in VOC ``trainval`` (halved into ``train`` and ``val``).
        num_test: Detection images in VOC ``test``.
        image_size: Side of the square detection images, in pixels.
        num_cls_train: Classification training images (split 3:2:1:1 over the classes).
        num_cls_test: Classification test images (balanced).
        cls_image_size: Side of the square classification images, in pixels.

    Returns:
        The dataset description also written to ``<out>/demo_info.json``.
    """
    for key, value, low in (
        ("num_train", num_train, 2),
        ("num_test", num_test, 2),
        ("image_size", image_size, 32),
        ("num_cls_train", num_cls_train, len(CLASS_NAMES)),
        ("num_cls_test", num_cls_test, len(CLASS_NAMES)),
        ("cls_image_size", cls_image_size, 16),
    ):
        if int(value) != value or value < low:
            raise ValueError(f"make_demo_data: {key}={value!r} must be an integer >= {low}")
    out = Path(out)
    voc_dir, cls_dir, coco_dir = out / "voc", out / "cls", out / "coco"
    if (out / INFO_FILE).is_file():
        for stale in (voc_dir, cls_dir, coco_dir):
            if stale.exists():
                shutil.rmtree(stale)
    elif voc_dir.exists() or cls_dir.exists() or coco_dir.exists():
        raise FileExistsError(
            f"{out} already holds voc/, cls/ or coco/ but no {INFO_FILE}: refusing to overwrite "
            "data that this script did not write; choose another --out"
        )
    # Independent streams, so changing the detection counts leaves the classification set alone.
    det_seq, cls_seq = np.random.SeedSequence(seed).spawn(2)
    det_rng = np.random.default_rng(det_seq)
    voc_info, splits, objects_by_id = _write_voc(voc_dir, det_rng, num_train, num_test, image_size)
    info = {
        "description": "SYNTHETIC demo data (coloured shapes on textured noise), not real images",
        "generator": "datasets/make_demo_data.py",
        "seed": int(seed),
        "class_names": list(CLASS_NAMES),
        "detection": {
            **voc_info,
            "format": "pascal_voc",
            "image_size": [image_size, image_size],
            "difficult_rule": f"max box side < {DIFFICULT_MAX_SIDE} px",
        },
        "instance_masks": _write_coco(coco_dir, splits, objects_by_id, image_size),
        "classification": {
            **_write_cls(
                cls_dir, np.random.default_rng(cls_seq), num_cls_train, num_cls_test, cls_image_size
            ),
            "format": "imagefolder",
            "image_size": [cls_image_size, cls_image_size],
            "train_class_weights": list(CLS_TRAIN_WEIGHTS),
        },
        "pretext": {
            "images": "voc/JPEGImages",
            "note": "unlabeled pretext images reuse the detection JPEGs; labels are ignored",
        },
    }
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("datasets/demo"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    parser.add_argument("--num-train", type=int, default=400, help="VOC trainval images")
    parser.add_argument("--num-test", type=int, default=100, help="VOC test images")
    parser.add_argument("--image-size", type=int, default=128, help="detection image side (px)")
    parser.add_argument("--num-cls-train", type=int, default=300, help="classification train")
    parser.add_argument("--num-cls-test", type=int, default=100, help="classification test")
    parser.add_argument("--cls-image-size", type=int, default=64, help="classification side (px)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    info = make_demo_data(
        args.out,
        seed=args.seed,
        num_train=args.num_train,
        num_test=args.num_test,
        image_size=args.image_size,
        num_cls_train=args.num_cls_train,
        num_cls_test=args.num_cls_test,
        cls_image_size=args.cls_image_size,
    )
    det, cls = info["detection"], info["classification"]
    print(f"Wrote SYNTHETIC demo data to {args.out} (seed {args.seed}):")
    print(f"  {args.out / 'voc'}: VOC detection, images per split {det['images']}, ")
    print(f"    instances {det['instances']} ({det['difficult_instances']} difficult)")
    print(f"  {args.out / 'coco'}: COCO JSON with instance masks of the VOC trainval/test images")
    print(f"  {args.out / 'cls'}: ImageFolder classification, {cls['images']}")
    print(f"  pretext images: {args.out / 'voc' / 'JPEGImages'} (labels unused)")
    print(f"  {args.out / INFO_FILE}; took {time.perf_counter() - start:.1f} s")
    return 0
