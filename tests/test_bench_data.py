"""Smoke test of benchmarks/bench_data.py: both pipelines run on the same files, JSON written."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import bench_data
from bissl_det.data.pretext import TwoViewAugmentation

import torch
from PIL import Image


def test_bench_data_writes_the_issue_keys(tmp_path: Path) -> None:
    out = tmp_path / "data.json"
    argv = ["--threads", "1", "--repeats", "1", "--images-per-block", "2", "--num-files", "2"]
    results = bench_data.main([*argv, "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["speedup_per_core"] == results["speedup_per_core"]
    for crop in ("96", "224"):
        assert record["speedup_per_core"][crop] > 0
        assert set(record["images_per_s_per_core"][crop]) == {"old", "new"}
        assert all(n >= 1 for n in record["workers_per_gpu"][crop].values())
        # The batched augmentation is timed apart from the workers, on the CPU.
        assert record["device_side_ms_per_image"][crop]["cpu"] > 0
        assert 0 < record["cpu_only_speedup_per_core"][crop] < record["speedup_per_core"][crop]
    assert record["provenance"]["git"] and record["settings"]["threads"] == 1


def test_reference_pipeline_is_the_previous_float_output() -> None:
    aug = TwoViewAugmentation(crop_size=16)
    v1, v2 = bench_data.ReferenceTwoView(aug)(Image.new("RGB", (40, 30), (200, 100, 50)))
    assert v1.dtype == torch.float32 and v1.shape == v2.shape == (3, 16, 16)


def test_workers_needed() -> None:
    assert bench_data.workers_needed(100.0, 256, 1.0) == 3  # 256 images at 100/s per worker
    assert bench_data.workers_needed(256.0, 256, 1.0) == 1
