"""The VOC metric's year is logged when the evaluator is built (11-point for 2007)."""

from __future__ import annotations

import logging

from bissl_det.evaluation.evaluate import build_detection_evaluator, voc_metric_name
from tests.helpers import TINY_C4, tiny_config


def test_voc_metric_year_is_logged(in_demo_workdir, tmp_path, caplog):
    cfg = tiny_config(TINY_C4, tmp_path / "out")
    with caplog.at_level(logging.INFO, logger="bissl_det.evaluation.evaluate"):
        evaluator = build_detection_evaluator(cfg, "demo_voc_test", str(tmp_path))
    assert evaluator._is_2007  # the custom VOC entry's default YEAR
    assert "demo_voc_test: VOC metric of year 2007: 11-point interpolated AP" in caplog.text
    assert "area under the PR curve" in voc_metric_name(2012)
