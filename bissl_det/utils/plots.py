"""PNG plots of a run's metrics.json, labelled with units and, for diagnostics, good values.

A plot table maps a file name to ``(title, [metric names or fnmatch patterns])``;
:data:`METRIC_INFO` maps a metric (or pattern) to ``(unit label, good-value note)``, shown as the
y label and under the panel title; :data:`REFERENCE_LINES` draws a dashed line at a diagnostic's
threshold. Every tool has a table: :data:`BISSL_PLOTS`, :data:`PRETRAIN_PLOTS`,
:data:`FINETUNE_PLOTS`, :data:`CLASSIFICATION_PLOTS`.
"""

from __future__ import annotations

import fnmatch
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

PlotTable = Mapping[str, tuple[str, Sequence[str]]]

LOSS = "loss (nats: cross-entropy)"
METRIC_INFO: dict[str, tuple[str, str]] = {
    # BiSSL stages.
    "lower_pretext_loss": (
        "pretext loss (SimCLR: nats; BYOL: 2 - 2 cos)",
        "expected to fall slowly; the pull toward phi can hold it",
    ),
    "lower_loss": ("pretext + lambda/2 ||theta - phi||^2", ""),
    "upper_loss": (
        "downstream loss at phi (sum of the detector's losses)",
        "expected to fall; a rise: check hypergradient.png",
    ),
    "upper_loss_on_theta": ("downstream loss at theta", "expected near upper_loss"),
    "theta_phi_distance": ("||theta - phi|| (L2 over backbone tensors)", "bounded by lambda"),
    "coupling_ratio": (
        "lambda ||theta - phi|| / ||grad L_P||",
        "<< 1: the pretext task drives theta; ~1: phi's pull balances it",
    ),
    "hypergrad_iterations": ("solver iterations", "<= BISSL.HYPERGRAD.MAX_ITER"),
    "hypergrad_rel_residual_max": ("max over the stage of ||A x - g|| / ||g||", "good: < 1e-2"),
    "hypergrad_rel_residual": ("||A x - g|| / ||g||", "good: < 1e-2"),
    "hypergrad_negative_curvature": ("directions with p^T A p <= 0 (count)", "good: 0"),
    "hypergrad_cosine": ("cos(x, g)", "1: x along g; near 0: the solve turned x away"),
    "hypergrad_norm_ratio": ("||x|| / ||g||", "<= 1 if C >= 0; > 1 proves negative curvature"),
    "hypergrad_eig_min": ("smallest eigenvalue of I + C/(lambda+delta)", "good: > 0"),
    "hypergrad_eig_max": ("largest eigenvalue of I + C/(lambda+delta)", "condition = max/min"),
    "stage_time": ("seconds per stage", ""),
    "upper_grad_norm": ("||grad|| before clipping", ""),
    # Pretraining.
    "pretext_loss": ("pretext loss (SimCLR: nats; BYOL: 2 - 2 cos)", "expected to fall"),
    "grad_norm": ("||grad|| before clipping", ""),
    "ema_momentum": ("BYOL target momentum", "rises to 1"),
    # Fine-tuning (detectron2's loss names) and evaluation.
    "total_loss": ("sum of the detector's losses", "expected to fall"),
    "loss_cls": (LOSS, "expected to fall"),
    "loss_rpn_cls": ("loss (nats: binary cross-entropy)", "expected to fall"),
    "loss_box_reg": ("smooth-L1 box regression loss", "expected to fall"),
    "loss_rpn_loc": ("smooth-L1 box regression loss", "expected to fall"),
    "*bbox/AP*": ("AP (%)", "higher is better"),
    # Classification.
    "*top1*": ("top-1 accuracy (%)", "higher is better"),
    "*acc*": ("accuracy (%)", "higher is better"),
    "*mAP*": ("mAP (%)", "higher is better"),
    "*loss*": (LOSS, "expected to fall"),
    "lr*": ("learning rate", "the schedule"),
}
REFERENCE_LINES = {
    "hypergrad_rel_residual": 1e-2,
    "hypergrad_rel_residual_max": 1e-2,
    "hypergrad_negative_curvature": 0.0,
    "hypergrad_norm_ratio": 1.0,
    "hypergrad_eig_min": 0.0,
}
LOG_SCALE = ("hypergrad_rel_residual", "hypergrad_rel_residual_max")
MAX_COLUMNS = 4  # panels per row of a figure

BISSL_PLOTS: PlotTable = {
    "losses.png": ("Losses per stage", ["lower_pretext_loss", "upper_loss", "upper_loss_on_theta"]),
    "hypergradient.png": (
        "Implicit gradient diagnostics",
        [
            "hypergrad_rel_residual_max",
            "hypergrad_rel_residual",
            "hypergrad_cosine",
            "hypergrad_norm_ratio",
            "hypergrad_negative_curvature",
            "hypergrad_eig_min",
            "hypergrad_eig_max",
        ],
    ),
    "theta_phi_distance.png": (
        "||theta - phi|| and the coupling per stage",
        ["theta_phi_distance", "coupling_ratio"],
    ),
    "lr.png": ("Learning rates", ["lr", "lr_lower"]),
}
PRETRAIN_PLOTS: PlotTable = {
    "pretext_loss.png": ("Pretext loss", ["pretext_loss"]),
    "lr.png": ("Learning rate and gradient norm", ["lr", "grad_norm", "ema_momentum"]),
}
FINETUNE_PLOTS: PlotTable = {
    "losses.png": (
        "Fine-tuning losses",
        ["total_loss", "loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"],
    ),
    "ap.png": ("AP over evaluations", ["*bbox/AP", "*bbox/AP50", "*bbox/AP75"]),
    "lr.png": ("Learning rate", ["lr"]),
}
CLASSIFICATION_PLOTS: PlotTable = {
    "losses.png": ("Classification loss", ["*loss*"]),
    "accuracy.png": ("Accuracy", ["*top1*", "*acc*", "*mAP*"]),
    "lr.png": ("Learning rate", ["lr"]),
}


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.json (one JSON object per line) -> {key: [(iteration, value), ...]}."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    path = Path(path)
    if not path.exists():
        return series
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        it = record.get("iteration")
        for key, value in record.items():
            if key != "iteration" and isinstance(value, (int, float)) and it is not None:
                series[key].append((it, float(value)))
    return series


