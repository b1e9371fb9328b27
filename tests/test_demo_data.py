"""The synthetic demo set: files, VOC boxes, detectron2's own loader, determinism by seed."""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import bissl_det  # noqa: F401  (shims before detectron2)
from bissl_det.data import demo

import numpy as np
import pytest
from PIL import Image

TINY = {"num_train": 6, "num_test": 2, "image_size": 64, "num_cls_train": 7, "num_cls_test": 4}


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, demo.make_demo_data(out, seed=0, **TINY)


def test_files_and_info(tiny):
    out, info = tiny
    voc = out / "voc"
    assert len(list((voc / "JPEGImages").glob("*.jpg"))) == 8
    assert len(list((voc / "Annotations").glob("*.xml"))) == 8
    splits = {
        s: (voc / "ImageSets" / "Main" / f"{s}.txt").read_text().split()
        for s in ("train", "val", "trainval", "test")
    }
    assert len(splits["trainval"]) == 6 and len(splits["test"]) == 2
    assert sorted(splits["train"] + splits["val"]) == sorted(splits["trainval"])
    assert not set(splits["trainval"]) & set(splits["test"])
    assert json.loads((out / "demo_info.json").read_text()) == info
    assert "SYNTHETIC" in info["description"]
    assert info["class_names"] == ["circle", "square", "triangle", "cross"]
    # Classification: 7 train images split 3:2:1:1 -> 3, 2, 1, 1; test balanced 1 each.
    train_counts = {
        c: len(list((out / "cls" / "train" / c).glob("*.png"))) for c in info["class_names"]
    }
    assert train_counts == {"circle": 3, "square": 2, "triangle": 1, "cross": 1}
    assert info["classification"]["images"]["train"] == train_counts
    with Image.open(next((out / "cls" / "test" / "cross").glob("*.png"))) as img:
        assert img.size == (64, 64) and img.mode == "RGB"


