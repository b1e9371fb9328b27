"""Conventional SSL pretraining (SimCLR or BYOL) of the Detectron2 ResNet: step 1 of the pipeline.

The model is the BiSSL lower level without the bilevel part: the same pretext model
(:func:`~bissl_det.modeling.pretext_tasks.build_pretext_model` on a plain-BN ResNet trunk), the same
pretext loader and LARS + warm-up/cosine schedule. No DDP: gradients are averaged by hand, as on
the lower level, so the exported backbone is directly a BiSSL starting point. What DDP would do
besides is done by hand too: rank 0's weights are broadcast after build + load/resume and its
buffers (BN statistics) after every step; CheckReplicas compares the copies.

Writes OUTPUT_DIR/pretext_backbone.pth (MODEL.WEIGHTS of train_bissl.py, finetune_det.py and
eval_cls.py; it carries the pretext head so BiSSL starts with it), its torchvision twin,
resumable checkpoints and metrics.json.
"""

from __future__ import annotations

import logging
import time

import torch
from detectron2.config import CfgNode
from detectron2.engine import TrainerBase, hooks
from detectron2.utils import comm
from torch import nn

from ..checkpoint import export_backbone, load_pretext_weights
from ..data.build import build_pretext_loader, pretext_batch_to_device
from ..modeling.backbone import PooledEncoder, build_resnet_trunk
from ..modeling.pretext import MomentumTarget, cosine_ema_momentum, reset_target
from ..modeling.pretext_tasks import build_pretext_model
from ..runtime.signals import with_graceful_interrupt
from ..solver.build import build_lars, build_scheduler
from ..utils.distributed import (
    all_reduce_grads_,
    broadcast_buffers_,
    broadcast_module_,
    world_size,
)
from ..utils.plots import PRETRAIN_PLOTS
from .checkpointer import AtomicCheckpointer, TrainingProgress
from .faults import FaultChecks
from .hooks import CheckReplicas, ExportBackbone, PlotMetrics, build_writers
from .resume import resume_from_last

logger = logging.getLogger(__name__)

EXPORT_NAME = "pretext_backbone"
EMA_SCHEDULES = ("cosine", "constant")


def build_pretrain_model(cfg: CfgNode) -> nn.Module:
    """SimCLR/BYOL (MODEL.BISSL.PRETEXT) on the MODEL.RESNETS trunk with plain BN, on its device.

    Plain BN, like the BiSSL lower level: per-process statistics under multi-process runs unless
    PRETRAIN.SYNC_BN (the authors' SyncBN, on GPUs).
    """
    encoder = PooledEncoder(build_resnet_trunk(cfg, norm="BN"))
    model = build_pretext_model(cfg, encoder)
    device = torch.device(cfg.MODEL.DEVICE)
    if cfg.PRETRAIN.SYNC_BN and world_size() > 1:
        if device.type != "cuda":
            raise ValueError(
                f"PRETRAIN.SYNC_BN needs CUDA (torch's SyncBatchNorm); MODEL.DEVICE is {device}"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device)


