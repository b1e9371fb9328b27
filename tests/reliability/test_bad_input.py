"""Bad input fails before any long work, with a message naming the file, key or value.

Data and config errors go through the tools' own set-up path (``bissl_det.runtime.setup.setup``).
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
from collections import namedtuple
from pathlib import Path

import bissl_det  # noqa: F401  (shims before detectron2)
from bissl_det.checkpoint import UntrustedCheckpointError, save_backbone_checkpoint
from bissl_det.data.detection import DatasetValidationError
from tests.helpers import TINY_C4, tiny_config

import pytest
import torch
from PIL import Image

CLASSES = ["circle", "square", "triangle", "cross"]


def _setup(config_file: Path, *opts: str):
    """What every tool runs first: detectron2's argument parser, then setup(args)."""
    from bissl_det.runtime.setup import setup

    from detectron2.engine import default_argument_parser

    args = default_argument_parser().parse_args(["--config-file", str(config_file), *opts])
    return setup(args)


def _leaf_config(path: Path, body: str) -> Path:
    """A 5-line leaf config on top of the tiny test config."""
    path.write_text(f'_BASE_: "{TINY_C4}"\n{body}')
    return path


def _voc_config(tmp_path: Path, root: Path, name: str, split: str = "trainval") -> Path:
    return _leaf_config(
        tmp_path / f"{name}.yaml",
        f"""DATASETS:
  CUSTOM:
    - {{NAME: {name}, FORMAT: voc, ROOT: "{root}", SPLIT: {split}, CLASSES: {CLASSES}}}
  TRAIN: ("{name}",)
  TEST: ()
BISSL:
  PRETEXT_DATA:
    DATASETS: ["{name}"]
OUTPUT_DIR: "{tmp_path / "out"}"
""",
    )


@pytest.fixture
def voc(demo_workdir, tmp_path) -> Path:
    """A private copy of the demo VOC folder, free to break."""
    root = tmp_path / "voc"
    shutil.copytree(demo_workdir / "datasets" / "demo" / "voc", root)
    return root


def _first_id(root: Path) -> str:
    return (root / "ImageSets" / "Main" / "trainval.txt").read_text().split()[0]


# ---- Data sets -----------------------------------------------------------------------------------


def test_missing_dataset_folder(tmp_path):
    cfg_file = _voc_config(tmp_path, tmp_path / "no_such_voc", "bad_missing_root")
    with pytest.raises(DatasetValidationError, match=r"DATASETS\.CUSTOM\[0\].*no_such_voc"):
        _setup(cfg_file)


def test_missing_split_file(voc, tmp_path):
    cfg_file = _voc_config(tmp_path, voc, "bad_split", split="trainvall")
    with pytest.raises(DatasetValidationError, match=r"split file .*trainvall\.txt.* is missing"):
        _setup(cfg_file)


def test_missing_annotation_file(voc, tmp_path):
    anno = voc / "Annotations" / f"{_first_id(voc)}.xml"
    anno.unlink()
    with pytest.raises(DatasetValidationError, match="annotation file") as err:
        _setup(_voc_config(tmp_path, voc, "bad_missing_xml"))
    assert str(anno) in str(err.value) and "is missing" in str(err.value)


def test_empty_annotation_file(voc, tmp_path):
    anno = voc / "Annotations" / f"{_first_id(voc)}.xml"
    anno.write_text("")
    with pytest.raises(DatasetValidationError, match="is empty") as err:
        _setup(_voc_config(tmp_path, voc, "bad_empty_xml"))
    assert str(anno) in str(err.value)


def test_empty_coco_json(voc, tmp_path):
    (tmp_path / "empty.json").write_text("")
    cfg_file = _leaf_config(
        tmp_path / "coco.yaml",
        f"""DATASETS:
  CUSTOM:
    - {{NAME: bad_empty_coco, FORMAT: coco, JSON: "{tmp_path / "empty.json"}",
       IMAGE_ROOT: "{voc / "JPEGImages"}"}}
  TRAIN: ("bad_empty_coco",)
""",
    )
    with pytest.raises(DatasetValidationError, match=r"COCO JSON file .*empty\.json.* is empty"):
        _setup(cfg_file)


