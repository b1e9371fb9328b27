"""BiSSL with a Mask R-CNN upper level, then Mask R-CNN fine-tuning of its exported lower backbone:
both tools, end to end on the demo set's COCO JSON with instance masks."""

import json
import math
import subprocess
import sys

from tests.helpers import CONFIGS, REPO

import pytest

TINY_MASK = CONFIGS / "quick" / "test_tiny_mask_C4.yaml"
TINY_MASK_FINETUNE = CONFIGS / "quick" / "test_tiny_mask_finetune_C4.yaml"
TEST_SET = "demo_coco_test"
METRICS = {"AP", "AP50", "AP75"}


def _run_tool(tool: str, cwd, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / tool), *args], cwd=cwd, capture_output=True, text=True
    )
    assert done.returncode == 0, f"{tool} failed:\n{done.stderr[-4000:]}"


def _box_and_mask_metrics(results_file) -> dict:
    """The test set's metrics: box AP, AP50, AP75 at the top level, the mask ones under segm."""
    metrics = json.loads(results_file.read_text())[TEST_SET]
    assert set(metrics) == METRICS | {"segm"}
    assert set(metrics["segm"]) == METRICS
    for value in (*(metrics[k] for k in METRICS), *metrics["segm"].values()):
        assert math.isfinite(value) and 0.0 <= value <= 100.0
    return metrics


def _losses_logged(out) -> set[str]:
    keys = set()
    for line in (out / "metrics.json").read_text().splitlines():
        keys.update(json.loads(line))
    return keys


@pytest.mark.slow
def test_bissl_then_finetune_with_masks(in_demo_workdir, tmp_path):
    bissl_out, ft_out = tmp_path / "bissl", tmp_path / "ft"
    _run_tool(
        "train_bissl.py", in_demo_workdir, "--config-file", str(TINY_MASK), "--evaluate",
        "BISSL.STAGES", "1", "OUTPUT_DIR", str(bissl_out),
    )  # fmt: skip
    assert "upper/loss_mask" in _losses_logged(bissl_out)  # the downstream loss has the mask term
    _box_and_mask_metrics(bissl_out / "results.json")  # the upper level, scored with masks

    export = bissl_out / "lower_backbone.pth"
    _run_tool(
        "finetune_det.py", in_demo_workdir, "--config-file", str(TINY_MASK_FINETUNE),
        "MODEL.WEIGHTS", str(export), "OUTPUT_DIR", str(ft_out),
    )  # fmt: skip
    assert "loss_mask" in _losses_logged(ft_out)
    assert "backbone tensors of" in (ft_out / "log.txt").read_text()  # every tensor loaded
    _box_and_mask_metrics(ft_out / "results.json")
