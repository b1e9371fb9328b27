"""User detection data sets: VOC/COCO registration, config, and every validation error."""

import json
import uuid
from pathlib import Path

import bissl_det  # noqa: F401  (shims before detectron2)

import numpy as np
import pytest
import torch
from PIL import Image

# isort: split
from bissl_det.config.defaults import add_dataset_config
from bissl_det.data.detection import (
    DatasetValidationError,
    register_coco_json,
    register_from_config,
    register_voc_folder,
    validate_coco_json,
    validate_voc_folder,
)

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

CLASSES = ["circle", "square"]
OBJ = """<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>
<difficult>{difficult}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>
<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"""


def _xml(objects, width=40, height=30) -> str:
    body = "".join(OBJ.format(name=n, b=b, difficult=d) for n, b, d in objects)
    return (
        f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth>"
        f"</size>{body}</annotation>"
    )


def _voc(root: Path, annotations: dict[str, str], split="train") -> Path:
    """A VOC folder with one image per annotation (40x30 black JPEGs) and one split file."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, xml in annotations.items():
        (root / "Annotations" / f"{image_id}.xml").write_text(xml)
        Image.new("RGB", (40, 30)).save(root / "JPEGImages" / f"{image_id}.jpg")
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(annotations) + "\n")
    return root


GOOD = {
    "a": _xml([("circle", (1, 1, 40, 30), 0), ("square", (5, 6, 9, 12), 1)]),
    "b": _xml([("square", (10, 10, 10, 10), 0)]),  # a 1-pixel box is valid in VOC's convention
}


def _name() -> str:
    return f"test_{uuid.uuid4().hex[:8]}"


def test_registered_voc_loads_through_detectron2(tmp_path):
    root = _voc(tmp_path, GOOD)
    assert validate_voc_folder(root, "train", CLASSES) == 2
    name = _name()
    register_voc_folder(name, root, "train", CLASSES)
    ours = DatasetCatalog.get(name)
    assert MetadataCatalog.get(name).evaluator_type == "pascal_voc"  # detectron2's VOC evaluator
    assert ours[0]["annotations"][0]["bbox"] == [0.0, 0.0, 40.0, 30.0]


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ({"x": _xml([("dog", (1, 1, 5, 5), 0)])}, r"x\.xml: object 0 has class 'dog'.*not in"),
        (
            {"x": _xml([("circle", (0, 1, 5, 5), 0)])},
            r"x\.xml: object 0: box \(xmin, ymin, xmax, ymax\)="
            r"\(0\.0, 1\.0, 5\.0, 5\.0\) lies outside the 40x30",
        ),
        ({"x": _xml([("circle", (2, 2, 41, 5), 0)])}, r"x\.xml: .*41\.0.*outside the 40x30 image"),
        ({"x": _xml([("circle", (2, 2, 8, 31), 0)])}, r"x\.xml: .*outside"),
        (
            {"x": _xml([("circle", (9, 2, 8, 5), 0)])},
            r"x\.xml: object 0: box .*\(9\.0, 2\.0, 8\.0, 5\.0\) has zero or neg",
        ),
        ({"x": _xml([("circle", (2, 5, 8, 4), 0)])}, r"x\.xml: .*zero or negative area"),
        ({"x": "<annotation><size>"}, r"x\.xml' is not valid XML"),
        ({"x": ""}, r"x\.xml' is empty"),
        (
            {"x": "<annotation><size><width>4</width></size></annotation>"},
            r"x\.xml: missing .*"
            r"<size/height>",
        ),
        (
            {"x": _xml([]).replace("40", "forty")},
            r"x\.xml: <size/width> is not an integer: 'forty'",
        ),
        (
            {"x": _xml([("circle", (1, 1, 5, 5), 0)]).replace("<pose>Unspecified</pose>", "")},
            r"x\.xml: missing or empty <pose>",
        ),
        ({"x": _xml([("circle", (1, 1, 5, 5), 2)])}, r"x\.xml: object 0 has difficult=2"),
    ],
)
def test_voc_annotation_errors_name_the_file(tmp_path, annotations, message):
    root = _voc(tmp_path, {**GOOD, **annotations})
    with pytest.raises(DatasetValidationError, match=message):
        validate_voc_folder(root, "train", CLASSES)


def test_voc_missing_files_and_folders(tmp_path):
    with pytest.raises(DatasetValidationError, match=r"VOC folder '.*nowhere' does not exist"):
        validate_voc_folder(tmp_path / "nowhere", "train", CLASSES)
    root = _voc(tmp_path / "voc", GOOD)
    with pytest.raises(DatasetValidationError, match=r"ImageSets/Main/test\.txt'.*is missing"):
        validate_voc_folder(root, "test", CLASSES)
    (root / "ImageSets" / "Main" / "empty.txt").write_text("\n\n")
    with pytest.raises(DatasetValidationError, match=r"empty\.txt' lists no images"):
        validate_voc_folder(root, "empty", CLASSES)
    (root / "ImageSets" / "Main" / "twocol.txt").write_text("a 1\n")
    with pytest.raises(DatasetValidationError, match=r"twocol\.txt:1: expected one image id"):
        validate_voc_folder(root, "twocol", CLASSES)
    (root / "ImageSets" / "Main" / "ghost.txt").write_text("a\nghost\n")
    with pytest.raises(DatasetValidationError, match=r"Annotations/ghost\.xml' is missing"):
        validate_voc_folder(root, "ghost", CLASSES)
    (root / "JPEGImages" / "b.jpg").unlink()
    with pytest.raises(
        DatasetValidationError, match=r"Annotations/b\.xml: image '.*JPEGImages/b\.jpg' is missing"
    ):
        validate_voc_folder(root, "train", CLASSES)
    (root / "JPEGImages").rename(root / "images")
    with pytest.raises(DatasetValidationError, match=r"has no JPEGImages/ folder"):
        validate_voc_folder(root, "train", CLASSES)


def test_register_voc_metadata_idempotence_and_conflicts(tmp_path):
    root = _voc(tmp_path, GOOD)
    name = _name()
    assert register_voc_folder(name, root, "train", CLASSES) is True
    assert register_voc_folder(name, root, "train", tuple(CLASSES)) is False  # same args: no-op
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "pascal_voc" and meta.year == 2007 and meta.split == "train"
    assert meta.thing_classes == CLASSES and meta.dirname == str(root)
    assert len(DatasetCatalog.get(name)) == 2
    with pytest.raises(DatasetValidationError, match=rf"{name}' is already registered with diff"):
        register_voc_folder(name, root, "train", ["square", "circle"])
    with pytest.raises(
        DatasetValidationError, match="already taken in detectron2's DatasetCatalog"
    ):
        register_voc_folder("voc_2007_train", root, "train", CLASSES)
    with pytest.raises(DatasetValidationError, match="YEAR=2010 must be one of"):
        register_voc_folder(_name(), root, "train", CLASSES, year=2010)
    bad = _voc(tmp_path / "bad", {"x": _xml([("dog", (1, 1, 2, 2), 0)]), **GOOD})
    bad_name = _name()
    with pytest.raises(DatasetValidationError, match=r"x\.xml: object 0 has class 'dog'"):
        register_voc_folder(bad_name, bad, "train", CLASSES)
    assert bad_name not in DatasetCatalog.list()  # nothing half-registered


def test_voc_evaluator_accepts_registered_folder(tmp_path):
    """Detectron2's own VOC evaluator runs on our metadata: perfect predictions give AP 100."""
    from detectron2.evaluation import PascalVOCDetectionEvaluator
    from detectron2.structures import Boxes, Instances

    root = _voc(tmp_path, GOOD)
    name = _name()
    register_voc_folder(name, root, "train", CLASSES)
    evaluator = PascalVOCDetectionEvaluator(name)
    evaluator.reset()
    for d in DatasetCatalog.get(name):
        inst = Instances((d["height"], d["width"]))
        inst.pred_boxes = Boxes(torch.tensor([a["bbox"] for a in d["annotations"]]))
        inst.scores = torch.ones(len(d["annotations"]))
        inst.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]])
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    result = evaluator.evaluate()["bbox"]
    assert result["AP50"] == pytest.approx(100.0) and result["AP"] == pytest.approx(100.0)