def test_voc_boxes_inside_images(tiny):
    out, info = tiny
    for xml in (out / "voc" / "Annotations").glob("*.xml"):
        tree = ET.parse(xml)
        w, h = int(tree.findtext("size/width")), int(tree.findtext("size/height"))
        with Image.open(out / "voc" / "JPEGImages" / f"{xml.stem}.jpg") as img:
            assert img.size == (w, h) == (64, 64)
        objects = tree.findall("object")
        assert 1 <= len(objects) <= 4
        for obj in objects:
            assert obj.findtext("name") in info["class_names"]
            x0, y0, x1, y1 = (
                int(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")
            )
            assert 1 <= x0 < x1 <= w and 1 <= y0 < y1 <= h


def test_box_is_tight_around_the_shape():
    # A shape drawn alone: its 0-based box bounds exactly the mask pixels.
    mask = demo._shape_mask("square", 64, (30.0, 20.0), 10.0, 0.0)
    x0, y0, x1, y1 = demo._mask_box(mask)
    assert (x0, y0, x1, y1) == (25, 15, 35, 25)
    assert mask[y0 : y1 + 1, x0 : x1 + 1].all() and mask.sum() == 11 * 11
    xml = ET.fromstring(demo._voc_xml("000000", 64, [("square", (x0, y0, x1, y1))]))
    assert [int(xml.findtext(f"object/bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")] == [
        26,
        16,
        36,
        26,
    ]


def test_detectron2_load_voc_instances(tiny):
    from detectron2.data.datasets.pascal_voc import load_voc_instances

    out, info = tiny
    names = info["class_names"]
    dicts = load_voc_instances(str(out / "voc"), "trainval", names)
    assert len(dicts) == 6
    for d in dicts:
        tree = ET.parse(out / "voc" / "Annotations" / f"{d['image_id']}.xml")
        objs = tree.findall("object")
        assert [a["category_id"] for a in d["annotations"]] == [
            names.index(o.findtext("name")) for o in objs
        ]
        for a, o in zip(d["annotations"], objs, strict=True):
            xml_box = [float(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
            # detectron2 turns 1-based inclusive pixels into continuous [xmin - 1, xmax].
            assert a["bbox"] == [xml_box[0] - 1, xml_box[1] - 1, xml_box[2], xml_box[3]]
            assert 0 <= a["bbox"][0] < a["bbox"][2] <= d["width"]
            assert 0 <= a["bbox"][1] < a["bbox"][3] <= d["height"]


def test_same_seed_same_bytes_other_seed_differs(tiny, tmp_path):
    out, _ = tiny
    again = tmp_path / "again"
    demo.make_demo_data(again, seed=0, **TINY)
    assert _tree_bytes(again) == _tree_bytes(out)
    other = tmp_path / "other"
    demo.make_demo_data(other, seed=1, **TINY)
    a, b = _tree_bytes(out), _tree_bytes(other)
    assert a.keys() == b.keys()
    assert a["voc/JPEGImages/000000.jpg"] != b["voc/JPEGImages/000000.jpg"]
    assert a["cls/train/circle/circle_00000.png"] != b["cls/train/circle/circle_00000.png"]


def test_rerun_replaces_own_output_and_refuses_foreign(tmp_path):
    demo.make_demo_data(tmp_path / "d", seed=0, **{**TINY, "num_train": 10})
    demo.make_demo_data(tmp_path / "d", seed=0, **TINY)
    assert len(list((tmp_path / "d" / "voc" / "JPEGImages").glob("*.jpg"))) == 8  # no stale files
    (tmp_path / "foreign" / "voc").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        demo.make_demo_data(tmp_path / "foreign", **TINY)
    with pytest.raises(ValueError, match="num_train=1"):
        demo.make_demo_data(tmp_path / "bad", num_train=1)


def test_cli_main(tmp_path, capsys):
    args = [
        "--out",
        str(tmp_path / "cli"),
        "--seed",
        "3",
        "--num-train",
        "4",
        "--num-test",
        "2",
        "--image-size",
        "48",
        "--num-cls-train",
        "4",
        "--num-cls-test",
        "4",
    ]
    assert demo.main(args) == 0
    printed = capsys.readouterr().out
    assert "SYNTHETIC" in printed and "took" in printed
    info = json.loads((tmp_path / "cli" / "demo_info.json").read_text())
    assert info["seed"] == 3 and info["detection"]["images"]["test"] == 2
    assert np.asarray(Image.open(tmp_path / "cli" / "voc" / "JPEGImages" / "000000.jpg")).shape == (
        48,
        48,
        3,
    )


def _raster(segmentation, size: int) -> np.ndarray:
    import pycocotools.mask as mask_util

    rles = (
        mask_util.frPyObjects(segmentation, size, size)
        if isinstance(segmentation, list)
        else [segmentation]
    )
    return mask_util.decode(mask_util.merge(rles)).astype(bool)


def _ring(mask: np.ndarray) -> np.ndarray:
    """Pixels within one pixel (8-neighbourhood) of the mask's boundary, inside or outside."""
    import cv2

    kernel = np.ones((3, 3), np.uint8)
    m = mask.astype(np.uint8)
    return (cv2.dilate(m, kernel) - cv2.erode(m, kernel)).astype(bool)


@pytest.mark.parametrize("cls", ["circle", "square", "triangle", "cross"])
def test_mask_annotation_reproduces_the_drawn_pixels(cls):
    """Rasterising the COCO segmentation gives the drawn pixels: exactly for circles and crosses
    (RLE), up to the one-pixel boundary ring for polygons (cv2 also fills the pixels its edges
    touch)."""
    rng = np.random.default_rng(len(cls))
    ious = []
    for _ in range(40):
        side = float(rng.uniform(0.1, 0.4) * 96)
        center = tuple(rng.uniform(side, 96 - side, size=2))
        angle = float(rng.uniform(-25, 25))
        drawn = demo._shape_mask(cls, 96, center, side, angle).astype(bool)
        polys = demo._shape_polygons(cls, center, side, angle)
        raster = _raster(demo._segmentation(drawn.astype(np.uint8), polys), 96)
        exact = cls in ("circle", "cross")
        if exact:
            assert np.array_equal(raster, drawn)
        else:
            assert not (raster ^ drawn)[~_ring(drawn)].any()  # differences only on the boundary
        ious.append((raster & drawn).sum() / (raster | drawn).sum())
        # The annotation's box: the drawn mask's tight box, within a pixel for polygons.
        (rx0, ry0, rx1, ry1), (x0, y0, x1, y1) = demo._mask_box(raster), demo._mask_box(drawn)
        tol = 0 if exact else 1
        assert abs(rx0 - x0) <= tol and abs(ry0 - y0) <= tol
        assert abs(rx1 - x1) <= tol and abs(ry1 - y1) <= tol
    assert min(ious) > (1.0 if exact else 0.7) - 1e-9
    assert np.mean(ious) > (1.0 if exact else 0.85) - 1e-9


def test_coco_json_matches_the_voc_folder_and_validates(tiny):
    """Same images, boxes and classes as the VOC folder, loaded by detectron2 (and validated)."""
    from bissl_det.data.detection import register_coco_json, register_voc_folder

    from detectron2.data import DatasetCatalog

    out, info = tiny
    masks = info["instance_masks"]
    for split in ("trainval", "test"):
        coco_name, voc_name = f"demo_coco_{split}_{id(info)}", f"demo_voc_{split}_{id(info)}"
        register_coco_json(coco_name, out / masks["json"][split], out / masks["image_root"])
        register_voc_folder(voc_name, out / "voc", split, info["class_names"])
        coco, voc = DatasetCatalog.get(coco_name), DatasetCatalog.get(voc_name)
        assert [d["file_name"] for d in coco] == [d["file_name"] for d in voc]
        for c, v in zip(coco, voc, strict=True):
            assert [a["category_id"] for a in c["annotations"]] == [
                a["category_id"] for a in v["annotations"]
            ]
            for a, b in zip(c["annotations"], v["annotations"], strict=True):
                x, y, w, h = a["bbox"]
                assert [x, y, x + w, y + h] == b["bbox"]
                assert a["segmentation"]
