"""utils/plots.py: which metrics each tool's table plots, with which unit and good-value note."""

from __future__ import annotations

import json

from bissl_det.utils.plots import (
    FINETUNE_PLOTS,
    matching_keys,
    metric_info,
    plot_histograms,
    plot_metrics,
    read_metrics,
)


def test_units_and_notes_are_looked_up_by_name_then_pattern():
    assert metric_info("hypergrad_rel_residual") == ("||A x - g|| / ||g||", "good: < 1e-2")
    assert metric_info("hypergrad_negative_curvature")[1] == "good: 0"
    assert "> 1 proves negative curvature" in metric_info("hypergrad_norm_ratio")[1]
    assert metric_info("hypergrad_eig_min")[1] == "good: > 0"
    assert metric_info("demo_voc_test/bbox/AP50")[0] == "AP (%)"  # pattern *bbox/AP*
    assert metric_info("no_such_metric") == ("", "")
    available = ["bbox/AP", "bbox/AP50", "bbox/AP75", "lr", "x/bbox/AP"]
    assert matching_keys(["*bbox/AP"], available) == ["bbox/AP", "x/bbox/AP"]


def test_finetuning_plots_losses_and_ap_over_evaluations(tmp_path):
    metrics = tmp_path / "metrics.json"
    rows = [
        {"iteration": i, "total_loss": 2.0 - i / 10, "loss_cls": 1.0, "lr": 0.01} for i in range(5)
    ]
    rows.append({"iteration": 4, "bbox/AP": 1.5, "bbox/AP50": 6.0})  # the final evaluation
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_metrics(metrics)["bbox/AP"] == [(4, 1.5)]
    written = plot_metrics(metrics, tmp_path / "plots", FINETUNE_PLOTS, "iteration")
    assert sorted(p.name for p in written) == ["ap.png", "losses.png", "lr.png"]
    assert all(p.stat().st_size > 1000 for p in written)
    assert plot_metrics(tmp_path / "missing.json", tmp_path / "none", FINETUNE_PLOTS) == []


def test_histograms(tmp_path):
    out = plot_histograms(
        [("sizes", "px", {"a": [10, 20, 40], "b": []}, True), ("n", "boxes", {"a": [1, 2]}, False)],
        tmp_path / "h.png",
    )
    assert out.stat().st_size > 1000


def test_one_evaluation_is_a_marker_with_its_value(tmp_path, monkeypatch):
    """ap.png after a single evaluation: a large marker and the value written beside it."""
    from matplotlib.axes import Axes

    written = []
    original = Axes.annotate

    def annotate(self, text, *args, **kwargs):
        written.append(text)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(Axes, "annotate", annotate)
    metrics = tmp_path / "metrics.json"
    rows = [{"iteration": i, "total_loss": 2.0 - i / 10} for i in range(3)]
    rows.append({"iteration": 2, "bbox/AP": 0.78, "bbox/AP50": 2.5})
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    plot_metrics(metrics, tmp_path / "plots", FINETUNE_PLOTS, "iteration")
    assert written == ["0.78", "2.5"]  # the two AP panels, not the 3-point loss


def test_bissl_loss_titles_do_not_promise_a_fall():
    for key in ("upper_loss", "lower_pretext_loss", "upper_loss_on_theta"):
        assert "falls" not in metric_info(key)[1]
