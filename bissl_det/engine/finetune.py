"""Standard Detectron2 fine-tuning of a detector from a (BiSSL or SSL) backbone checkpoint."""

from __future__ import annotations

import logging
import os
import weakref

import torch
from detectron2.engine import DefaultTrainer
from detectron2.layers import NaiveSyncBatchNorm
from detectron2.utils import comm

from ..checkpoint import check_detector_weights, load_checkpoint_file
from ..checkpoint.verify import verify_backbone_loaded
from ..data.class_names import check_weights_classes, run_classes
from ..evaluation.evaluate import build_detection_evaluator, detection_metrics
from ..modeling.sync_bn import use_float32_sync_bn_statistics
from ..runtime.signals import with_graceful_interrupt
from ..utils.distributed import broadcast_module_, broadcast_tensors_
from ..utils.plots import FINETUNE_PLOTS
from ..utils.preemption import ignore_in_workers
from .checkpointer import AtomicCheckpointer
from .faults import FaultChecks
from .hooks import CheckReplicas, PlotMetrics

logger = logging.getLogger(__name__)


class FinetuneTrainer(FaultChecks, DefaultTrainer):
    """DefaultTrainer with the project's evaluators, a checked backbone initialisation, atomic
    checkpoints, a ``--resume`` that never resumes garbage, and a diagnostic checkpoint when
    Detectron2 reports divergence ("Loss became infinite or NaN").

    Multi-process: Detectron2's DDP broadcasts rank 0's weights when it wraps the model (before
    MODEL.WEIGHTS or a checkpoint is loaded: every process loads the same file) and averages
    gradients; the weights are broadcast once more after loading, plain BN statistics after every
    step, and CheckReplicas compares the copies every REPLICA_CHECK_PERIOD iterations.
    Detectron2 checks the loss for NaN on rank 0 only: the other processes stop when rank 0 does
    (engine/faults.py).
    """

    def run_step(self) -> None:
        self.where = ("fine-tuning", self.iter)
        with self.stopping_every_rank(), self.divergence_guard("fine-tuning", 0):
            super().run_step()
        # Detectron2's DDP does not broadcast buffers: plain BN statistics would drift apart.
        broadcast_tensors_(self.per_process_statistics)

    @property
    def per_process_statistics(self) -> list:
        """Buffers of plain BN layers (each process updates them from its own batch); SyncBN
        and FrozenBN keep theirs equal, so with them this is empty and costs nothing."""
        if not hasattr(self, "_per_process_statistics"):
            self._per_process_statistics = [
                buffer
                for module in self.model.modules()
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
                and not isinstance(module, (torch.nn.SyncBatchNorm, NaiveSyncBatchNorm))
                for buffer in module.buffers()
            ]
        return self._per_process_statistics

    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        use_float32_sync_bn_statistics(model)  # naiveSyncBN statistics in fp32 under autocast
        return model

    @classmethod
    def build_train_loader(cls, cfg):
        return ignore_in_workers(super().build_train_loader(cfg))  # signals: the trainer stops

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return ignore_in_workers(super().build_test_loader(cfg, dataset_name))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_detection_evaluator(cfg, dataset_name, output_folder)

    def build_hooks(self) -> list:
        # Called by DefaultTrainer.__init__ right after it made its checkpointer: swap it for
        # the atomic one before the PeriodicCheckpointer hook takes it.
        self.checkpointer = AtomicCheckpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        # DefaultTrainer's writers: console, metrics.json, TensorBoard; plots after them.
        plots = [PlotMetrics(self.cfg.OUTPUT_DIR, FINETUNE_PLOTS, "iteration")]
        plots = plots if comm.is_main_process() else []
        checks = [CheckReplicas(self.cfg.REPLICA_CHECK_PERIOD)]
        return with_graceful_interrupt([*checks, *super().build_hooks(), *plots])

    def resume_or_load(self, resume: bool = True) -> None:
        """Resume, or initialise from MODEL.WEIGHTS - refused if a backbone tensor stays unset."""
        resuming = resume and self.checkpointer.has_checkpoint()
        weights = self.cfg.MODEL.WEIGHTS
        kind = None
        if not resuming:
            kind = check_initial_weights(self.model, weights)
            if kind == "backbone":  # a BiSSL export records the classes it was tailored to
                checkpoint = load_checkpoint_file(weights)
                check_weights_classes(weights, checkpoint, run_classes(self.cfg))
        super().resume_or_load(resume=resume)
        broadcast_module_(self.model)
        if kind == "backbone":
            count = verify_backbone_loaded(self.model, weights, self.cfg.MODEL.RESNETS.DEPTH)
            logger.info("All %d backbone tensors of %s loaded (no missing key)", count, weights)


def check_initial_weights(model, weights: str, *, whole_model: bool = False) -> str | None:
    """Refuse MODEL.WEIGHTS that would leave tensors of ``model`` random (see
    :func:`~bissl_det.checkpoint.check_detector_weights`); warn for empty weights."""
    if not weights:
        logger.warning("MODEL.WEIGHTS is empty: the detector starts from random weights")
        return None
    return check_detector_weights(model, weights, whole_model=whole_model)


def summarise(test_sets: list[str], results: dict) -> dict[str, dict[str, float]]:
    """{dataset: {"AP", "AP50", "AP75"}} from DefaultTrainer.test's result.

    DefaultTrainer.test unwraps the result of a single test set, so wrap it back.
    """
    if len(test_sets) == 1 and "bbox" in results:
        results = {test_sets[0]: results}
    return {name: detection_metrics(result) for name, result in results.items()}