class PretrainTrainer(FaultChecks, TrainerBase):
    """One iteration = one LARS step of the pretext loss; ``iter`` counts steps.

    Hooks: IterationTimer, PeriodicCheckpointer (resumable with data position and RNG state),
    export of ``pretext_backbone.pth`` every checkpoint and at the end, PeriodicWriter
    (console line with ETA, metrics.json).
    """

    def __init__(self, cfg: CfgNode, model: nn.Module | None = None):
        """``model``: a pretext model built elsewhere (tests); default: from ``cfg``."""
        super().__init__()
        pre = cfg.PRETRAIN
        if pre.EMA_SCHEDULE not in EMA_SCHEDULES:
            raise ValueError(
                f"PRETRAIN.EMA_SCHEDULE = {pre.EMA_SCHEDULE!r}: use one of {EMA_SCHEDULES}"
            )
        self.cfg = cfg
        self.model = build_pretrain_model(cfg) if model is None else model
        self.device = next(self.model.parameters()).device
        self.max_iter = pre.ITERS
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_lars(self.model, pre.BASE_LR, pre.MOMENTUM, pre.WEIGHT_DECAY)
        self.scheduler = build_scheduler(
            self.optimizer, pre.ITERS, pre.WARMUP_STEPS, pre.FINAL_LR_FACTOR
        )
        self.progress = TrainingProgress()
        self.checkpointer = AtomicCheckpointer(
            self.model,
            cfg.OUTPUT_DIR,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            progress=self.progress,
        )
        self._data_iter = None
        self.register_hooks(self.build_hooks())

    @property
    def pretext_name(self) -> str:
        return self.cfg.MODEL.BISSL.PRETEXT.lower()

    def resume_or_load(self, resume: bool = True) -> None:
        """Resume from OUTPUT_DIR's last checkpoint, or start from MODEL.WEIGHTS or random
        weights; then every process holds rank 0's weights."""
        if not (resume and resume_from_last(self, "Resuming pretraining at step %d")):
            self.start_iter = 0
            if self.cfg.MODEL.WEIGHTS:
                # Continue pretraining from a checkpoint: every backbone tensor, or refused.
                if not load_pretext_weights(self.model, self.cfg.MODEL.WEIGHTS, self.pretext_name):
                    reset_target(self.model)  # a fresh head: the target copies the loaded net
            else:
                logger.info("MODEL.WEIGHTS is empty: pretraining starts from random weights")
        broadcast_module_(self.model)

    def build_hooks(self) -> list:
        cfg, period = self.cfg, self.cfg.PRETRAIN.CHECKPOINT_PERIOD
        # Every process checkpoints: a save gathers each rank's RNG state (rank 0 writes).
        hook_list = [
            hooks.IterationTimer(),
            CheckReplicas(cfg.REPLICA_CHECK_PERIOD),
            hooks.PeriodicCheckpointer(self.checkpointer, period or self.max_iter, self.max_iter),
        ]
        if comm.is_main_process():
            writers = build_writers(cfg.OUTPUT_DIR, self.max_iter)
            hook_list += [
                ExportBackbone(period),
                hooks.PeriodicWriter(writers, cfg.PRETRAIN.LOG_PERIOD),
                PlotMetrics(cfg.OUTPUT_DIR, PRETRAIN_PLOTS, "iteration"),  # after the writer
            ]
        return with_graceful_interrupt(hook_list)

    def before_train(self) -> None:
        seed = self.cfg.SEED if self.cfg.SEED >= 0 else 0
        loader = build_pretext_loader(
            self.cfg, self.cfg.PRETRAIN.IMS_PER_BATCH, self.progress.pretext_batches, seed
        )
        # A DataLoader iterator draws its base seed from the global RNG; keep that draw out of
        # the global stream, so a resumed run's augmentations continue exactly.
        with torch.random.fork_rng(devices=[]):
            self._data_iter = iter(loader)
        super().before_train()

    def train(self) -> None:
        super().train(self.start_iter, self.max_iter)

    def ema_momentum(self, step: int) -> float:
        """BYOL target momentum after optimiser step ``step`` (0-based)."""
        base = self.cfg.MODEL.BYOL.EMA_MOMENTUM
        if self.cfg.PRETRAIN.EMA_SCHEDULE == "constant":
            return base
        # The schedule length is the configured run, not this process's max_iter.
        return cosine_ema_momentum(base, step + 1, self.cfg.PRETRAIN.ITERS)

    def run_step(self) -> None:
        assert self.model.training, "PretrainTrainer: the model was left in eval mode"
        with self.stopping_every_rank():
            self.one_step()
        # Each process updated the BN statistics from its own batch: rank 0's for all, as DDP's
        # broadcast_buffers does (no-op with SyncBN's already equal ones, and in one process).
        if not self.cfg.PRETRAIN.SYNC_BN:
            broadcast_buffers_(self.model)

    def one_step(self) -> None:
        self.where = ("pretraining", self.iter)
        start = time.perf_counter()
        view1, view2 = pretext_batch_to_device(self.cfg, next(self._data_iter), self.device)
        self.progress.pretext_batches += 1
        data_time = time.perf_counter() - start

        loss = self.model(view1, view2)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        flags = self.fault_flags(loss)  # a NaN on any process stops all, after this all-reduce
        all_reduce_grads_(self.params, flags)
        self.stop_on_flagged(flags, loss, "pretext loss", "pretraining", self.iter)
        grad_norm = self.clip_and_check(
            self.params, self.cfg.PRETRAIN.CLIP_GRAD_NORM, "pretraining", self.iter
        )
        metrics = {"pretext_loss": loss.item(), "grad_norm": grad_norm, "data_time": data_time}
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        if isinstance(self.model, MomentumTarget):
            metrics["ema_momentum"] = self.ema_momentum(self.iter)
            self.model.update_target(metrics["ema_momentum"])
        self.storage.put_scalars(**metrics, smoothing_hint=False)

    def export(self, final: bool = True) -> dict:
        """Write OUTPUT_DIR/pretext_backbone{,_torchvision}.pth at the end of a successful run;
        pretext_backbone_iter<N>{,_torchvision}.pth after step N when periodic (kept)."""
        name = EXPORT_NAME if final else f"{EXPORT_NAME}_iter{self.iter + 1}"
        paths = export_backbone(self.model, self.cfg.OUTPUT_DIR, self.pretext_name, name)
        if not final:
            logger.info("Periodic export after step %d: %s", self.iter + 1, paths["detectron2"])
        return paths
