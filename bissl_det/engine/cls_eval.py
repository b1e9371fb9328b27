"""Classification transfer of a backbone checkpoint: full fine-tuning or a linear probe.

Protocol (tools/eval_cls.py):

* Model: ``ResNetClassifier`` (MODEL.RESNETS trunk + global pooling + linear layer), the backbone
  loaded from MODEL.WEIGHTS (any format :func:`~bissl_det.checkpoint.convert_to_detectron2` reads).
  Missing backbone keys are refused.
* Training: SGD with momentum, cosine from lr to 0 over CLS.SOLVER.ITERS (or EPOCHS) steps,
  random-resized-crop + flip. A linear probe freezes the backbone's weights AND its BN statistics
  (backbone in eval mode); fine-tuning trains everything.
* Evaluation on CLS.TEST_ROOT: top-1 and mean per-class accuracy, or VOC07 11-point mAP.
* ``seeds`` runs (seeds SEED, SEED + 1, ...): per-seed numbers, mean and sample std (ddof 1).
* ``search_trials`` > 0: random search first. lr and weight decay are drawn log-uniformly from
  CLS.SEARCH.LR_RANGE / WD_RANGE; each trial trains on TRAIN_ROOT minus a held-out validation
  split (CLS.SEARCH.VAL_FRACTION, carved per class for single-label sets, seeded by SEED) and is
  scored there (top-1, or mAP); a diverging trial is recorded with score null. The seeds then
  run with the best lr/wd on the whole TRAIN_ROOT. The test set is never used for selection.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..checkpoint import convert_to_detectron2, load_checkpoint_file
from ..data.build import (
    _classification_dataset,
    collate_classification,
    normalisation,
    per_process_batch,
)
from ..data.classification import classification_transforms
from ..data.pretext import InfiniteSampler
from ..evaluation.evaluate import evaluate_classifier
from ..solver.build import build_scheduler

logger = logging.getLogger(__name__)

RESULTS_FILE = "cls_results.json"


# ---- Backbone ----------------------------------------------------------------------------------


def read_backbone_weights(path: str) -> dict[str, torch.Tensor]:
    """MODEL.WEIGHTS -> Detectron2 ResNet state dict (heads dropped); errors name the file."""
    if not path:
        raise ValueError("MODEL.WEIGHTS is empty: give the backbone checkpoint to evaluate")
    if not Path(path).is_file():
        raise FileNotFoundError(f"MODEL.WEIGHTS = {path}: file not found")
    return convert_to_detectron2(load_checkpoint_file(path)).model


def load_backbone_state(backbone: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """Load ``state`` into ``backbone``; refuse missing or unexpected keys, listing them."""
    incompatible = backbone.load_state_dict(state, strict=False)
    missing = [k for k in incompatible.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or incompatible.unexpected_keys:
        raise KeyError(
            f"MODEL.WEIGHTS = {path} does not match MODEL.RESNETS: missing keys {missing}, "
            f"unexpected keys {incompatible.unexpected_keys}"
        )


def freeze_backbone_(model: nn.Module) -> None:
    """Linear probe: no gradients into the backbone and BN in eval mode (statistics frozen)."""
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    model.backbone.eval()


# ---- Data --------------------------------------------------------------------------------------


def check_classification_config(cfg: CfgNode, train_set: Dataset) -> None:
    """Errors naming the key when the model and the data disagree."""
    if cfg.MODEL.META_ARCHITECTURE != "ResNetClassifier":
        raise ValueError(
            f"MODEL.META_ARCHITECTURE = {cfg.MODEL.META_ARCHITECTURE!r}: eval_cls needs "
            "'ResNetClassifier'"
        )
    multi_label = cfg.CLS.FORMAT == "voc07"
    if multi_label != cfg.MODEL.CLASSIFIER.MULTI_LABEL:
        raise ValueError(
            f"MODEL.CLASSIFIER.MULTI_LABEL = {cfg.MODEL.CLASSIFIER.MULTI_LABEL} but CLS.FORMAT = "
            f"{cfg.CLS.FORMAT!r} (voc07 is multi-label, imagefolder single-label)"
        )
    if len(train_set.classes) != cfg.MODEL.CLASSIFIER.NUM_CLASSES:
        raise ValueError(
            f"MODEL.CLASSIFIER.NUM_CLASSES = {cfg.MODEL.CLASSIFIER.NUM_CLASSES}, but "
            f"{cfg.CLS.TRAIN_ROOT} has {len(train_set.classes)} classes {train_set.classes}"
        )


def validation_split(targets, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, val) carving ``fraction`` of a training set out for the search.

    Single-label (1-D targets): per class, round(fraction * n) images (at least 1 when the class
    has 2 or more), so rare classes are scored too. Multi-label: a plain random subset.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"CLS.SEARCH.VAL_FRACTION = {fraction}: must be in (0, 1)")
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    if targets.ndim == 1:
        val: list[int] = []
        for c in np.unique(targets):
            members = rng.permutation(np.flatnonzero(targets == c))
            if len(members) >= 2:
                val += members[: max(1, round(fraction * len(members)))].tolist()
    else:
        order = rng.permutation(len(targets))
        val = order[: max(1, round(fraction * len(targets)))].tolist()
    held_out = set(val)
    return [i for i in range(len(targets)) if i not in held_out], sorted(val)


def _targets(dataset: Dataset):
    targets = dataset.targets
    return targets.numpy() if isinstance(targets, torch.Tensor) else targets


def _test_view(cfg: CfgNode, dataset: Dataset) -> Dataset:
    """The same training images with the evaluation transform (to score search trials)."""
    mean, std = normalisation(cfg)
    dataset.transform = classification_transforms(False, cfg.CLS.IMAGE_SIZE, mean, std)
    return dataset


def _eval_loader(cfg: CfgNode, dataset: Dataset) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=cfg.CLS.SOLVER.TEST_IMS_PER_BATCH,
        num_workers=cfg.CLS.NUM_WORKERS,
        collate_fn=collate_classification,
    )


def training_iters(cfg: CfgNode, num_images: int) -> int:
    """CLS.SOLVER.ITERS, or EPOCHS passes over ``num_images`` at IMS_PER_BATCH."""
    solver = cfg.CLS.SOLVER
    if solver.ITERS > 0:
        return solver.ITERS
    if solver.EPOCHS <= 0:
        raise ValueError("CLS.SOLVER: set ITERS > 0 or EPOCHS > 0")
    return max(1, math.ceil(solver.EPOCHS * num_images / solver.IMS_PER_BATCH))


# ---- Progress ----------------------------------------------------------------------------------


class ProgressLog:
    """Progress lines over every run of an evaluation (search trials and seeds), with ETA."""

    def __init__(self, total_steps: int, period: int):
        self.total, self.period, self.done = total_steps, max(1, period), 0
        self.start = time.perf_counter()

    def step(self, run: str, it: int, iters: int, loss: float, lr: float) -> None:
        self.done += 1
        if (it + 1) % self.period and it + 1 != iters:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        logger.info(
            "%s  iter %d/%d  loss %.4f  lr %.3g  eta %s",
            run,
            it + 1,
            iters,
            loss,
            lr,
            time.strftime("%H:%M:%S", time.gmtime(eta)),
        )


# ---- One run -----------------------------------------------------------------------------------


def train_classifier(
    cfg: CfgNode,
    backbone_state: dict[str, torch.Tensor],
    train_set: Dataset,
    *,
    seed: int,
    lr: float,
    weight_decay: float,
    linear_probe: bool,
    run_name: str = "run",
    progress: ProgressLog | None = None,
) -> nn.Module:
    """Build the classifier, load the backbone, train with SGD + cosine; returns the model.

    Raises:
        FloatingPointError: the loss became NaN/Inf (names the run, step, lr and wd).
    """
    solver = cfg.CLS.SOLVER
    seed_all_rng(seed)  # the linear layer's init and the data order
    model = build_model(cfg)
    load_backbone_state(model.backbone, backbone_state, cfg.MODEL.WEIGHTS)
    model.train()
    if linear_probe:
        freeze_backbone_(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=solver.MOMENTUM, weight_decay=weight_decay)
    iters = training_iters(cfg, len(train_set))
    scheduler = build_scheduler(optimizer, iters, 0, 0.0)
    batch = per_process_batch(solver.IMS_PER_BATCH, "CLS.SOLVER.IMS_PER_BATCH")
    loader = DataLoader(
        train_set,
        batch_size=batch,
        sampler=InfiniteSampler(len(train_set), seed=seed),
        num_workers=cfg.CLS.NUM_WORKERS,
        collate_fn=collate_classification,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
    )
    for it, data in zip(range(iters), loader, strict=False):  # the loader is endless
        loss = model(data)["loss_cls"]
        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f"{run_name}: non-finite loss ({loss.item()}) at step {it} with lr {lr:.3g}, "
                f"weight decay {weight_decay:.3g}"
            )
        lr_now = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if progress is not None:
            progress.step(run_name, it, iters, loss.item(), lr_now)
    return model


# ---- The protocol ------------------------------------------------------------------------------


def summarise(per_seed: Sequence[dict[str, float]]) -> tuple[dict, dict]:
    """Mean and sample standard deviation (ddof 1; 0 for one seed) of every metric."""
    keys = per_seed[0].keys()
    values = {k: np.array([m[k] for m in per_seed], dtype=np.float64) for k in keys}
    mean = {k: float(v.mean()) for k, v in values.items()}
    std = {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()}
    return mean, std


def random_search(
    cfg: CfgNode,
    backbone_state: dict[str, torch.Tensor],
    trials: int,
    linear_probe: bool,
    progress: ProgressLog,
) -> dict:
    """Score ``trials`` (lr, wd) draws on a validation split of TRAIN_ROOT; see module doc."""
    search, base_seed = cfg.CLS.SEARCH, max(cfg.SEED, 0)
    train_full = _classification_dataset(cfg, train=True)
    train_idx, val_idx = validation_split(_targets(train_full), search.VAL_FRACTION, base_seed)
    train_part = Subset(train_full, train_idx)
    val_loader = _eval_loader(
        cfg, Subset(_test_view(cfg, _classification_dataset(cfg, train=True)), val_idx)
    )
    multi_label = cfg.MODEL.CLASSIFIER.MULTI_LABEL
    metric = "mAP" if multi_label else "top1"
    rng = np.random.default_rng(base_seed)
    results = []
    for k in range(trials):
        lr = float(np.exp(rng.uniform(*np.log(search.LR_RANGE))))
        wd = float(np.exp(rng.uniform(*np.log(search.WD_RANGE))))
        name = f"search {k + 1}/{trials} (lr {lr:.3g}, wd {wd:.3g})"
        try:
            model = train_classifier(
                cfg,
                backbone_state,
                train_part,
                seed=base_seed,
                lr=lr,
                weight_decay=wd,
                linear_probe=linear_probe,
                run_name=name,
                progress=progress,
            )
            val = evaluate_classifier(model, val_loader, multi_label)
            score = val[metric]
        except FloatingPointError as e:
            logger.warning("%s", e)
            val, score = {}, None  # diverged: never the best
        logger.info("%s: validation %s = %s", name, metric, score)
        results.append({"lr": lr, "weight_decay": wd, "val": val, "score": score})
    scored = [r for r in results if r["score"] is not None]
    if not scored:
        raise FloatingPointError(f"random search: all {trials} trials diverged")
    best = max(scored, key=lambda r: r["score"])
    return {
        "trials": results,
        "metric": metric,
        "val_fraction": search.VAL_FRACTION,
        "num_train": len(train_idx),
        "num_val": len(val_idx),
        "best": {"lr": best["lr"], "weight_decay": best["weight_decay"], "score": best["score"]},
    }


def run_cls_eval(
    cfg: CfgNode, seeds: int = 1, search_trials: int = 0, linear_probe: bool = False
) -> dict:
    """The whole protocol; writes and returns OUTPUT_DIR/cls_results.json's content."""
    if comm.get_world_size() > 1:
        raise RuntimeError("eval_cls.py runs in one process: use --num-gpus 1")
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: need at least 1")
    if search_trials < 0:
        raise ValueError(f"--search {search_trials}: must be >= 0")
    train_set = _classification_dataset(cfg, train=True)
    check_classification_config(cfg, train_set)
    test_set = _classification_dataset(cfg, train=False)
    if test_set.classes != train_set.classes:
        raise ValueError(
            f"CLS.TEST_ROOT classes {test_set.classes} differ from CLS.TRAIN_ROOT classes "
            f"{train_set.classes}"
        )
    backbone_state = read_backbone_weights(cfg.MODEL.WEIGHTS)
    iters_full = training_iters(cfg, len(train_set))
    total = seeds * iters_full
    if search_trials:
        n_val = len(validation_split(_targets(train_set), cfg.CLS.SEARCH.VAL_FRACTION, 0)[1])
        total += search_trials * training_iters(cfg, len(train_set) - n_val)
    progress = ProgressLog(total, cfg.CLS.SOLVER.LOG_PERIOD)
    protocol = "linear_probe" if linear_probe else "finetune"
    results: dict = {
        "weights": cfg.MODEL.WEIGHTS,
        "protocol": protocol,
        "train_root": cfg.CLS.TRAIN_ROOT,
        "test_root": cfg.CLS.TEST_ROOT,
        "num_train": len(train_set),
        "num_test": len(test_set),
    }
    lr, wd = cfg.CLS.SOLVER.BASE_LR, cfg.CLS.SOLVER.WEIGHT_DECAY
    if search_trials:
        results["search"] = random_search(
            cfg, backbone_state, search_trials, linear_probe, progress
        )
        lr, wd = results["search"]["best"]["lr"], results["search"]["best"]["weight_decay"]
    results["hparams"] = {
        "lr": lr,
        "weight_decay": wd,
        "iters": iters_full,
        "ims_per_batch": cfg.CLS.SOLVER.IMS_PER_BATCH,
    }
    test_loader = _eval_loader(cfg, test_set)
    per_seed = []
    for k in range(seeds):
        seed = max(cfg.SEED, 0) + k
        model = train_classifier(
            cfg,
            backbone_state,
            train_set,
            seed=seed,
            lr=lr,
            weight_decay=wd,
            linear_probe=linear_probe,
            run_name=f"{protocol} seed {seed} ({k + 1}/{seeds})",
            progress=progress,
        )
        metrics = evaluate_classifier(model, test_loader, cfg.MODEL.CLASSIFIER.MULTI_LABEL)
        logger.info("seed %d test: %s", seed, metrics)
        per_seed.append({"seed": seed, "metrics": metrics})
    results["per_seed"] = per_seed
    results["mean"], results["std"] = summarise([r["metrics"] for r in per_seed])
    out = Path(cfg.OUTPUT_DIR) / RESULTS_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    logger.info(
        "%s of %s over %d seed(s): mean %s, std %s (%s)",
        protocol,
        cfg.MODEL.WEIGHTS,
        seeds,
        results["mean"],
        results["std"],
        out,
    )
    return results