@pytest.mark.parametrize(
    ("box", "problem"),
    [((10, 10, 70, 20), "lies outside the 64x64 image"), ((30, 10, 29, 20), "zero or negative")],
)
def test_bad_boxes_are_rejected_not_clipped(voc, tmp_path, box, problem):
    anno = voc / "Annotations" / f"{_first_id(voc)}.xml"
    text = anno.read_text()
    start, end = text.index("<bndbox>"), text.index("</bndbox>")
    coords = "".join(
        f"<{tag}>{v}</{tag}>" for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True)
    )
    anno.write_text(text[:start] + f"<bndbox>{coords}" + text[end:])
    name = f"bad_box_{box[2]}"
    with pytest.raises(DatasetValidationError, match=problem) as err:
        _setup(_voc_config(tmp_path, voc, name))
    message = str(err.value)
    assert str(anno) in message and str(tuple(float(v) for v in box)) in message


def test_class_count_mismatch_detection(in_demo_workdir, tmp_path):
    with pytest.raises(ValueError, match="MODEL.ROI_HEADS.NUM_CLASSES = 3") as err:
        _setup(TINY_C4, "MODEL.ROI_HEADS.NUM_CLASSES", "3", "OUTPUT_DIR", str(tmp_path / "o"))
    assert "'demo_voc_trainval' has 4 classes" in str(err.value)
    assert not (tmp_path / "o").exists(), "the check must come before anything is written"


def test_class_count_mismatch_classification(in_demo_workdir, tmp_path):
    from bissl_det.data.build import check_num_classes

    cls_config = TINY_C4.parent / "bissl_simclr_cls_demo.yaml"
    cfg = tiny_config(cls_config, tmp_path)
    n = check_num_classes(cfg)
    assert n == cfg.MODEL.CLASSIFIER.NUM_CLASSES
    wrong = tiny_config(cls_config, tmp_path, "MODEL.CLASSIFIER.NUM_CLASSES", str(n + 1))
    with pytest.raises(ValueError, match=rf"NUM_CLASSES = {n + 1}, but CLS.TRAIN_ROOT .* has {n}"):
        check_num_classes(wrong)


def test_pretext_images_undecodable_are_skipped_then_fail(in_demo_workdir, tmp_path, caplog):
    from bissl_det.data.build import build_pretext_loader

    folder = tmp_path / "ssl"
    folder.mkdir()
    for k in range(10):
        Image.new("RGB", (40, 40), (25 * k, 0, 0)).save(folder / f"good{k}.png")
    (folder / "bad0.jpg").write_bytes(b"not a jpeg")
    opts = ["BISSL.PRETEXT_DATA.IMAGE_ROOTS", f"['{folder}']", "BISSL.PRETEXT_DATA.DATASETS", "[]"]

    # 11 images at MAX_BAD_FRACTION 0.1: one bad file is tolerated, skipped and counted.
    cfg = tiny_config(TINY_C4, tmp_path / "o", *opts, "BISSL.PRETEXT_DATA.MAX_BAD_FRACTION", "0.1")
    loader = build_pretext_loader(cfg, 8)
    batches = iter(loader)
    with caplog.at_level(logging.WARNING, logger="bissl_det"):
        for _ in range(3):  # 24 draws: the whole first epoch and more
            view1, view2 = next(batches)
            assert view1.pixels.shape == view2.pixels.shape == (8, 3, 32, 32)
    assert loader.dataset.bad_files == [folder / "bad0.jpg"]
    assert any(str(folder / "bad0.jpg") in r.getMessage() for r in caplog.records)

    # A second bad file is past the limit: a broken dataset, not a stray file.
    (folder / "bad1.jpg").write_bytes(b"\xff\xd8\xff truncated")
    batches = iter(build_pretext_loader(cfg, 8))
    with pytest.raises(RuntimeError, match=r"2 of 12 images failed to decode.*bad0\.jpg.*bad1"):
        for _ in range(3):
            next(batches)