def _coco(tmp_path: Path, **changes) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    Image.new("RGB", (40, 30)).save(images / "1.jpg")
    data = {
        "images": [{"id": 1, "file_name": "1.jpg", "height": 30, "width": 40}],
        "annotations": [
            {
                "id": 7,
                "image_id": 1,
                "category_id": 3,
                "bbox": [2.0, 3.0, 10.0, 5.0],
                "area": 50.0,
                "iscrowd": 0,
            }
        ],
        "categories": [{"id": 3, "name": "circle"}],
    }
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    json_file = tmp_path / "ann.json"
    json_file.write_text(json.dumps(data))
    return json_file, images


def test_register_coco_json(tmp_path):
    json_file, images = _coco(tmp_path)
    assert validate_coco_json(json_file, images) == 1
    name = _name()
    assert register_coco_json(name, json_file, images) is True
    assert register_coco_json(name, json_file, images) is False
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "coco" and meta.json_file == str(json_file)
    (record,) = DatasetCatalog.get(name)
    assert record["annotations"][0]["bbox"] == [2.0, 3.0, 10.0, 5.0]
    assert MetadataCatalog.get(name).thing_classes == ["circle"]


ANN = {"id": 7, "image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 5]}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"annotations": None}, r"ann\.json: missing top-level key 'annotations'"),
        (
            {"annotations": [{"id": 7, "image_id": 1, "category_id": 3}]},
            r"ann\.json: annotations\[0\] is missing key\(s\) \['bbox'\]",
        ),
        (
            {"images": [{"id": 1, "file_name": "1.jpg", "height": 30}]},
            r"images\[0\] is missing key\(s\) \['width'\]",
        ),
        ({"categories": [{"id": 3}]}, r"categories\[0\] is missing key\(s\) \['name'\]"),
        ({"images": []}, r"ann\.json: 'images' is empty"),
        (
            {"annotations": [{**ANN, "bbox": [35, 3, 10, 5]}]},
            r"ann\.json \(image id 1, '1\.jpg'\): object 0: box \[x, y, w, h\]=\[35, 3, 10, 5\] "
            r"lies outside the 40x30 image",
        ),
        (
            {"annotations": [{**ANN, "bbox": [2, 3, 0, 5]}]},
            r"ann\.json \(image id 1, '1\.jpg'\): object 0: box .* has zero or negative area",
        ),
        ({"annotations": [{**ANN, "category_id": 9}]}, r"category_id 9 is not in 'categories'"),
        ({"annotations": [{**ANN, "image_id": 2}]}, r"unknown image_id 2"),
        (
            {"images": [{"id": 1, "file_name": "gone.jpg", "height": 30, "width": 40}]},
            r"\(image id 1, 'gone\.jpg'\): image '.*gone\.jpg' is missing",
        ),
    ],
)
def test_coco_errors_name_the_key(tmp_path, changes, message):
    json_file, images = _coco(tmp_path, **changes)
    with pytest.raises(DatasetValidationError, match=message):
        register_coco_json(_name(), json_file, images)


