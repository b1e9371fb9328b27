"""The deterministic linear probe of tools/eval_cls.py (``--logistic-probe``).

The backbone of MODEL.WEIGHTS is frozen (eval mode: BN running statistics, no dropout of any
kind), each image is seen once without augmentation (the evaluation transform: resize + centre
crop), and its globally pooled res5 features go to an L2 logistic regression solved by L-BFGS in
float64 (:mod:`bissl_det.evaluation.linear_probe`). The L2 strength is chosen on
CLS.PROBE.VAL_FRACTION of CLS.TRAIN_ROOT (per class, seeded by SEED); the probe is refitted on all
of CLS.TRAIN_ROOT with it and scored once on CLS.TEST_ROOT. Nothing here draws a random number
after the split, so a rerun gives the same accuracy to the last digit.
"""

from __future__ import annotations

import copy
import logging

import torch
from detectron2.config import CfgNode

from ..data.classification_transfer import (
    ClassificationData,
    build_cls_eval_loader,
    dataset_targets,
    eval_view,
    validation_split,
)
from ..evaluation.evaluate import classification_metrics
from ..evaluation.linear_probe import fit_logistic_probe, select_l2
from .cls_trainer import build_classifier

logger = logging.getLogger(__name__)

# The number a probe is selected by on the validation split.
SELECTION_METRIC = {False: "top1", True: "mAP"}


@torch.no_grad()
def extract_features(model: torch.nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled res5 features in float64, targets) of every sample, in the loader's order."""
    model.eval()
    features, targets = [], []
    for batch in loader:
        images = batch["images"].to(model.device)
        features.append(model.backbone(images)["res5"].mean(dim=(2, 3)).double().cpu())
        targets.append(batch["targets"])
    return torch.cat(features), torch.cat(targets)


def run_logistic_probe(
    cfg: CfgNode, backbone_state: dict[str, torch.Tensor], data: ClassificationData
) -> tuple[dict[str, float], dict]:
    """(test metrics in percent, the probe's record: chosen L2, validation scores, solver)."""
    probe_cfg = cfg.CLS.PROBE
    multi_label = cfg.MODEL.CLASSIFIER.MULTI_LABEL
    num_classes = cfg.MODEL.CLASSIFIER.NUM_CLASSES
    model = build_classifier(cfg, backbone_state, linear_probe=True)
    # A shallow copy shares the file list; only its own transform attribute is replaced.
    train_view = eval_view(cfg, copy.copy(data.train_set))
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True  # the same features on every rerun, GPU included
    try:
        train_x, train_y = extract_features(model, build_cls_eval_loader(cfg, train_view))
        test_x, test_y = extract_features(model, build_cls_eval_loader(cfg, data.eval_set))
    finally:
        torch.backends.cudnn.deterministic = deterministic
    fit_idx, val_idx = validation_split(
        dataset_targets(train_view), probe_cfg.VAL_FRACTION, max(cfg.SEED, 0)
    )
    if not val_idx:
        raise ValueError(
            f"CLS.PROBE.VAL_FRACTION = {probe_cfg.VAL_FRACTION}: no class of {cfg.CLS.TRAIN_ROOT} "
            "has 2 images, nothing to choose the L2 strength on"
        )
    fit_idx, val_idx = torch.tensor(fit_idx), torch.tensor(val_idx)
    selection = SELECTION_METRIC[multi_label]

    def fit(x: torch.Tensor, y: torch.Tensor, l2: float):
        return fit_logistic_probe(
            x, y, num_classes, l2, multi_label, max_iter=probe_cfg.MAX_ITER, tol=probe_cfg.TOL
        )

    def val_score(probe) -> float:
        logits = probe.logits(train_x[val_idx])
        return classification_metrics(logits, train_y[val_idx], multi_label)[selection]

    l2, val_scores = select_l2(
        lambda l2: fit(train_x[fit_idx], train_y[fit_idx], l2), val_score, probe_cfg.L2_GRID
    )
    probe = fit(train_x, train_y, l2)
    if not probe.converged:
        logger.warning(
            "linear probe: L-BFGS stopped after %d iterations with max |gradient| %.2e > "
            "CLS.PROBE.TOL %.1e: raise CLS.PROBE.MAX_ITER",
            probe.iterations,
            probe.grad_norm,
            probe_cfg.TOL,
        )
    metrics = classification_metrics(probe.logits(test_x), test_y, multi_label)
    record = {
        "l2": l2,
        "selected_by": f"val/{selection}",
        "val_scores": [{"l2": k, selection: v} for k, v in val_scores.items()],
        "num_fit": len(fit_idx),
        "num_val": len(val_idx),
        "feature_dim": train_x.shape[1],
        "iterations": probe.iterations,
        "grad_norm": probe.grad_norm,
        "converged": probe.converged,
    }
    logger.info(
        "linear probe (L-BFGS, float64): L2 %.1e chosen on %d validation images (%s), test %s",
        l2,
        len(val_idx),
        {f"{k:.0e}": round(v, 2) for k, v in val_scores.items()},
        metrics,
    )
    return metrics, record
