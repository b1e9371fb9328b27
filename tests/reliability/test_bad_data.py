"""Bad data sets never give silently wrong results: each class fails early, naming the file.

Tiny synthetic files (a few 32-64 px images each); every test runs in well under a second.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import bissl_det  # noqa: F401  (shims before detectron2)

import numpy as np
import pytest
import torch
from PIL import Image

# isort: split
from bissl_det.config.defaults import add_bissl_config
from bissl_det.data.classification import ImageFolderDataset
from bissl_det.data.detection import (
    DatasetValidationError,
    register_coco_json,
    register_from_config,
    register_voc_folder,
    validate_coco_json,
)
from bissl_det.data.images import (
    MAX_PIXELS_ENV,
    ImageReadError,
    ImageTooLargeError,
    read_image_array,
    read_rgb,
)
from bissl_det.data.mapper import DetectionMapper
from bissl_det.data.pretext import UnlabeledImages
from bissl_det.data.tasks import downstream_task, registered_downstream_tasks

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper

CLASSES = ["circle", "square"]
OBJ = (
    "<object><name>{name}</name><pose>U</pose><truncated>0</truncated><difficult>0</difficult>"
    "<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax>"
    "</bndbox></object>"
)


def _name() -> str:
    return f"bad_{uuid.uuid4().hex[:8]}"


def _noise(w: int = 40, h: int = 30, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def _truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file short: its header still parses, its pixels do not decode."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _voc(root: Path, boxes: dict[str, tuple], splits: dict[str, list[str]]) -> Path:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, box in boxes.items():
        xml = (
            "<annotation><size><width>40</width><height>30</height><depth>3</depth></size>"
            f"{OBJ.format(name='circle', b=box)}</annotation>"
        )
        (root / "Annotations" / f"{image_id}.xml").write_text(xml)
        _noise(seed=len(image_id)).save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
    for split, ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(i + "\n" for i in ids))
    return root


def _voc_cfg(root: Path, train: str = "train", test: str = "test", mode: str = "decode_test"):
    cfg = add_bissl_config(get_cfg())
    train_name, test_name = _name(), _name()
    entries = [
        {"NAME": n, "FORMAT": "voc", "ROOT": str(root), "SPLIT": s, "CLASSES": CLASSES}
        for n, s in ((train_name, train), (test_name, test))
    ]
    cfg.merge_from_list(["DATASETS.CUSTOM", str(entries), "DATASETS.CHECK_IMAGES", mode])
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (train_name,), (test_name,)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    cfg.INPUT.FORMAT = "RGB"
    return cfg


GOOD = {"a": (2, 2, 20, 20), "b": (5, 5, 30, 25), "c": (1, 1, 40, 30), "d": (3, 3, 9, 9)}


# ---- Duplicates ----------------------------------------------------------------------------------


def test_voc_split_listing_an_image_twice_is_an_error(tmp_path):
    root = _voc(tmp_path, GOOD, {"train": ["a", "b", "a"]})
    split_file = root / "ImageSets" / "Main" / "train.txt"
    with pytest.raises(DatasetValidationError) as err:
        register_voc_folder(_name(), root, "train", CLASSES)
    assert str(split_file) in str(err.value) and "'a' (lines [1, 3])" in str(err.value)
    split_file.write_text("a\n")  # detectron2's loader would crash on a one-line split
    with pytest.raises(DatasetValidationError, match=r"train\.txt' lists a single image"):
        register_voc_folder(_name(), root, "train", CLASSES)


def _coco(tmp_path: Path, images=None, annotations=None) -> tuple[Path, Path]:
    (tmp_path / "img").mkdir(parents=True, exist_ok=True)
    for name in ("1.jpg", "2.jpg"):
        _noise().save(tmp_path / "img" / name)
    data = {
        "images": images
        or [
            {"id": 1, "file_name": "1.jpg", "height": 30, "width": 40},
            {"id": 2, "file_name": "2.jpg", "height": 30, "width": 40},
        ],
        "annotations": annotations
        or [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 0},
            {"id": 11, "image_id": 2, "category_id": 1, "bbox": [5, 5, 10, 10], "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "circle"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return tmp_path / "ann.json", tmp_path / "img"


@pytest.mark.parametrize(
    ("images", "annotations", "message"),
    [
        (
            [
                {"id": 1, "file_name": "1.jpg", "height": 30, "width": 40},
                {"id": 1, "file_name": "2.jpg", "height": 30, "width": 40},
            ],
            None,
            r"ann\.json: image id 1 is used 2 times",
        ),
        (
            [
                {"id": 1, "file_name": "1.jpg", "height": 30, "width": 40},
                {"id": 2, "file_name": "1.jpg", "height": 30, "width": 40},
            ],
            None,
            r"ann\.json: image file_name '1\.jpg' is used 2 times",
        ),
        (
            None,
            [
                {"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
                {"id": 7, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5]},
            ],
            r"ann\.json: annotation id 7 is used 2 times",
        ),
    ],
)
def test_coco_duplicates_are_errors(tmp_path, images, annotations, message):
    json_file, image_root = _coco(tmp_path, images, annotations)
    with pytest.raises(DatasetValidationError, match=message):
        register_coco_json(_name(), json_file, image_root)


# ---- Instance masks ------------------------------------------------------------------------------


def _ann(segmentation) -> list[dict]:
    return [
        {
            "id": 42,
            "image_id": 1,
            "category_id": 1,
            "bbox": [1, 1, 10, 10],
            "iscrowd": 0,
            "segmentation": segmentation,
        }
    ]


@pytest.mark.parametrize(
    ("segmentation", "message"),
    [
        ([[1, 1, 10, 1]], r"polygon 0 has 4 coordinates \(need an even number, at least 6"),
        ([[1, 1, 10, 1, 10, 10, 3]], r"polygon 0 has 7 coordinates"),
        (
            {"size": [20, 40], "counts": [0, 800]},
            r"RLE mask size \[20, 40\] is not the .*\[30, 40\]",
        ),
        ([[1, 1, 5, 1, 9, 1]], r"mask is empty"),  # three collinear points
        ({"size": [30, 40], "counts": [1200]}, r"mask is empty"),
    ],
)
def test_bad_masks_name_file_and_annotation_id(tmp_path, segmentation, message):
    json_file, image_root = _coco(tmp_path, annotations=_ann(segmentation))
    with pytest.raises(DatasetValidationError, match=r"ann\.json: annotations\[0\] \(id 42\): "):
        validate_coco_json(json_file, image_root)
    with pytest.raises(DatasetValidationError, match=message):
        register_coco_json(_name(), json_file, image_root)


def test_good_masks_pass(tmp_path):
    polygon = [[1, 1, 11, 1, 11, 11, 1, 11]]
    rle = {"size": [30, 40], "counts": [41, 10, 1149]}  # column-major: 10 px of column 1
    for k, segm in enumerate((polygon, rle)):
        json_file, image_root = _coco(tmp_path / str(k), annotations=_ann(segm))
        name = _name()
        register_coco_json(name, json_file, image_root)
        assert DatasetCatalog.get(name)[0]["annotations"][0]["segmentation"]


# ---- Image files ---------------------------------------------------------------------------------


def _gray16(path: Path) -> np.ndarray:
    values = np.array([[0, 128, 257, 1000], [30000, 65279, 65535, 40000]], dtype=np.uint16)
    values = np.repeat(np.repeat(values, 8, axis=0), 8, axis=1)  # 32 x 16 px
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(v / 257)


def test_16bit_png_is_scaled_not_saturated_in_every_loader(tmp_path):
    folder = tmp_path / "cls" / "circle"
    folder.mkdir(parents=True)
    expected = _gray16(folder / "g.png")
    rgb = np.repeat(expected[..., None], 3, axis=2)
    assert expected.max() == 255 and expected.min() == 0 and 0 < expected.mean() < 255
    # The bug it replaces: PIL's own conversion clips to white.
    assert (np.asarray(Image.open(folder / "g.png").convert("L")) == 255).mean() > 0.5
    np.testing.assert_array_equal(np.asarray(read_rgb(folder / "g.png")), rgb)
    np.testing.assert_array_equal(read_image_array(folder / "g.png", "BGR"), rgb)
    np.testing.assert_array_equal(np.asarray(UnlabeledImages([folder / "g.png"])[0]), rgb)
    image, _ = ImageFolderDataset(tmp_path / "cls")[0]
    np.testing.assert_array_equal(np.asarray(image), rgb)
    cfg = add_bissl_config(get_cfg())
    cfg.INPUT.FORMAT, cfg.INPUT.MIN_SIZE_TEST = "RGB", 0  # no resize
    record = {"file_name": str(folder / "g.png"), "height": 16, "width": 32, "image_id": 0}
    out = DetectionMapper(cfg, is_train=False)(record)["image"]
    np.testing.assert_array_equal(out.permute(1, 2, 0).numpy(), rgb)


def test_detection_mapper_equals_detectron2s_on_8bit_images(tmp_path):
    path = tmp_path / "x.jpg"
    _noise(48, 40).save(path)
    cfg = add_bissl_config(get_cfg())
    cfg.INPUT.FORMAT = "RGB"
    record = {
        "file_name": str(path),
        "height": 40,
        "width": 48,
        "image_id": 0,
        "annotations": [{"bbox": [2.0, 3.0, 20.0, 30.0], "bbox_mode": 0, "category_id": 1}],
    }
    for is_train, seed in ((True, 0), (True, 1), (False, 0)):  # flipped and not (seeds 0, 1)
        np.random.seed(seed)  # detectron2's augmentations draw from numpy
        ours = DetectionMapper(cfg, is_train=is_train)(record)
        np.random.seed(seed)
        theirs = DatasetMapper(cfg, is_train=is_train)(record)
        assert torch.equal(ours["image"], theirs["image"])
        if is_train:
            assert torch.equal(
                ours["instances"].gt_boxes.tensor, theirs["instances"].gt_boxes.tensor
            )


def test_unscalable_modes_are_refused_with_the_path(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(np.ones((8, 8), dtype=np.float32)).save(path)
    with pytest.raises(ImageReadError, match=rf"{path}' has mode 'F'"):
        read_rgb(path)


@pytest.mark.parametrize("limit", ["100", "300"])  # PIL raises past 2x its limit, warns below
def test_decompression_bomb_is_an_error_naming_path_limit_and_fix(tmp_path, monkeypatch, limit):
    path = tmp_path / "big.png"
    _noise(20, 20).save(path)  # 400 pixels
    monkeypatch.setenv(MAX_PIXELS_ENV, limit)
    with pytest.raises(ImageTooLargeError) as err:
        read_rgb(path)
    text = str(err.value)
    assert str(path) in text and f"limit is {limit} pixels" in text and MAX_PIXELS_ENV in text
    # Not skipped as a corrupt file by the pretext loader: the fix is a setting.
    with pytest.raises(ImageTooLargeError):
        UnlabeledImages([path, path])[0]
    monkeypatch.setenv(MAX_PIXELS_ENV, "0")  # no limit
    assert read_rgb(path).size == (20, 20)


def test_truncated_image_is_named_by_every_loader(tmp_path):
    path = tmp_path / "cls" / "circle" / "t.jpg"
    path.parent.mkdir(parents=True)
    _noise(64, 64).save(path, quality=95)
    _truncate(path)
    with pytest.raises(ImageReadError, match=rf"{path}' cannot be decoded.*truncated"):
        read_rgb(path)
    dataset = ImageFolderDataset(tmp_path / "cls")
    with pytest.raises(ImageReadError, match=str(path)):
        dataset[0]
    cfg = add_bissl_config(get_cfg())
    cfg.INPUT.FORMAT = "RGB"
    record = {"file_name": str(path), "height": 64, "width": 64, "image_id": 0, "annotations": []}
    with pytest.raises(ImageReadError, match=str(path)):
        DetectionMapper(cfg, is_train=True)(record)


# ---- Start-up validation: test splits like train splits ------------------------------------------


def test_truncated_test_image_fails_at_start_up(tmp_path):
    root = _voc(tmp_path, GOOD, {"train": ["a", "c"], "test": ["b", "d"]})
    _truncate(root / "JPEGImages" / "b.jpg")
    with pytest.raises(
        DatasetValidationError, match=r"(?s)images decoded.*b\.jpg' cannot be decoded"
    ):
        register_from_config(_voc_cfg(root))
    register_from_config(_voc_cfg(root, mode="header"))  # the header alone is intact
    with pytest.raises(DatasetValidationError, match=r"b\.jpg' cannot be decoded"):
        register_from_config(_voc_cfg(root, train="test", test="train", mode="decode_all"))


def test_float_coordinate_in_test_split_fails_at_start_up(tmp_path):
    root = _voc(
        tmp_path, {**GOOD, "e": (2.5, 2, 20, 20)}, {"train": ["a", "c"], "test": ["b", "e"]}
    )
    with pytest.raises(DatasetValidationError) as err:
        register_from_config(_voc_cfg(root))
    assert str(root / "Annotations" / "e.xml") in str(err.value)
    assert "not on integer pixel indices" in str(err.value)


def test_start_up_lists_the_first_few_offending_files(tmp_path):
    boxes = {f"{i:02d}": (0, 2, 20, 20) for i in range(8)}
    root = _voc(tmp_path, boxes, {"train": list(boxes), "test": list(boxes)})
    with pytest.raises(DatasetValidationError) as err:
        register_from_config(_voc_cfg(root))
    text = str(err.value)
    assert "8 problem(s)" in text and "(and 3 more)" in text
    assert all(f"{i:02d}.xml" in text for i in range(5)) and "07.xml" not in text


def test_image_size_differing_from_its_annotation_fails_at_start_up(tmp_path):
    root = _voc(tmp_path, GOOD, {"train": ["a", "c"], "test": ["b", "d"]})
    _noise(41, 30).save(root / "JPEGImages" / "a.jpg")
    with pytest.raises(DatasetValidationError, match=r"a\.jpg' is 41x30, but its annotation"):
        register_from_config(_voc_cfg(root, mode="header"))


# ---- Downstream-task registry --------------------------------------------------------------------


def test_unknown_upper_architecture_lists_the_registered_ones():
    cfg = add_bissl_config(get_cfg())
    cfg.MODEL.META_ARCHITECTURE = "BiSSL"
    cfg.MODEL.BISSL.UPPER_META_ARCHITECTURE = "RetinaNet"
    with pytest.raises(ValueError, match=r"'RetinaNet' has no downstream task.*GeneralizedRCNN"):
        downstream_task(cfg)
    assert {"GeneralizedRCNN", "ResNetClassifier"} <= set(registered_downstream_tasks())
    cfg.MODEL.META_ARCHITECTURE = "SomePretextModel"  # not BiSSL, no task: nothing to check
    assert downstream_task(cfg, required=False) is None


def test_truncated_classification_test_image_fails_at_start_up(tmp_path):
    for split in ("train", "test"):
        for cls in CLASSES:
            (tmp_path / split / cls).mkdir(parents=True)
            _noise(32, 32).save(tmp_path / split / cls / "0.jpg")
    bad = tmp_path / "test" / "square" / "0.jpg"
    _noise(64, 64).save(bad, quality=95)
    _truncate(bad)
    cfg = add_bissl_config(get_cfg())
    cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.CLASSIFIER.NUM_CLASSES = "ResNetClassifier", 2
    cfg.INPUT.FORMAT, cfg.CLS.TRAIN_ROOT, cfg.CLS.TEST_ROOT = "RGB", str(tmp_path / "train"), ""
    register_from_config(cfg)  # the training folder alone is fine
    cfg.CLS.TEST_ROOT = str(tmp_path / "test")
    with pytest.raises(DatasetValidationError, match=rf"(?s)CLS\.TEST_ROOT.*{bad}' cannot be"):
        register_from_config(cfg)


def test_mask_rcnn_on_data_it_cannot_read_fails_at_start_up(tmp_path):
    rle = {"size": [30, 40], "counts": [41, 10, 1149]}
    json_file, image_root = _coco(tmp_path, annotations=_ann(rle))
    cfg = add_bissl_config(get_cfg())
    entry = {
        "NAME": _name(),
        "FORMAT": "coco",
        "JSON": str(json_file),
        "IMAGE_ROOT": str(image_root),
    }
    cfg.merge_from_list(["DATASETS.CUSTOM", str([entry]), "MODEL.MASK_ON", "True"])
    cfg.DATASETS.TRAIN = (entry["NAME"],)
    with pytest.raises(ValueError, match=r"has RLE masks .* set INPUT.MASK_FORMAT to 'bitmask'"):
        register_from_config(cfg)
    cfg.INPUT.MASK_FORMAT = "bitmask"
    register_from_config(cfg)
    boxes_only, _ = _coco(tmp_path / "boxes")
    entry = {**entry, "NAME": _name(), "JSON": str(boxes_only)}
    cfg.DATASETS.CUSTOM, cfg.DATASETS.TRAIN = [entry], (entry["NAME"],)
    with pytest.raises(ValueError, match=r"MODEL.MASK_ON is set, but dataset .* without a mask"):
        register_from_config(cfg)


def test_16bit_png_opened_as_mode_i_is_scaled_too(tmp_path, monkeypatch):
    """Older Pillow opens 16-bit grayscale PNGs as mode "I": scaled the same, not refused."""
    path = tmp_path / "g.png"
    expected = _gray16(path)
    real_open = Image.open

    def open_as_mode_i(*args, **kwargs):
        image = real_open(*args, **kwargs)
        if image.mode == "I;16":  # what Pillow < 10 gives
            image.load()
            converted = image.convert("I")
            converted.format = image.format
            return converted
        return image

    monkeypatch.setattr(Image, "open", open_as_mode_i)
    np.testing.assert_array_equal(np.asarray(read_rgb(path))[..., 0], expected)