def metric_info(key: str) -> tuple[str, str]:
    """(unit label, good-value note) of ``key``: an exact entry first, then the first pattern."""
    if key in METRIC_INFO:
        return METRIC_INFO[key]
    for pattern, info in METRIC_INFO.items():
        if fnmatch.fnmatchcase(key, pattern):
            return info
    return ("", "")


def matching_keys(patterns: Sequence[str], available) -> list[str]:
    """Keys of ``available`` matching ``patterns`` (names or fnmatch patterns), in pattern order."""
    found: list[str] = []
    for pattern in patterns:
        for key in sorted(available):
            if fnmatch.fnmatchcase(key, pattern) and key not in found:
                found.append(key)
    return found


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


PANEL_INCHES = (4.0, 3.4)  # one metric's panel, margins and gaps included
# Fixed margins and gaps (inches) for the panels' two-line titles and tick labels: a fixed
# layout, not ``tight_layout``, which measures every text and took half of a run's plotting time.
MARGINS = {"left": 0.75, "right": 0.2, "bottom": 0.5, "top": 0.85}
GAPS = (0.9, 1.05)  # between panels: horizontal, vertical


def _panel_figure(plt, rows: int, cols: int):
    """A ``rows x cols`` grid of panels of :data:`PANEL_INCHES` with the fixed margins."""
    width, height = PANEL_INCHES[0] * cols, PANEL_INCHES[1] * rows
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    left, right = MARGINS["left"], MARGINS["right"]
    bottom, top = MARGINS["bottom"], MARGINS["top"]
    # subplots_adjust takes figure fractions and gaps relative to the mean panel size.
    panel_w = (width - left - right - (cols - 1) * GAPS[0]) / cols
    panel_h = (height - bottom - top - (rows - 1) * GAPS[1]) / rows
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=GAPS[0] / panel_w,
        hspace=GAPS[1] / panel_h,
    )
    return fig, axes


def plot_metrics(
    metrics_file: str | Path,
    out_dir: str | Path,
    plots: PlotTable | None = None,
    x_label: str = "stage",
) -> list[Path]:
    """Write the ``plots`` (default :data:`BISSL_PLOTS`) of a run's metrics.json as PNG files;
    returns the files written.

    A file whose metrics are all absent is skipped; each panel is one metric, its y axis labelled
    with the metric's unit and its title carrying the good-value note of :data:`METRIC_INFO`.
    """
    plt = _pyplot()
    series, out_dir = read_metrics(metrics_file), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, (title, patterns) in (plots or BISSL_PLOTS).items():
        present = matching_keys(patterns, [k for k, v in series.items() if v])
        if not present:
            continue
        cols = min(len(present), MAX_COLUMNS)
        rows = -(-len(present) // cols)
        fig, axes = _panel_figure(plt, rows, cols)
        for ax in axes.flat[len(present) :]:
            ax.set_visible(False)
        for ax, key in zip(axes.flat, present, strict=False):
            xs, ys = zip(*series[key], strict=True)
            if len(xs) == 1:  # one evaluation: a dot would be lost; show a marker and its value
                ax.plot(xs, ys, marker="o", markersize=9, linestyle="none")
                ax.annotate(
                    f"{ys[0]:.4g}", (xs[0], ys[0]), xytext=(8, 6), textcoords="offset points"
                )
            else:
                ax.plot(xs, ys, marker=".")
            unit, good = metric_info(key)
            ax.set_title(f"{key}\n({good})" if good else key, fontsize=9)
            ax.set_xlabel(x_label)
            ax.set_ylabel(unit, fontsize=8)
            if key in REFERENCE_LINES:
                ax.axhline(REFERENCE_LINES[key], color="grey", linestyle="--", linewidth=1)
            if key in LOG_SCALE and min(ys) > 0:
                ax.set_yscale("log")
        fig.suptitle(title)
        fig.savefig(out_dir / filename, dpi=90)
        plt.close(fig)
        written.append(out_dir / filename)
    return written


def plot_histograms(
    panels: Sequence[tuple[str, str, Mapping[str, Sequence[float]], bool]],
    out_file: str | Path,
    title: str = "",
    bins: int = 30,
) -> Path:
    """One row of histograms: each panel is ``(title, x label, {series: values}, log x axis)``."""
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (panel_title, x_label, groups, log_x) in zip(axes[0], panels, strict=True):
        values = [np.asarray(v, dtype=float) for v in groups.values() if len(v)]
        if values and log_x:
            lo, hi = min(v.min() for v in values), max(v.max() for v in values)
            edges = np.geomspace(max(lo, 1e-3), max(hi, lo * 1.01, 1e-3), bins + 1)
            ax.set_xscale("log")
        else:
            edges = bins
        for name, v in groups.items():
            if len(v):
                ax.hist(np.asarray(v, dtype=float), bins=edges, alpha=0.55, label=name)
        ax.set_title(panel_title, fontsize=9)
        ax.set_xlabel(x_label, fontsize=8)
        ax.set_ylabel("count", fontsize=8)
        if len(groups) > 1:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_file, dpi=90)
    plt.close(fig)
    return out_file
