"""Classification data sets: ImageFolder, VOC07 multi-label targets, transforms."""

from pathlib import Path

import bissl_det  # noqa: F401  (shims before detectron2)
from bissl_det.data.classification import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    VOC07MultiLabelDataset,
    classification_transforms,
)
from bissl_det.data.detection import DatasetValidationError

import numpy as np
import pytest
import torch
from PIL import Image

CLASSES = ["circle", "square", "triangle"]


def _folder(root: Path, counts: dict[str, int], size=(20, 16)) -> Path:
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", size, color=(10 * i, 0, 0)).save(root / cls / f"{i}.png")
    return root


def test_image_folder_sorted_classes_and_counts(tmp_path):
    root = _folder(tmp_path, {"square": 2, "circle": 3, "triangle": 1})
    (tmp_path / "circle" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(root, transform=None)
    assert ds.classes == ["circle", "square", "triangle"]
    assert ds.class_counts() == [3, 2, 1]
    assert len(ds) == 6 and ds.targets == [0, 0, 0, 1, 1, 2]
    image, target = ds[3]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and target == 1
    # A given class order is kept (e.g. the train order applied to the test split).
    ds = ImageFolderDataset(
        root,
        transform=classification_transforms(False, 8),
        classes=["triangle", "circle", "square"],
    )
    assert ds.class_counts() == [1, 3, 2]
    image, target = ds[0]
    assert image.shape == (3, 8, 8) and target == 0


def test_image_folder_errors_name_folders(tmp_path):
    root = _folder(tmp_path / "a", {"circle": 1, "square": 1})
    with pytest.raises(
        DatasetValidationError,
        match=r"missing folders: \['cross'\], unexpected "
        r"folders: \['square'\]",
    ):
        ImageFolderDataset(root, None, classes=["circle", "cross"])
    (root / "empty").mkdir()
    with pytest.raises(
        DatasetValidationError, match=r"class folder\(s\) \['.*a/empty'\] have no images"
    ):
        ImageFolderDataset(root, None)
    (tmp_path / "b").mkdir()
    with pytest.raises(DatasetValidationError, match=r"'.*b' has no class sub-folders"):
        ImageFolderDataset(tmp_path / "b", None)
    with pytest.raises(DatasetValidationError, match=r"image folder 'nowhere' does not exist"):
        ImageFolderDataset("nowhere", None)


def _voc_xml(objects) -> str:
    body = "".join(
        f"<object><name>{n}</name><pose>U</pose><truncated>0</truncated><difficult>{d}"
        f"</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox>"
        "</object>"
        for n, d in objects
    )
    return f"<annotation><size><width>8</width><height>8</height></size>{body}</annotation>"


def test_voc07_multilabel_targets(tmp_path):
    annotations = {
        # circle present; square only difficult -> ignore; triangle absent
        "a": [("circle", 0), ("square", 1)],
        # square both difficult and not -> present
        "b": [("square", 1), ("square", 0), ("triangle", 0)],
        "c": [],
    }
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (tmp_path / sub).mkdir(parents=True)
    for image_id, objects in annotations.items():
        (tmp_path / "Annotations" / f"{image_id}.xml").write_text(_voc_xml(objects))
        Image.new("RGB", (8, 8)).save(tmp_path / "JPEGImages" / f"{image_id}.jpg")
    (tmp_path / "ImageSets" / "Main" / "test.txt").write_text("a\nb\nc\n")
    ds = VOC07MultiLabelDataset(tmp_path, "test", CLASSES, transform=None)
    expected = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    assert torch.equal(ds.targets, expected)
    image, target = ds[1]
    assert image.size == (8, 8) and torch.equal(target, expected[1])
    with pytest.raises(DatasetValidationError, match=r"a\.xml: object 0 has class 'circle'"):
        VOC07MultiLabelDataset(tmp_path, "test", ["square", "triangle"])


def test_voc07_multilabel_on_demo_data(tmp_path):
    from bissl_det.data.demo import make_demo_data

    info = make_demo_data(
        tmp_path, seed=0, num_train=4, num_test=2, image_size=48, num_cls_train=4, num_cls_test=4
    )
    ds = VOC07MultiLabelDataset(
        tmp_path / "voc", "trainval", info["class_names"], classification_transforms(True, 32)
    )
    assert len(ds) == 4 and ds.targets.shape == (4, 4)
    # Every demo image holds 1-4 objects, so each row marks at least one class 1 or -1.
    assert set(ds.targets.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert (ds.targets != 0).any(dim=1).all()
    image, target = ds[0]
    assert image.shape == (3, 32, 32) and target.shape == (4,)
    cls = ImageFolderDataset(tmp_path / "cls" / "test", None, classes=info["class_names"])
    assert cls.class_counts() == [1, 1, 1, 1]


def test_transforms_shapes_and_normalisation():
    # A constant image normalises to the closed form (value - mean) / std per channel.
    image = Image.new("RGB", (50, 40), color=(255, 128, 0))
    expected = (np.array([255, 128, 0]) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    for train in (True, False):
        out = classification_transforms(train, 24)(image)
        assert out.shape == (3, 24, 24)
        np.testing.assert_allclose(out.mean(dim=(1, 2)).numpy(), expected, atol=1e-5)
    # Test geometry, closed form: a 64x32 horizontal ramp (pixel x has value 4x) is resized to
    # 54x27 (short side round(24 / 0.875) = 27), then columns 15..38 are centre-cropped. Resized
    # column j samples x = (j + 0.5) * 64 / 54 - 0.5, and a linear ramp stays linear.
    ramp = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (32, 1))).convert("RGB")
    test_tf = classification_transforms(False, 24, mean=(0, 0, 0), std=(1, 1, 1))
    out = test_tf(ramp)
    assert torch.equal(out, test_tf(ramp))
    x = (np.arange(15, 39) + 0.5) * 64 / 54 - 0.5
    for row in (0, 23):
        np.testing.assert_allclose(out[0, row].numpy() * 255, 4 * x, atol=1.0)
    with pytest.raises(ValueError, match="size=0"):
        classification_transforms(True, 0)


def test_training_crop_scale_comes_from_the_argument():
    # CLS.CROP_SCALE reaches RandomResizedCrop: with scale (1, 1) and aspect 3/4..4/3 on a square
    # image, the crop is the whole image; the default 0.08..1 crops smaller areas.
    ramp = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))).convert("RGB")
    torch.manual_seed(0)
    whole = classification_transforms(True, 64, (0, 0, 0), (1, 1, 1), crop_scale=(1.0, 1.0))
    spans = {round(float(np.ptp(whole(ramp)[0, 0].numpy())) * 255) for _ in range(10)}
    assert spans == {252}  # every crop spans the full ramp 0..252
    default = classification_transforms(True, 64, (0, 0, 0), (1, 1, 1))
    assert min(float(np.ptp(default(ramp)[0, 0].numpy())) * 255 for _ in range(10)) < 200
    with pytest.raises(ValueError, match="crop_scale"):
        classification_transforms(True, 64, crop_scale=(0.5, 0.2))
