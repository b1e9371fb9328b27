"""Hooks shared by the trainers: export of the backbone, event writers, PNG plots of the run."""

from __future__ import annotations

import contextlib
import datetime
import logging
from pathlib import Path

from detectron2.engine import HookBase, IterationTimer
from detectron2.utils.events import CommonMetricPrinter, EventWriter, JSONWriter, TensorboardXWriter

from ..utils.distributed import check_replicas_identical
from ..utils.plots import plot_metrics

__all__ = [
    "CheckReplicas",
    "ExportBackbone",
    "PlotMetrics",
    "StageProgress",
    "StageTimer",
    "build_writers",
]

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


class CheckReplicas(HookBase):
    """Every ``period`` iterations (0: never) and after the last, stop every process if their
    copies of ``trainer.model`` differ (REPLICA_CHECK_PERIOD; one all-reduce of two numbers per
    tensor). Collective: register it on every process. No-op in one process."""

    def __init__(self, period: int):
        self.period = period

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if done == self.trainer.max_iter or (self.period > 0 and done % self.period == 0):
            unit = getattr(self.trainer, "unit", "iteration")
            check_replicas_identical(self.trainer.model, f"after {unit} {self.trainer.iter}: ")


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


class StageProgress(HookBase):
    """A console line per logged BiSSL stage: ``stage s/T``, its seconds, the mean, and the ETA.

    Detectron2's CommonMetricPrinter counts iterations from 0 and leaves the first ones out of
    its timing; here every stage this process ran counts (``stage_time``, put by the trainer),
    so the ETA exists from the first logged stage on: mean seconds x stages left.
    """

    def __init__(self, period: int):
        self.period = max(1, period)
        self._seconds: list[float] = []

    def after_step(self) -> None:
        latest = self.trainer.storage.latest()
        if "stage_time" in latest:
            self._seconds.append(latest["stage_time"][0])
        stage, total = self.trainer.iter + 1, self.trainer.max_iter
        if (stage % self.period and stage != total) or not self._seconds:
            return
        mean = sum(self._seconds) / len(self._seconds)
        eta = datetime.timedelta(seconds=round(mean * (total - stage)))
        coupling = ""
        if "coupling_ratio" in latest:
            coupling = f", coupling lambda|theta-phi|/|grad L_P| {latest['coupling_ratio'][0]:.3g}"
        logger.info(
            "stage %d/%d: %.1f s (mean %.1f s over %d stages of this run), ETA %s%s",
            stage, total, self._seconds[-1], mean, len(self._seconds), eta, coupling,
        )  # fmt: skip

    def after_train(self) -> None:
        if self._seconds:
            total = sum(self._seconds)
            logger.info(
                "BiSSL stages: %d in %s (%.2f s / stage; the head warm-up not included)",
                len(self._seconds), datetime.timedelta(seconds=round(total)),
                total / len(self._seconds),
            )  # fmt: skip


class StageTimer(IterationTimer):
    """Detectron2's iteration timer from the first stage on (its "time" gives the metric
    printer's ETA), without its closing "Overall training speed" line: with no timing warm-up
    that line counts one iteration more than ran. :class:`StageProgress` gives the count."""

    def __init__(self):
        super().__init__(warmup_iter=0)

    def after_train(self) -> None:
        pass