def test_pretext_dataset_without_images(in_demo_workdir, tmp_path):
    from bissl_det.data.build import build_pretext_loader

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    roots = "BISSL.PRETEXT_DATA.IMAGE_ROOTS"
    cfg = tiny_config(
        TINY_C4, tmp_path / "o", roots, f"['{empty}']", "BISSL.PRETEXT_DATA.DATASETS", "[]"
    )
    with pytest.raises(ValueError, match=rf"{empty}: no images"):
        build_pretext_loader(cfg, 8)
    cfg = tiny_config(TINY_C4, tmp_path / "o", roots, f"['{tmp_path / 'nope'}']")
    with pytest.raises(FileNotFoundError, match="image folder not found: .*nope"):
        build_pretext_loader(cfg, 8)
    cfg = tiny_config(TINY_C4, tmp_path / "o", roots, "[]", "BISSL.PRETEXT_DATA.DATASETS", "[]")
    with pytest.raises(ValueError, match="BISSL.PRETEXT_DATA: no pretext images"):
        build_pretext_loader(cfg, 8)


def test_detection_image_undecodable_fails_naming_the_file(voc, tmp_path, monkeypatch):
    """Policy: labelled images are never skipped; the first read of a corrupt one is an error."""
    from bissl_det.data.build import build_downstream_train_loader

    bad = voc / "JPEGImages" / f"{_first_id(voc)}.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    monkeypatch.chdir(tmp_path)
    # Start-up validation may find it first (header checks); else the loader's first read.
    with pytest.raises(Exception) as err:  # noqa: PT011  (the type is PIL's; the text matters)
        cfg = tiny_config(_voc_config(tmp_path, voc, "bad_jpeg"), tmp_path / "o")
        batches = iter(build_downstream_train_loader(cfg, 2))
        for _ in range(20):  # 40 draws > the 12 trainval images
            next(batches)
    assert str(bad) in str(err.value)


# ---- Config --------------------------------------------------------------------------------------


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    cfg_file = _leaf_config(tmp_path / "typo.yaml", "BISSL:\n  STAGEZ: 3\n")
    with pytest.raises(KeyError) as err:
        _setup(cfg_file)
    assert str(cfg_file) in str(err.value) and "BISSL.STAGEZ" in str(err.value)


