"""BilevelTrainer: head warm-up, then BiSSL stages of lower and upper steps.

One trainer iteration is one stage:

* N_L lower steps: pretext loss + lambda/2 ||theta - phi||^2 (phi constant), LARS.
* The stage's implicit-gradient system ``(I + C/(lambda+delta)) x = g`` is built once
  (bilevel/stage.py, configured by engine/hypergrad.py: C the pretext Hessian, its Gauss-Newton
  part or the Fisher of the lower steps' gradients); it serves every upper step of the stage.
* N_U upper steps: g = grad_theta L_D(theta, phi_d); x solves the system;
  phi.grad = x + gamma grad_phi L_D(phi, phi_d); phi_d.grad from both terms; SGD.

No DDP and no SyncBN on the lower level (double backward needs neither): gradients, ``g`` and
curvature products are averaged across processes by hand. What DDP would do besides is done here
too: rank 0's weights are broadcast after build + load/resume, and the buffers (BN running
statistics, which every process updates from its own batches) after each stage; CheckReplicas
compares the copies every REPLICA_CHECK_PERIOD stages. A fault on one process stops every
process (engine/faults.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import torch
from detectron2.engine import TrainerBase, hooks
from detectron2.modeling import build_model
from detectron2.utils import comm
from torch import nn

from ..bilevel import IndefiniteSystemError, NonFiniteError, StageSystem, tuple_norm
from ..checkpoint import export_backbone, load_pretext_checkpoint
from ..data.build import (
    build_downstream_train_loader,
    build_pretext_loader,
    pretext_batch_to_device,
)
from ..data.class_names import run_classes
from ..data.tasks import evaluate_downstream
from ..modeling.memory import checkpoint_resnet_blocks
from ..modeling.pretext import MomentumTarget, reset_target
from ..runtime.signals import with_graceful_interrupt
from ..solver.build import build_lars, build_scheduler
from ..utils.distributed import (
    all_reduce_grads_,
    all_reduce_mean,
    all_reduce_mean_,
    broadcast_buffers_,
    broadcast_module_,
)
from ..utils.plots import BISSL_PLOTS
from ..utils.precision import tf32
from .checkpointer import AtomicCheckpointer, TrainingProgress
from .coupling import FixedStageSystem, proximity_weight
from .faults import FaultChecks
from .hooks import (
    CheckReplicas,
    ExportBackbone,
    PlotMetrics,
    StageProgress,
    StageTimer,
    build_writers,
)
from .hypergrad import Hypergradient, LogHypergradient, solve_metrics, stage_metrics
from .resume import resume_from_last
from .verdict import HypergradientVerdict
from .warmup import train_head, warmup_iterations

logger = logging.getLogger(__name__)


def _fill_missing_grads(params: Sequence[torch.Tensor], grads) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


class BilevelTrainer(FaultChecks, TrainerBase):
    """Trains a :class:`~bissl_det.modeling.meta_arch.BiSSL` model; ``iter`` counts stages."""

    unit = "stage"

    def __init__(self, cfg, model: nn.Module | None = None):
        """``model``: a BiSSL model built elsewhere (tests); default ``build_model(cfg)``."""
        super().__init__()
        if model is None and cfg.MODEL.META_ARCHITECTURE != "BiSSL":
            raise ValueError(
                f"MODEL.META_ARCHITECTURE = {cfg.MODEL.META_ARCHITECTURE!r}: the BiSSL trainer "
                "needs 'BiSSL'"
            )
        self.cfg = cfg
        self.model = build_model(cfg) if model is None else model
        self.device = next(self.model.parameters()).device
        bissl = cfg.BISSL
        if bissl.CHANNELS_LAST:
            self.model.to(memory_format=torch.channels_last)  # keeps parameter identity
        if bissl.ACTIVATION_CHECKPOINTING:
            checkpoint_resnet_blocks(self.model)
        self.max_iter = bissl.STAGES
        self.lower_params = [p for p in self.model.lower.parameters() if p.requires_grad]
        self.upper_params = [p for p in self.model.upper.parameters() if p.requires_grad]
        self.lower_optimizer = build_lars(
            self.model.lower, bissl.LOWER.BASE_LR, bissl.LOWER.MOMENTUM, bissl.LOWER.WEIGHT_DECAY
        )
        self.upper_optimizer = torch.optim.SGD(
            self.upper_params,
            lr=bissl.UPPER.BASE_LR,
            momentum=bissl.UPPER.MOMENTUM,
            weight_decay=bissl.UPPER.WEIGHT_DECAY,
        )
        self.lower_scheduler = build_scheduler(
            self.lower_optimizer,
            bissl.STAGES * bissl.LOWER_STEPS,
            bissl.LOWER.WARMUP_STEPS,
            bissl.LOWER.FINAL_LR_FACTOR,
        )
        self.upper_scheduler = build_scheduler(
            self.upper_optimizer, bissl.STAGES * bissl.UPPER_STEPS, 0, bissl.UPPER.FINAL_LR_FACTOR
        )
        self.progress = TrainingProgress()
        # Per-stage check of the implicit gradient (rank 0 logs it; results.json keeps it).
        self.verdict = HypergradientVerdict(cfg)
        self.hypergrad = Hypergradient(cfg, self.model)
        extra = {}
        if self.hypergrad.fisher is not None and bissl.HYPERGRAD.FISHER_HISTORY > bissl.LOWER_STEPS:
            # A history longer than a stage spans stage boundaries: an exact resume needs it.
            extra["fisher_history"] = self.hypergrad.fisher
        self.checkpointer = AtomicCheckpointer(
            self.model,
            cfg.OUTPUT_DIR,
            lower_optimizer=self.lower_optimizer,
            upper_optimizer=self.upper_optimizer,
            lower_scheduler=self.lower_scheduler,
            upper_scheduler=self.upper_scheduler,
            progress=self.progress,
            **extra,
        )
        self._pretext_iter = self._downstream_iter = None
        self._data_time = 0.0  # seconds this stage spent waiting for batches
        self._coupling: list[float] = []  # lower steps' lambda ||theta - phi|| / ||grad L_P||
        self.register_hooks(self.build_hooks())

    # ---- Set-up ------------------------------------------------------------------------------

    def resume_or_load(self, resume: bool = True) -> None:
        """Resume from OUTPUT_DIR's last checkpoint, or initialise from MODEL.WEIGHTS; then
        every process holds rank 0's weights (what MODEL.WEIGHTS leaves out, e.g. the detector
        head, is initialised from each rank's own seed)."""
        if not (resume and resume_from_last(self, "Resuming at stage %d")):
            self.start_iter = 0
            self.load_initial_weights()
        broadcast_module_(self.model)

    def load_initial_weights(self) -> None:
        if self.cfg.MODEL.WEIGHTS:
            head_loaded = load_pretext_checkpoint(
                self.model, self.cfg.MODEL.WEIGHTS, self.pretext_name
            )
        else:
            logger.warning("MODEL.WEIGHTS is empty: both levels start from random weights")
            head_loaded = False
            self.model.copy_lower_backbone_to_upper()
        if not head_loaded:
            reset_target(self.model.lower)  # an EMA target starts as a copy of the online net

    @property
    def pretext_name(self) -> str:
        return self.cfg.MODEL.BISSL.PRETEXT.lower()

    def build_hooks(self) -> list:
        cfg = self.cfg
        period = cfg.BISSL.CHECKPOINT_PERIOD
        hook_list = [StageTimer(), CheckReplicas(cfg.REPLICA_CHECK_PERIOD)]
        # Every process: a save gathers each rank's RNG state (rank 0 writes). Period 0: only
        # the final checkpoint.
        hook_list.append(
            hooks.PeriodicCheckpointer(
                self.checkpointer, period or self.max_iter, max_iter=self.max_iter
            )
        )
        if comm.is_main_process():
            hook_list.append(ExportBackbone(period))
        if cfg.TEST.EVAL_PERIOD > 0:
            hook_list.append(hooks.EvalHook(cfg.TEST.EVAL_PERIOD, self.evaluate))
        if comm.is_main_process():
            hook_list.append(hooks.PeriodicWriter(self.build_writers(), cfg.BISSL.LOG_PERIOD))
            hook_list.append(LogHypergradient(cfg.BISSL.LOG_PERIOD))
            hook_list.append(StageProgress(cfg.BISSL.LOG_PERIOD))
            hook_list.append(self.verdict)
            hook_list.append(PlotMetrics(cfg.OUTPUT_DIR, BISSL_PLOTS, self.unit))
        return with_graceful_interrupt(hook_list)

    def build_writers(self) -> list:
        return build_writers(self.cfg.OUTPUT_DIR, self.max_iter)

    def evaluate(self) -> dict:
        return evaluate_downstream(self.cfg, self.model)

    def before_train(self) -> None:
        seed = self.cfg.SEED if self.cfg.SEED >= 0 else 0
        # Starting a loader draws from the global RNG: fork it so that a resumed run continues
        # the random stream of the checkpoint exactly.
        with torch.random.fork_rng(devices=[]):
            self._pretext_iter = iter(
                build_pretext_loader(
                    self.cfg,
                    self.cfg.BISSL.LOWER.IMS_PER_BATCH,
                    self.progress.pretext_batches,
                    seed,
                )
            )
            self._downstream_iter = iter(
                build_downstream_train_loader(
                    self.cfg,
                    self.cfg.BISSL.UPPER.IMS_PER_BATCH,
                    self.progress.downstream_batches,
                    seed + 1,
                )
            )
        if not self.progress.warmup_done:
            self.run_head_warmup()
        super().before_train()

    def train(self) -> None:
        super().train(self.start_iter, self.max_iter)

    # ---- Data --------------------------------------------------------------------------------

    def next_pretext_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = time.perf_counter()
        batch = pretext_batch_to_device(self.cfg, next(self._pretext_iter), self.device)
        self._data_time += time.perf_counter() - start
        self.progress.pretext_batches += 1
        return batch

    def next_downstream_batch(self):
        start = time.perf_counter()
        batch = next(self._downstream_iter)
        self._data_time += time.perf_counter() - start
        self.progress.downstream_batches += 1
        return batch

    # ---- Head warm-up ------------------------------------------------------------------------

    def run_head_warmup(self) -> None:
        """phi_d on the frozen upper backbone (engine/warmup.py), then a checkpoint."""
        with self.stopping_every_rank():
            train_head(self, warmup_iterations(self.cfg))
        broadcast_buffers_(self.model)  # BN statistics of the upper level in training mode
        self.progress.warmup_done = True
        self.checkpointer.save("model_warmup", iteration=self.start_iter - 1)

    # ---- One stage ---------------------------------------------------------------------------

    def run_step(self) -> None:
        assert self.model.training, "BilevelTrainer: the model was left in eval mode"
        with self.stopping_every_rank():
            self.run_stage()
        # Each process updated the BN statistics from its own batches: rank 0's for all, as
        # DDP's broadcast_buffers does (they only matter in eval mode: export, evaluation).
        broadcast_buffers_(self.model)

    def run_stage(self) -> None:
        start = time.perf_counter()
        self._data_time = 0.0
        self._coupling = []
        bissl = self.cfg.BISSL
        lower_losses = [self.lower_step(k) for k in range(bissl.LOWER_STEPS)]
        system = self.stage_system()
        try:
            upper_stats = [self.upper_step(system, k) for k in range(bissl.UPPER_STEPS)]
            stage_stats = stage_metrics(system)
        finally:
            system.release()
        pairs = self.model.backbone_pairs
        with torch.no_grad():
            distance = tuple_norm(torch._foreach_sub(pairs.lower, pairs.upper)).item()
        metrics = {
            "lower_loss": sum(x[0] for x in lower_losses) / len(lower_losses),
            "lower_pretext_loss": sum(x[1] for x in lower_losses) / len(lower_losses),
            "theta_phi_distance": distance,
            # lambda ||theta - phi|| / ||grad L_P||, mean over the stage's lower steps.
            "coupling_ratio": sum(self._coupling) / len(self._coupling),
            "lr_lower": self.lower_optimizer.param_groups[0]["lr"],
            "lr": self.upper_optimizer.param_groups[0]["lr"],
            "data_time": self._data_time,
        }
        for key in upper_stats[0]:
            metrics[key] = sum(s[key] for s in upper_stats) / len(upper_stats)
        # The worst step matters for these: one indefinite solve is one too many.
        residuals = [s["hypergrad_rel_residual"] for s in upper_stats]
        metrics["hypergrad_rel_residual_max"] = max(residuals)
        metrics.update(stage_stats)
        self.storage.put_scalars(**metrics, smoothing_hint=False)
        self.storage.put_scalar("stage_time", time.perf_counter() - start, smoothing_hint=False)

    def first_order_precision(self):
        """Autocast for first-order passes (BISSL.AMP); the Hessian stays float32."""
        amp = self.cfg.BISSL.AMP
        return torch.autocast(
            self.device.type, dtype=getattr(torch, amp.DTYPE), enabled=amp.ENABLED
        )

    def lower_step(self, step: int) -> tuple[float, float]:
        """One step on L_P(theta, theta_p) + lambda/2 ||theta - phi||^2. Returns both losses."""
        lam = proximity_weight(self.cfg.BISSL)  # 0 for the decoupled control
        self.where = ("lower", step)
        batch = self.next_pretext_batch()
        with self.first_order_precision():
            pretext_loss = self.model.pretext_loss(*batch)
        self.lower_optimizer.zero_grad(set_to_none=True)
        pretext_loss.backward()
        # Every process learns of a NaN on any process here, in the gradients' all-reduce.
        flags = self.fault_flags(pretext_loss)
        all_reduce_grads_(self.lower_params, flags)
        self.stop_on_flagged(flags, pretext_loss, "pretext loss", "lower", step)
        pairs = self.model.backbone_pairs
        with torch.no_grad():
            grads = [p.grad for p in pairs.lower]
            if any(g is None for g in grads):
                raise RuntimeError("a lower backbone parameter received no pretext gradient")
            # The pretext gradient alone (before proximity and clipping) feeds the Fisher.
            self.hypergrad.record_lower_gradient(grads)
            pretext_norm = tuple_norm(grads).item()
            # The proximity gradient lambda (theta - phi) in closed form; phi is a constant here.
            proximity, pull = 0.0, 0.0
            if lam:  # decoupled: phi is not even read
                diff = torch._foreach_sub(pairs.lower, pairs.upper)
                distance = tuple_norm(diff).item()
                proximity, pull = 0.5 * lam * distance**2, lam * distance
                torch._foreach_add_(grads, diff, alpha=lam)
            # How strongly phi pulls theta against the pretext task: ~1 means they balance.
            self._coupling.append(pull / pretext_norm if pretext_norm > 0 else math.inf)
        self.clip_and_check(self.lower_params, self.cfg.BISSL.LOWER.CLIP_GRAD_NORM, "lower", step)
        self.lower_optimizer.step()
        self.lower_scheduler.step()
        if isinstance(self.model.lower, MomentumTarget):
            self.model.lower.update_target()
        pretext = pretext_loss.item()
        return pretext + proximity, pretext

    def stage_system(self) -> StageSystem | FixedStageSystem:
        """The stage's implicit-gradient system (BISSL.HYPERGRAD), its matrix built once.

        "hessian"/"ggn" draw one pretext batch and keep its first-order graph; BN statistics of
        that forward go to throw-away copies, so products move neither the lower model nor
        BYOL's target. "fisher" uses the lower steps' gradient history: no pass at all.
        A BISSL.COUPLING other than "bilevel" solves nothing (x = g or 0), drawing the same batch.
        """
        self.where = ("upper (curvature)", 0)
        coupling = self.cfg.BISSL.COUPLING
        if coupling != "bilevel":
            curvature = self.cfg.BISSL.HYPERGRAD.CURVATURE
            return FixedStageSystem.draw(coupling, curvature, self.next_pretext_batch)
        with tf32(self.cfg.BISSL.HYPERGRAD.ALLOW_TF32):
            system = self.hypergrad.stage_system(self.next_pretext_batch)
        loss = system.curvature.loss
        if loss is not None:
            flags = self.fault_flags(loss)
            all_reduce_mean_([flags])  # one tiny collective per stage
            self.stop_on_flagged(flags, loss, "pretext loss (curvature batch)", "upper", 0)
        return system

    def upper_step(self, system: StageSystem | FixedStageSystem, step: int) -> dict[str, float]:
        bissl = self.cfg.BISSL
        model, pairs = self.model, self.model.backbone_pairs
        head = model.upper_head_parameters()
        self.where = ("upper", step)
        batch = self.next_downstream_batch()

        # L_D(theta, phi_d): g for the implicit gradient, and phi_d's first gradient term.
        with self.first_order_precision(), self.divergence_guard("upper", step):
            lower_view = sum(model.downstream_losses(batch, with_lower_backbone=True).values())
        grads = torch.autograd.grad(lower_view, (*pairs.lower, *head), allow_unused=True)
        grads = _fill_missing_grads((*pairs.lower, *head), grads)
        head_grads = grads[len(pairs.lower) :]
        *g, flags = all_reduce_mean([*grads[: len(pairs.lower)], self.fault_flags(lower_view)])
        self.stop_on_flagged(flags, lower_view, "downstream loss on theta", "upper", step)
        try:
            with tf32(self.cfg.BISSL.HYPERGRAD.ALLOW_TF32):
                x, solve_info = system.solve(tuple(g))
        except (NonFiniteError, IndefiniteSystemError) as e:
            # The solver sees all-reduced g and products: every process stops here alike.
            self.fail_nonfinite(f"implicit gradient solver: {e}", "upper", step, agreed=True)

        # gamma * L_D(phi, phi_d) on the same batch.
        self.upper_optimizer.zero_grad(set_to_none=True)
        with self.first_order_precision(), self.divergence_guard("upper", step):
            upper_losses = model.downstream_losses(batch)
            upper_loss = sum(upper_losses.values())
        (bissl.GAMMA * upper_loss).backward()
        flags = self.fault_flags(upper_loss)
        with torch.no_grad():
            for p, extra in zip(head, head_grads, strict=True):
                p.grad = extra if p.grad is None else p.grad.add_(extra)
            all_reduce_grads_(self.upper_params, flags)
        self.stop_on_flagged(flags, upper_loss, "downstream loss on phi", "upper", step)
        with torch.no_grad():
            phi_grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in pairs.upper]
            torch._foreach_add_(phi_grads, list(x))
            for p, grad in zip(pairs.upper, phi_grads, strict=True):
                p.grad = grad
        grad_norm = self.clip_and_check(
            self.upper_params, bissl.UPPER.CLIP_GRAD_NORM, "upper", step
        )
        self.upper_optimizer.step()
        self.upper_scheduler.step()
        stats = {
            "upper_loss": upper_loss.item(),
            "upper_loss_on_theta": lower_view.item(),
            "upper_grad_norm": grad_norm,
            **solve_metrics(solve_info),
        }
        stats.update({f"upper/{k}": v.item() for k, v in upper_losses.items()})
        return stats

    def export(self, final: bool = True) -> dict:
        """Write theta, the BiSSL result: OUTPUT_DIR/lower_backbone{,_torchvision}.pth at the
        end of a successful run; lower_backbone_stage<N>{,_torchvision}.pth after stage N when
        periodic (intermediate results, kept: each can be fine-tuned to follow the run)."""
        name = "lower_backbone" if final else f"lower_backbone_stage{self.iter + 1}"
        paths = export_backbone(
            self.model.lower, self.cfg.OUTPUT_DIR, self.pretext_name, name, run_classes(self.cfg)
        )
        if not final:
            logger.info("Periodic export after stage %d: %s", self.iter + 1, paths["detectron2"])
        return paths
