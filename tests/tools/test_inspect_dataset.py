"""tools/inspect_dataset.py on the demo set, whose box sizes the generator fixes, and dense scenes.

make_demo_data.py draws 1-4 non-overlapping shapes per image, each of nominal side
U(0.1, 0.4) x the image side S, rotated by at most 25 degrees: a box is at least a 0.1 S triangle
(0.875 as high as wide) and at most a 0.4 S square turned 25 degrees (cos + sin = 1.33 x wider), and
its h/w stays within a factor 1.41 of 1 (squares, circles and crosses give square boxes).
"""

from __future__ import annotations

import importlib.util
import json
import math
import shlex

from bissl_det.data.inspect import (
    SplitBoxes,
    image_size_outliers,
    resize_scales,
    suggest_settings,
)
from bissl_det.data.inspect_cost import HeadCost
from bissl_det.runtime.setup import load_config
from tests.helpers import CONFIGS, REPO

import numpy as np
import pytest

DEMO_CFG = CONFIGS / "quick" / "finetune_C4_demo.yaml"
SIDE = 64  # image side of the conftest demo set
SCALES = (112 / SIDE, 128 / SIDE, 144 / SIDE)  # Base-demo-C4's MIN_SIZE_TRAIN, no MAX cap hit


def _tool():
    spec = importlib.util.spec_from_file_location(
        "inspect_dataset", REPO / "tools" / "inspect_dataset.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_report(demo_workdir, tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(demo_workdir)
        report = _tool().main(["--config-file", str(DEMO_CFG), "--out", str(out)])
    return report, out


def test_statistics_match_the_generators_sizes(demo_report, demo_workdir):
    report, out = demo_report
    info = json.loads((demo_workdir / "datasets" / "demo" / "demo_info.json").read_text())
    train, test = report["splits"]["demo_voc_trainval"], report["splits"]["demo_voc_test"]
    assert (train["role"], test["role"]) == ("train", "test")
    assert (train["images"], test["images"]) == (24, 8)
    assert train["class_counts"] == {
        k: v for k, v in info["detection"]["instances"]["trainval"].items() if v
    }
    assert train["boxes"] == sum(info["detection"]["instances"]["trainval"].values())
    per_image = train["boxes_per_image"]
    assert per_image["min"] >= 1 and per_image["max"] <= 4
    assert per_image["mean"] == pytest.approx(train["boxes"] / 24)

    size = train["box_sqrt_area_px"]
    low, high = 0.1 * SIDE * math.sqrt(0.875) - 1, 0.4 * SIDE * 1.33 + 2
    assert low <= size["original"]["min"] and size["original"]["max"] <= high
    assert 0.1 * SIDE < size["original"]["p50"] < 0.4 * SIDE
    # Square images, "choice" sampling: every box at every one of the three scales.
    assert size["train_resize"]["min"] == pytest.approx(SCALES[0] * size["original"]["min"])
    assert size["train_resize"]["max"] == pytest.approx(SCALES[-1] * size["original"]["max"])
    assert size["test_resize"]["p50"] == pytest.approx(2 * size["original"]["p50"])
    ratio = train["aspect_ratio_h_over_w"]
    assert 1 / math.sqrt(2) < ratio["min"] <= ratio["max"] < math.sqrt(2)
    assert train["most_common_image_sizes_wxh"] == {f"{SIDE}x{SIDE}": 24}
    assert (out / "dataset_histograms.png").stat().st_size > 1000
    assert json.loads((out / "dataset_stats.json").read_text()) == json.loads(json.dumps(report))


def test_suggestions_fit_the_demo_boxes(demo_report):
    report, _ = demo_report
    s = {x["key"]: x for x in report["suggestions"]}
    # Near-square boxes: one aspect ratio; C4: one list of powers of two.
    assert s["MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS"]["value"] == [[1.0]]
    sizes = s["MODEL.ANCHOR_GENERATOR.SIZES"]["value"]
    assert len(sizes) == 1 and all(b == 2 * a for a, b in zip(sizes[0], sizes[0][1:], strict=False))
    # Every box of the (possibly upscaled) training resize is within x1.41 of an anchor size.
    size = report["splits"]["demo_voc_trainval"]["box_sqrt_area_px"]["train_resize"]
    factor = s["INPUT.MIN_SIZE_TRAIN"]["value"][0] / 112
    for p in (size["p1"] * factor, size["p99"] * factor):
        assert min(abs(math.log2(p / a)) for a in sizes[0]) <= 0.5 + 0.1
    # At most 4 boxes per image: the demo's 20 detections and 50 proposals already suffice.
    assert (
        s["TEST.DETECTIONS_PER_IMAGE"]["value"] == 20
        and not s["TEST.DETECTIONS_PER_IMAGE"]["changes"]
    )
    assert s["MODEL.RPN.POST_NMS_TOPK_TEST"]["value"] == 50


def test_suggestions_are_valid_overrides_and_a_fixed_point(
    demo_workdir, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(demo_workdir)
    tool = _tool()
    tool.main(
        [
            "--config-file",
            str(DEMO_CFG),
            "--out",
            str(tmp_path / "a"),
            "TEST.DETECTIONS_PER_IMAGE",
            "5",
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    pasted = shlex.split(
        lines[lines.index("# Changed settings on one line (append to a tool's command):") + 1]
    )
    assert "TEST.DETECTIONS_PER_IMAGE" in pasted  # 5 < 2 x 4 boxes
    assert pasted[pasted.index("TEST.DETECTIONS_PER_IMAGE") + 1] == "10"
    cfg = load_config(str(DEMO_CFG), pasted)  # every pasted pair is a valid override
    assert cfg.TEST.DETECTIONS_PER_IMAGE == 10
    again = tool.main(["--config-file", str(DEMO_CFG), "--out", str(tmp_path / "b"), *pasted])
    assert [x["key"] for x in again["suggestions"] if x["changes"]] == []


def _dense_split(boxes_per_image: int, box_px: float, image_px: int = 400) -> SplitBoxes:
    images = 20
    return SplitBoxes(
        name="dense",
        image_hw=np.full((images, 2), float(image_px)),
        box_wh=np.full((images * boxes_per_image, 2), box_px),
        box_image=np.repeat(np.arange(images), boxes_per_image),
        box_class=np.zeros(images * boxes_per_image, dtype=np.int64),
        class_names=["thing"],
    )


def test_dense_small_objects_raise_counts_and_input_size():
    """The issue's case: one class, ~60 small objects per 400 px tile, CPU template caps."""
    cfg = load_config(
        str(DEMO_CFG),
        [
            "INPUT.MIN_SIZE_TRAIN",
            "(400,)",
            "INPUT.MIN_SIZE_TEST",
            "400",
            "INPUT.MAX_SIZE_TRAIN",
            "667",
        ],
    )
    split = _dense_split(60, 10.0)
    s = {x.key: x for x in suggest_settings([split], [split], cfg)}
    assert s["TEST.DETECTIONS_PER_IMAGE"].value == 120  # 2 x 60 (the template has 20)
    assert s["MODEL.RPN.POST_NMS_TOPK_TEST"].value == 600  # 10 proposals per object
    assert s["MODEL.RPN.PRE_NMS_TOPK_TEST"].value == 1200
    assert s["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE"].value == 1024  # 4 x 60 / 0.25 = 960 -> 2^10
    assert s["MODEL.RPN.POST_NMS_TOPK_TRAIN"].value == 1024
    # 10 px boxes at scale 1: C4 wants >= 16 px, so x1.6 -> 640 px; anchors fit 16 px boxes.
    assert s["INPUT.MIN_SIZE_TRAIN"].value == (640,) and s["INPUT.MIN_SIZE_TEST"].value == 640
    assert s["INPUT.MAX_SIZE_TRAIN"].value == 1072  # 667 x 1.6, rounded up to a multiple of 8
    assert s["MODEL.ANCHOR_GENERATOR.SIZES"].value == [[16]]


def test_fpn_gets_one_anchor_size_per_level():
    cfg = load_config(str(CONFIGS / "finetune" / "voc_R50_FPN.yaml"))
    split = _dense_split(3, 40.0, image_px=500)
    s = {x.key: x for x in suggest_settings([split], [split], cfg)}
    sizes = s["MODEL.ANCHOR_GENERATOR.SIZES"].value
    assert len(sizes) == len(cfg.MODEL.RPN.IN_FEATURES) == 5
    assert all(len(level) == 1 for level in sizes)
    assert [level[0] for level in sizes] == [sizes[0][0] * 2**k for k in range(5)]
    # 40 px boxes in 500 px images resized to a short side of 480..800 px: 38.4..64 px, and
    # 32 is the power of two nearest to 38.4.
    assert sizes[0][0] == 32
    assert not s["INPUT.MIN_SIZE_TRAIN"].changes  # FPN: 38 px >= 8 px


def test_range_sampling_and_max_size_cap():
    hw = np.array([[100.0, 400.0]])
    scales = resize_scales(hw, (200, 300), 1000, "range")
    np.testing.assert_allclose(scales, [[2.0, 2.25, 2.5, 2.5, 2.5]])  # 1000 / 400 caps at 2.5
    with pytest.raises(ValueError, match="MIN_SIZE_TRAIN_SAMPLING"):
        resize_scales(hw, (200,), 1000, "random")


@pytest.mark.parametrize(
    "template", ["own_voc_finetune.yaml", "own_coco_finetune.yaml", "own_bissl.yaml"]
)
def test_readme_templates_are_valid_configs(template):
    """docs/templates (docs/own_data.md): every key exists; the data sets are as shown."""
    cfg = load_config(str(REPO / "docs" / "templates" / template))
    names = [entry["NAME"] for entry in cfg.DATASETS.CUSTOM]
    assert list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST) == names
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 1


# ---- Cost awareness ------------------------------------------------------------------------------

# A C4-like cost: 0.5 s per training image for backbone + RPN, 10 ms per RoI forward + backward.
FIXED_COST = HeadCost((400, 400), 0.5, 0.010, 0.2, 0.004, threads=1)


def test_roi_batch_is_capped_by_the_cost_limit_and_its_cost_stated():
    """The issue's case: 60 small objects per tile ask for 1024 RoIs; C4 cannot afford them."""
    cfg = load_config(
        str(DEMO_CFG), ["INPUT.MIN_SIZE_TRAIN", "(400,)", "INPUT.MIN_SIZE_TEST", "400"]
    )
    split = _dense_split(60, 20.0)
    free = {x.key: x for x in suggest_settings([split], [split], cfg, FIXED_COST, None)}
    assert free["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE"].value == 1024
    s = {x.key: x for x in suggest_settings([split], [split], cfg, FIXED_COST, 1.5)}
    rois = s["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE"]
    # Now 0.5 + 64 x 0.01 = 1.14 s; x1.5 allows 1.71 s: 121 RoIs, a multiple of 8 below: 120.
    assert rois.value == 120
    assert FIXED_COST.train_s(rois.value) <= 1.5 * FIXED_COST.train_s(64)
    assert "asks for 1024, capped at 120" in rois.reason
    assert rois.cost.startswith("time per training iteration x1.49 (per image 1.14 -> 1.7 s")
    assert s["MODEL.RPN.POST_NMS_TOPK_TRAIN"].value == 120  # >= the RoI batch
    # Test-time proposals: 0.2 + 50 x 0.004 = 0.4 s; x1.5: 0.6 s -> 100 proposals, not 600.
    post = s["MODEL.RPN.POST_NMS_TOPK_TEST"]
    assert post.value == 96 and "asks for 600" in post.reason  # 0.2 + 96 x 0.004 = 0.584 s
    assert FIXED_COST.test_s(post.value) <= 1.5 * FIXED_COST.test_s(50)
    # Every changed suggestion says what it costs.
    assert all(x.cost for x in s.values() if x.changes)


def test_evaluator_named_as_the_config_uses_it():
    cfg = load_config(str(DEMO_CFG))
    voc = _dense_split(60, 20.0)
    text = {x.key: x.reason for x in suggest_settings([voc], [voc], cfg)}
    assert "VOC metric scores every detection" in text["TEST.DETECTIONS_PER_IMAGE"]
    assert "COCO" not in text["TEST.DETECTIONS_PER_IMAGE"]
    coco = _dense_split(60, 20.0)
    coco.evaluator = "coco"
    text = {x.key: x.reason for x in suggest_settings([coco], [coco], cfg)}
    assert "COCO AP scores at most 100" in text["TEST.DETECTIONS_PER_IMAGE"]


def test_image_size_outliers_are_reported_with_their_scale():
    cfg = load_config(
        str(DEMO_CFG), ["INPUT.MIN_SIZE_TRAIN", "(400,)", "INPUT.MAX_SIZE_TRAIN", "667"]
    )
    split = _dense_split(2, 20.0)
    split.image_hw[:3] = [400.0, 49.0]  # edge tiles 49 px wide
    out = image_size_outliers(split, cfg)
    assert out["count"] == 3 and out["median_wxh"] == "400x400"
    # 49 px short side -> 400 would be x8.2; the long side caps it at 667 / 400 = 1.67.
    assert out["examples"] == [{"wxh": "49x400", "images": 3, "train_scale": 1.67}]
    assert out["median_train_scale"] == 1.0
    assert image_size_outliers(_dense_split(2, 20.0), cfg)["count"] == 0


def _write_dense_voc(root, images: int = 12, side: int = 128, per_row: int = 6):
    """A VOC folder of ``per_row``^2 small boxes per image, and two 40 px wide edge tiles."""
    import cv2

    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    ids = []
    for i in range(images):
        width = 40 if i < 2 else side
        cv2.imwrite(
            str(root / "JPEGImages" / f"{i:03d}.jpg"), np.full((side, width, 3), 128, np.uint8)
        )
        step = width // per_row
        objects = "".join(
            f"<object><name>tree</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>0</difficult><bndbox><xmin>{x * step + 1}</xmin>"
            f"<ymin>{y * (side // per_row) + 1}</ymin><xmax>{x * step + step - 1}</xmax>"
            f"<ymax>{y * (side // per_row) + side // per_row - 1}</ymax></bndbox></object>"
            for x in range(per_row)
            for y in range(per_row)
        )
        (root / "Annotations" / f"{i:03d}.xml").write_text(
            f"<annotation><filename>{i:03d}.jpg</filename><size><width>{width}</width>"
            f"<height>{side}</height><depth>3</depth></size>{objects}</annotation>"
        )
        ids.append(f"{i:03d}")
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(ids) + "\n")


def test_tool_on_a_dense_set_caps_rois_and_states_costs(tmp_path, capsys, monkeypatch):
    """The acceptance test: a dense synthetic VOC set, a C4 config, measured costs."""
    _write_dense_voc(tmp_path / "dense")
    config = tmp_path / "dense.yaml"
    config.write_text(
        f'_BASE_: "{CONFIGS / "quick" / "test_tiny_finetune_C4.yaml"}"\n'
        "MODEL:\n  ROI_HEADS:\n    NUM_CLASSES: 1\n"
        "DATASETS:\n  CUSTOM:\n"
        f"    - {{NAME: dense_trainval, FORMAT: voc, ROOT: {tmp_path / 'dense'}, SPLIT: trainval,"
        " CLASSES: [tree]}\n"
        '  TRAIN: ("dense_trainval",)\n  TEST: ()\n'
        "BISSL:\n  PRETEXT_DATA:\n    DATASETS: []\n"
    )
    monkeypatch.chdir(tmp_path)
    report = _tool().main(["--config-file", str(config), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    cost, limit = report["cost"], report["cost"]["limit"]
    assert limit == 1.5 and cost["roi_train_s"] > 0 and cost["image_train_s"] > 0
    s = {x["key"]: x for x in report["suggestions"]}
    rois = s["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE"]
    # 36 boxes per image ask for 4 x 36 / 0.25 = 576 -> 1024 RoIs; the cost limit holds.
    assert rois["changes"] or "capped" in rois["reason"]
    current = 16  # test_tiny_C4's BATCH_SIZE_PER_IMAGE

    def train_s(n):
        return cost["image_train_s"] + n * cost["roi_train_s"]

    assert train_s(rois["value"]) <= limit * train_s(current) + 1e-12
    assert rois["value"] < 1024 and "capped at" in rois["reason"]
    assert f"# {rois['reason']}" in printed
    if rois["changes"]:
        assert f"#   cost: {rois['cost']}" in printed
    assert "COCO" not in printed  # a VOC set: the VOC metric is named
    outliers = report["splits"]["dense_trainval"]["image_size_outliers"]
    assert outliers["count"] == 2 and outliers["examples"][0]["wxh"] == "40x128"
    assert "WARNING: 2 images differ in size" in printed
    # --no-cost-limit: what the data asks for, cost still stated.
    free = _tool().main(
        ["--config-file", str(config), "--out", str(tmp_path / "free"), "--no-cost-limit"]
    )
    value = {x["key"]: x for x in free["suggestions"]}["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE"]
    assert value["value"] == 1024 and value["cost"]