def test_unknown_or_mistyped_override(tmp_path):
    from bissl_det.runtime.setup import load_config

    with pytest.raises(KeyError, match=r"command-line override.*BISSL\.LAMDA"):
        load_config(str(TINY_C4), ["BISSL.LAMDA", "0.01"])
    with pytest.raises(ValueError, match=r"BISSL\.STAGES") as err:
        load_config(str(TINY_C4), ["BISSL.STAGES", "ten"])
    assert "ten" in str(err.value)
    with pytest.raises(FileNotFoundError, match="config file not found: .*nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


# ---- Checkpoints ---------------------------------------------------------------------------------


@pytest.fixture
def tiny_model(in_demo_workdir, tmp_path):
    from detectron2.modeling import build_model

    return build_model(tiny_config(TINY_C4, tmp_path / "o"))


def test_checkpoint_with_other_keys_lists_them(tiny_model, tmp_path):
    from bissl_det.checkpoint import load_pretext_checkpoint

    sd = dict(tiny_model.lower_backbone.state_dict())
    del sd["res4.0.conv1.weight"]
    sd["res4.9.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "other.pth"
    save_backbone_checkpoint(path, sd)
    with pytest.raises(KeyError) as err:
        load_pretext_checkpoint(tiny_model, str(path), "simclr")
    message = str(err.value)
    assert str(path) in message
    assert "missing keys ['res4.0.conv1.weight']" in message
    assert "unexpected keys ['res4.9.conv1.weight']" in message


def test_checkpoint_of_a_wider_backbone_lists_shapes(in_demo_workdir, tiny_model, tmp_path):
    from bissl_det.checkpoint import load_pretext_checkpoint

    from detectron2.modeling import build_model

    wide = build_model(tiny_config(TINY_C4, tmp_path / "o", "MODEL.RESNETS.WIDTH_PER_GROUP", "16"))
    path = tmp_path / "wide.pth"
    save_backbone_checkpoint(path, wide.lower_backbone.state_dict())
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with pytest.raises(ValueError, match="backbone shapes do not match MODEL.RESNETS") as err:
        load_pretext_checkpoint(tiny_model, str(path), "simclr")
    assert str(path) in str(err.value)
    assert re.search(r"res2\.\S+: \(16,\) in the file, \(8,\) in the model", str(err.value))
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())


def test_pickled_checkpoint_is_refused_by_default(tiny_model, tmp_path):
    from bissl_det.checkpoint import load_pretext_checkpoint

    path = tmp_path / "lightning_style.ckpt"
    sd = tiny_model.lower_backbone.state_dict()
    torch.save({"state_dict": sd, "hyper_parameters": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(UntrustedCheckpointError, match="trust_pickle") as err:
        load_pretext_checkpoint(tiny_model, str(path), "simclr")
    assert str(path) in str(err.value) and "argparse.Namespace" in str(err.value)


# ---- OUTPUT_DIR ----------------------------------------------------------------------------------


def test_output_dir_that_cannot_be_created(in_demo_workdir, tmp_path):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "run"
    with pytest.raises(OSError, match=rf"OUTPUT_DIR {out} cannot be created"):
        _setup(TINY_C4, "OUTPUT_DIR", str(out))


def test_unwritable_output_dir(tmp_path, monkeypatch):
    from bissl_det.runtime import setup as setup_module

    # Tests may run as root, for whom chmod does not block writes: ask os.access to say no.
    monkeypatch.setattr(setup_module.os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match=rf"OUTPUT_DIR {tmp_path} is not writable"):
        setup_module.check_output_dir(str(tmp_path))


def test_disk_nearly_full(tmp_path, monkeypatch):
    from bissl_det.runtime import setup as setup_module

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(
        setup_module.shutil, "disk_usage", lambda path: usage(100 << 30, 100 << 30, 5 << 20)
    )
    with pytest.raises(OSError, match=rf"OUTPUT_DIR {tmp_path}: only 5 MiB free .* 1024 MiB"):
        setup_module.check_output_dir(str(tmp_path))
    setup_module.check_output_dir(str(tmp_path), min_free_bytes=1 << 20)  # enough for this one


def test_unregistered_pretext_set_names_its_key_and_file(tmp_path, in_demo_workdir):
    """The issue's error: a set named by BISSL.PRETEXT_DATA.DATASETS in a _BASE_ file."""
    from bissl_det.data.detection import DatasetValidationError

    base = _leaf_config(
        tmp_path / "base.yaml",
        'BISSL:\n  PRETEXT_DATA:\n    DATASETS: ["nowhere_trainval"]\n'
        f'OUTPUT_DIR: "{tmp_path / "out"}"\n',
    )
    leaf = tmp_path / "leaf.yaml"
    leaf.write_text(f'_BASE_: "{base}"\nSEED: 3\n')
    with pytest.raises(DatasetValidationError) as err:
        _setup(leaf)  # no tool named: every set in use is validated
    message = str(err.value)
    assert message.startswith(
        f"BISSL.PRETEXT_DATA.DATASETS = ['nowhere_trainval'] (set in {leaf} (via _BASE_ {base})):"
    )
    assert "'nowhere_trainval' is not registered" in message
    # A fine-tuning run does not read the pretext sets: the same config starts.
    from bissl_det.runtime.setup import setup

    from detectron2.engine import default_argument_parser

    args = default_argument_parser().parse_args(
        ["--config-file", str(leaf), "MODEL.META_ARCHITECTURE", "GeneralizedRCNN"]
    )
    cfg = setup(args, tool="finetune_det")
    assert list(cfg.BISSL.PRETEXT_DATA.DATASETS) == ["nowhere_trainval"]
