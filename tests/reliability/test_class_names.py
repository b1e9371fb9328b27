"""Classes mean the same in every split and in the backbone: refused at start-up by the real
tool process otherwise, naming the file; nothing written before."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import bissl_det  # noqa: F401  (shims before detectron2)
from bissl_det.data.class_names import check_weights_classes
from bissl_det.data.validation import DatasetValidationError
from tests.helpers import REPO

import pytest

from .runs import run
from .test_safe_loading import TINY_FINETUNE

TIMEOUT = 240
CLASSES = ["circle", "square", "triangle", "cross"]


def _finetune(config: Path, cwd: Path):
    return run(
        [sys.executable, str(REPO / "tools" / "finetune_det.py"), "--config-file", str(config)],
        cwd,
        TIMEOUT,
    )


def _config(tmp_path: Path, datasets: str) -> Path:
    path = tmp_path / "leaf.yaml"
    path.write_text(
        f'_BASE_: "{TINY_FINETUNE}"\nDATASETS:\n{datasets}\nOUTPUT_DIR: "{tmp_path / "out"}"\n'
    )
    return path


def _refused(done, *needles: str, out: Path) -> None:
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    for needle in needles:
        assert needle in output, f"{needle!r} not in {output[-3000:]}"
    assert not (out / "run.json").exists() and not (out / "config.yaml").exists()


@pytest.fixture
def coco(demo_workdir, tmp_path) -> Path:
    folder = tmp_path / "coco"
    shutil.copytree(demo_workdir / "datasets" / "demo" / "coco", folder)
    return folder


def _coco_datasets(coco: Path, demo_workdir: Path, test_json: str) -> str:
    images = demo_workdir / "datasets" / "demo" / "voc" / "JPEGImages"
    return (
        "  CUSTOM:\n"
        f'    - {{NAME: c_train, FORMAT: coco, JSON: "{coco / "instances_trainval.json"}", '
        f'IMAGE_ROOT: "{images}"}}\n'
        f'    - {{NAME: c_test, FORMAT: coco, JSON: "{coco / test_json}", '
        f'IMAGE_ROOT: "{images}"}}\n'
        '  TRAIN: ("c_train",)\n  TEST: ("c_test",)'
    )


@pytest.mark.e2e
def test_coco_test_set_with_other_category_ids_is_refused(demo_workdir, tmp_path, coco):
    data = json.loads((coco / "instances_test.json").read_text())
    swap = {1: 2, 2: 1}  # same images and boxes; circle and square swap their ids
    for category in data["categories"]:
        category["id"] = swap.get(category["id"], category["id"])
    for annotation in data["annotations"]:
        annotation["category_id"] = swap.get(annotation["category_id"], annotation["category_id"])
    (coco / "reordered.json").write_text(json.dumps(data))
    config = _config(tmp_path, _coco_datasets(coco, demo_workdir, "reordered.json"))
    done = _finetune(config, demo_workdir)
    _refused(
        done,
        str(coco / "reordered.json"),
        "the same class names in another order",
        str(["square", "circle", "triangle", "cross"]),
        out=tmp_path / "out",
    )


@pytest.mark.e2e
def test_coco_box_coordinates_given_as_strings_are_refused(demo_workdir, tmp_path, coco):
    data = json.loads((coco / "instances_test.json").read_text())
    data["annotations"][0]["bbox"] = [str(v) for v in data["annotations"][0]["bbox"]]
    (coco / "strings.json").write_text(json.dumps(data))
    config = _config(tmp_path, _coco_datasets(coco, demo_workdir, "strings.json"))
    done = _finetune(config, demo_workdir)
    _refused(done, str(coco / "strings.json"), "annotations[0]", "numbers", out=tmp_path / "out")


def _voc_datasets(root: Path, classes: list[str]) -> str:
    return (
        "  CUSTOM:\n"
        f'    - {{NAME: v_train, FORMAT: voc, ROOT: "{root}", SPLIT: trainval, '
        f"CLASSES: {classes}}}\n"
        f'    - {{NAME: v_test, FORMAT: voc, ROOT: "{root}", SPLIT: test, CLASSES: {CLASSES}}}\n'
        '  TRAIN: ("v_train",)\n  TEST: ("v_test",)'
    )


@pytest.fixture
def voc(demo_workdir, tmp_path) -> Path:
    root = tmp_path / "voc"
    shutil.copytree(demo_workdir / "datasets" / "demo" / "voc", root)
    return root


@pytest.mark.e2e
def test_voc_class_list_with_whitespace_is_refused(demo_workdir, tmp_path, voc):
    padded = ["circle ", *CLASSES[1:]]
    done = _finetune(_config(tmp_path, _voc_datasets(voc, padded)), demo_workdir)
    _refused(done, "surrounding whitespace", "'circle '", out=tmp_path / "out")


@pytest.mark.e2e
def test_voc_xml_class_name_with_whitespace_is_refused(demo_workdir, tmp_path, voc):
    first = (voc / "ImageSets" / "Main" / "trainval.txt").read_text().split()[0]
    xml = voc / "Annotations" / f"{first}.xml"
    text = xml.read_text()
    name = next(c for c in CLASSES if f"<name>{c}</name>" in text)
    xml.write_text(text.replace(f"<name>{name}</name>", f"<name> {name}\t</name>", 1))
    done = _finetune(_config(tmp_path, _voc_datasets(voc, CLASSES)), demo_workdir)
    _refused(done, str(xml), "surrounding whitespace", out=tmp_path / "out")


@pytest.mark.e2e
def test_voc_splits_with_classes_in_another_order_are_refused(demo_workdir, tmp_path, voc):
    reordered = [CLASSES[1], CLASSES[0], *CLASSES[2:]]
    done = _finetune(_config(tmp_path, _voc_datasets(voc, reordered)), demo_workdir)
    _refused(done, "v_test", "the same class names in another order", out=tmp_path / "out")


def test_finetuning_classes_are_checked_against_the_bissl_export():
    export = {"downstream_classes": CLASSES}
    check_weights_classes("w.pth", export, list(reversed(CLASSES)))  # order: no class head
    check_weights_classes("w.pth", {}, ["dog"])  # no record: nothing to compare
    with pytest.raises(DatasetValidationError, match=r"w\.pth was made by BiSSL.*\['dog'\]"):
        check_weights_classes("w.pth", export, ["dog"])