def test_coco_unparsable_and_missing(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetValidationError, match=r"bad\.json' does not parse"):
        validate_coco_json(tmp_path / "bad.json", tmp_path)
    with pytest.raises(DatasetValidationError, match=r"COCO JSON file 'nope\.json' does not exist"):
        validate_coco_json("nope.json", tmp_path)


def _cfg_from_yaml(tmp_path: Path, custom: str):
    cfg = get_cfg()
    add_dataset_config(cfg)
    assert cfg.DATASETS.CUSTOM == []
    yaml = tmp_path / "cfg.yaml"
    yaml.write_text(f"DATASETS:\n  CUSTOM:\n{custom}")
    cfg.merge_from_file(str(yaml))
    cfg.freeze()
    return cfg


def test_register_from_config_relative_paths_and_env(tmp_path, monkeypatch):
    _voc(tmp_path / "data" / "voc", GOOD)
    json_file, images = _coco(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    voc_name, coco_name = _name(), _name()
    cfg = _cfg_from_yaml(
        tmp_path,
        f"    - {{NAME: {voc_name}, FORMAT: voc, ROOT: data/voc, SPLIT: train, "
        "CLASSES: [circle, square], YEAR: 2012}\n"
        f"    - {{NAME: {coco_name}, FORMAT: COCO, JSON: data/ann.json, "
        "IMAGE_ROOT: data/images}\n",
    )
    assert register_from_config(cfg) == [voc_name, coco_name]
    assert MetadataCatalog.get(voc_name).dirname == str(tmp_path / "data" / "voc")
    assert MetadataCatalog.get(voc_name).year == 2012
    assert register_from_config(cfg) == [voc_name, coco_name]  # idempotent
    # From elsewhere, a relative ROOT is found under $DETECTRON2_DATASETS.
    monkeypatch.chdir(tmp_path / "data" / "images")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "data"))
    name = _name()
    cfg = _cfg_from_yaml(
        tmp_path,
        f"    - {{NAME: {name}, FORMAT: voc, ROOT: voc, SPLIT: train, CLASSES: [circle, "
        "square]}\n",
    )
    register_from_config(cfg)
    assert MetadataCatalog.get(name).dirname == str(tmp_path / "data" / "voc")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{NAME: n, FORMAT: yolo}", r"DATASETS\.CUSTOM\[0\]: FORMAT='yolo' must be one of"),
        ("{NAME: n, FORMAT: voc, ROOT: x, CLASSES: [a]}", r"CUSTOM\[0\].*missing keys \['SPLIT'\]"),
        ("{NAME: n, FORMAT: coco, JSON: a, IMAGE_ROOT: b, ROOT: c}", r"unknown keys \['ROOT'\]"),
        (
            "{NAME: n, FORMAT: voc, ROOT: nowhere, SPLIT: t, CLASSES: [a]}",
            r"CUSTOM\[0\] \(NAME 'n'\): VOC folder 'nowhere' does not exist",
        ),
    ],
)
def test_register_from_config_errors_name_the_entry(tmp_path, monkeypatch, entry, message):
    monkeypatch.chdir(tmp_path)
    cfg = _cfg_from_yaml(tmp_path, f"    - {entry}\n")
    with pytest.raises(DatasetValidationError, match=message):
        register_from_config(cfg)


def test_register_from_config_via_command_line_override(tmp_path):
    root = _voc(tmp_path, GOOD)
    cfg = get_cfg()
    add_dataset_config(cfg)
    name = _name()
    entry = {"NAME": name, "FORMAT": "voc", "ROOT": str(root), "SPLIT": "train", "CLASSES": CLASSES}
    cfg.merge_from_list(["DATASETS.CUSTOM", str([entry])])
    assert register_from_config(cfg) == [name]
    assert np.array_equal(
        [a["category_id"] for a in DatasetCatalog.get(name)[0]["annotations"]], [0, 1]
    )
