"""ClassifierTrainer: one classification transfer run on Detectron2's SimpleTrainer.

A single cost (the classifier's loss), a single optimiser (SGD with momentum over the trainable
parameters) and a single data source: exactly what ``SimpleTrainer`` is for. Everything else is a
standard hook: IterationTimer, LRScheduler (cosine from the base lr to 0, no warm-up),
EvalHook (every CLS.SOLVER.EVAL_PERIOD steps and after the last), PeriodicWriter (console line
with ETA, metrics.json, TensorBoard when installed) and PNG plots of loss, lr and accuracy.

Linear probe: the backbone's weights get no gradient and its BN layers stay in eval mode (their
running statistics never change), also across the evaluations, which switch the model back to
training mode afterwards.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from detectron2.config import CfgNode
from detectron2.engine import SimpleTrainer, hooks
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from torch import nn
from torch.utils.data import Dataset

from ..checkpoint.backbone import load_backbone_weights, read_backbone_weights
from ..data.classification_transfer import (
    ClassificationData,
    build_cls_eval_loader,
    build_cls_train_loader,
    training_iters,
)
from ..evaluation.evaluate import evaluate_classifier
from ..solver.build import warmup_cosine
from ..utils.plots import CLASSIFICATION_PLOTS
from .hooks import PlotMetrics, build_writers

logger = logging.getLogger(__name__)


def _stay_in_eval_mode(module: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(module, False)


def freeze_backbone_(model: nn.Module) -> None:
    """Linear probe: no gradients into the backbone and BN in eval mode (statistics frozen).

    ``model.train()`` (SimpleTrainer, evaluation) leaves the backbone in eval mode: the way
    SimpleTrainer's documentation suggests for a submodule that must behave as in evaluation.
    """
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    model.backbone.train = _stay_in_eval_mode.__get__(model.backbone)
    model.backbone.eval()


def read_classifier_backbone(cfg: CfgNode) -> dict[str, torch.Tensor]:
    """MODEL.WEIGHTS as a Detectron2 ResNet state dict; an empty key is an error here."""
    if not cfg.MODEL.WEIGHTS:
        raise ValueError("MODEL.WEIGHTS is empty: give the backbone checkpoint to evaluate")
    return read_backbone_weights(cfg.MODEL.WEIGHTS)


def build_classifier(
    cfg: CfgNode, backbone_state: dict[str, torch.Tensor], linear_probe: bool
) -> nn.Module:
    """ResNetClassifier of ``cfg`` with the backbone loaded (strictly) and frozen for a probe."""
    model = build_model(cfg)
    load_backbone_weights(model.backbone, backbone_state, source=cfg.MODEL.WEIGHTS)
    if linear_probe:
        freeze_backbone_(model)
    return model


class ClassifierTrainer(SimpleTrainer):
    """Trains a ResNetClassifier on ``train_set`` and scores it on ``eval_set``.

    ``trainer.train()`` returns the last evaluation, ``{metric: percent}``; metrics.json,
    TensorBoard events and plots/ are written to ``output_dir``.
    """

    def __init__(
        self,
        cfg: CfgNode,
        backbone_state: dict[str, torch.Tensor],
        train_set: Dataset,
        eval_set: Dataset,
        *,
        lr: float,
        weight_decay: float,
        seed: int,
        linear_probe: bool,
        output_dir: str | Path,
        eval_name: str = "test",
    ):
        solver = cfg.CLS.SOLVER
        seed_all_rng(seed)  # the linear layer's init, the data order and the augmentations
        model = build_classifier(cfg, backbone_state, linear_probe)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(
            params, lr=lr, momentum=solver.MOMENTUM, weight_decay=weight_decay
        )
        super().__init__(model, build_cls_train_loader(cfg, train_set, seed), optimizer)
        self.cfg = cfg
        self.max_iter = training_iters(cfg, len(train_set))
        self.multi_label = cfg.MODEL.CLASSIFIER.MULTI_LABEL
        self.eval_loader = build_cls_eval_loader(cfg, eval_set)
        self.eval_name = eval_name
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # A run is never resumed: a rerun starts its curves afresh (JSONWriter appends).
        (self.output_dir / "metrics.json").unlink(missing_ok=True)
        self.last_metrics: dict[str, float] = {}
        self.register_hooks(self.build_hooks())

    def build_hooks(self) -> list:
        solver = self.cfg.CLS.SOLVER
        return [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=warmup_cosine(self.max_iter, 0, 0.0)),
            # Before the writer, so that the final evaluation is in metrics.json.
            hooks.EvalHook(solver.EVAL_PERIOD, self.evaluate),
            hooks.PeriodicWriter(build_writers(self.output_dir, self.max_iter), solver.LOG_PERIOD),
            PlotMetrics(str(self.output_dir), CLASSIFICATION_PLOTS, xlabel="step"),
        ]

    def evaluate(self) -> dict[str, dict[str, float]]:
        self.last_metrics = evaluate_classifier(self.model, self.eval_loader, self.multi_label)
        logger.info("step %d %s: %s", self.iter + 1, self.eval_name, self.last_metrics)
        return {self.eval_name: self.last_metrics}

    def train(self) -> dict[str, float]:
        super().train(0, self.max_iter)
        return self.last_metrics


def train_classifier(
    cfg: CfgNode,
    backbone_state: dict[str, torch.Tensor],
    data: ClassificationData,
    *,
    lr: float,
    weight_decay: float,
    seed: int,
    linear_probe: bool,
    output_dir: str | Path,
    run_name: str = "run",
) -> tuple[nn.Module, dict[str, float]]:
    """One run: (trained model, its scores on ``data.eval_set``).

    Raises:
        FloatingPointError: the loss became NaN/Inf (names the run, lr and weight decay).
    """
    trainer = ClassifierTrainer(
        cfg,
        backbone_state,
        data.train_set,
        data.eval_set,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        linear_probe=linear_probe,
        output_dir=output_dir,
        eval_name=data.eval_name,
    )
    logger.info(
        "%s: %s, lr %.3g, weight decay %.3g, %d steps, scored on %s -> %s",
        run_name,
        "linear probe" if linear_probe else "fine-tuning",
        lr,
        weight_decay,
        trainer.max_iter,
        data.eval_name,
        output_dir,
    )
    try:
        metrics = trainer.train()
    except FloatingPointError as e:
        raise FloatingPointError(
            f"{run_name} (lr {lr:.3g}, weight decay {weight_decay:.3g}): {e}"
        ) from e
    return trainer.model, metrics
