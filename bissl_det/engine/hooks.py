"""Hooks of the BiSSL trainer: export of the lower backbone, and PNG plots of the run."""

from __future__ import annotations

import contextlib
import json
import logging
from collections import defaultdict
from pathlib import Path

from detectron2.engine import HookBase
from detectron2.utils.events import CommonMetricPrinter, EventWriter, JSONWriter, TensorboardXWriter

logger = logging.getLogger(__name__)


def build_writers(output_dir: str | Path, max_iter: int) -> list[EventWriter]:
    """Console line with ETA, ``output_dir``/metrics.json, and TensorBoard events if installed."""
    writers = [CommonMetricPrinter(max_iter), JSONWriter(f"{output_dir}/metrics.json")]
    with contextlib.suppress(ImportError):  # tensorboard is optional
        writers.append(TensorboardXWriter(str(output_dir)))
    return writers


class ExportBackbone(HookBase):
    """``trainer.export(final=False)`` every ``period`` iterations (a ``*_last`` file), and
    ``trainer.export()`` once training has succeeded: the final file exists only then."""

    def __init__(self, period: int):
        self.period = period

    def after_step(self) -> None:
        stage = self.trainer.iter + 1
        if self.period > 0 and stage % self.period == 0 and stage < self.trainer.max_iter:
            self.trainer.export(final=False)

    def after_train(self) -> None:
        # TrainerBase.train leaves iter == max_iter only when the last iteration succeeded:
        # a run that failed must not overwrite the export with a faulty backbone.
        if self.trainer.iter >= self.trainer.max_iter:
            paths = self.trainer.export()
            logger.info("Exported the backbone: %s", {k: str(v) for k, v in paths.items()})


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.json (one JSON object per line) -> {key: [(iteration, value), ...]}."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    path = Path(path)
    if not path.exists():
        return series
    for line in path.read_text().splitlines():
        record = json.loads(line)
        it = record.get("iteration")
        for key, value in record.items():
            if key != "iteration" and isinstance(value, (int, float)) and it is not None:
                series[key].append((it, float(value)))
    return series


PLOTS = {
    "losses.png": ("Losses per stage", ["lower_pretext_loss", "upper_loss", "upper_loss_on_theta"]),
    "hypergradient.png": (
        "Implicit gradient diagnostics",
        ["cg_residual", "hypergrad_cosine", "hypergrad_norm_ratio"],
    ),
    "theta_phi_distance.png": ("||theta - phi|| per stage", ["theta_phi_distance"]),
}


def plot_metrics(
    metrics_file: str | Path, out_dir: str | Path, plots: dict | None = None, xlabel: str = "stage"
) -> list[Path]:
    """Write ``plots`` ({file: (title, keys)}, default PLOTS) of a run's metrics.json as PNG
    files; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series, out_dir = read_metrics(metrics_file), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, (title, keys) in (PLOTS if plots is None else plots).items():
        present = [k for k in keys if series.get(k)]
        if not present:
            continue
        fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
        for ax, key in zip(axes[0], present, strict=True):
            xs, ys = zip(*series[key], strict=True)
            ax.plot(xs, ys, marker=".")
            ax.set_title(key)
            ax.set_xlabel(xlabel)
            if key == "cg_residual":
                ax.set_yscale("log")
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out_dir / filename, dpi=90)
        plt.close(fig)
        written.append(out_dir / filename)
    return written


class PlotMetrics(HookBase):
    """Plot metrics.json to OUTPUT_DIR/plots/*.png at the end of training."""

    def __init__(self, output_dir: str, plots: dict | None = None, xlabel: str = "stage"):
        self.output_dir = Path(output_dir)
        self.plots, self.xlabel = plots, xlabel

    def after_train(self) -> None:
        # Registered after PeriodicWriter, whose after_train has flushed metrics.json by now.
        written = plot_metrics(
            self.output_dir / "metrics.json", self.output_dir / "plots", self.plots, self.xlabel
        )
        logger.info("Wrote plots: %s", ", ".join(str(p) for p in written))
