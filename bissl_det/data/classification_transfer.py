"""The data side of classification transfer: checks, held-out splits, loaders, run length."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from detectron2.config import CfgNode
from torch.utils.data import DataLoader, Dataset, Subset

from .classification import classification_transforms
from .common import normalisation, per_process_batch
from .tasks import (
    check_classification_model,
    classification_dataset,
    classification_loader,
    standalone_task,
)


def check_classification_config(cfg: CfgNode, train_set: Dataset) -> None:
    """Errors naming the key when the model and the data disagree."""
    task = standalone_task(cfg)
    if task is None or task.name != "classification":
        raise ValueError(
            f"MODEL.META_ARCHITECTURE = {cfg.MODEL.META_ARCHITECTURE!r}: classification transfer "
            "needs the classification task's model ('ResNetClassifier')"
        )
    check_classification_model(cfg, train_set)


def held_out_indices(num: int, fraction: float, seed: int) -> list[int]:
    """A seeded random ``fraction`` (at least one) of ``range(num)``, sorted."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction {fraction}: must be in (0, 1)")
    order = np.random.default_rng(seed).permutation(num)
    return sorted(order[: max(1, round(fraction * num))].tolist())


def validation_split(targets, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, val) carving ``fraction`` of a training set out for the search.

    Single-label (1-D targets): per class, round(fraction * n) images (at least 1 when the class
    has 2 or more), so rare classes are scored too. Multi-label: a plain random subset.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"CLS.SEARCH.VAL_FRACTION = {fraction}: must be in (0, 1)")
    targets = np.asarray(targets)
    if targets.ndim == 1:
        rng = np.random.default_rng(seed)
        val: list[int] = []
        for c in np.unique(targets):
            members = rng.permutation(np.flatnonzero(targets == c))
            if len(members) >= 2:
                val += members[: max(1, round(fraction * len(members)))].tolist()
    else:
        val = held_out_indices(len(targets), fraction, seed)
    held_out = set(val)
    return [i for i in range(len(targets)) if i not in held_out], sorted(val)


def dataset_targets(dataset: Dataset):
    """Class ids (single-label) or multi-hot rows (multi-label) of a classification dataset."""
    targets = dataset.targets
    return targets.numpy() if isinstance(targets, torch.Tensor) else targets


def eval_view(cfg: CfgNode, dataset: Dataset) -> Dataset:
    """The same images with the evaluation transform (center crop, no augmentation)."""
    mean, std = normalisation(cfg)
    dataset.transform = classification_transforms(False, cfg.CLS.IMAGE_SIZE, mean, std)
    return dataset


def build_cls_eval_loader(cfg: CfgNode, dataset: Dataset) -> DataLoader:
    """Finite, unshuffled loader at CLS.SOLVER.TEST_IMS_PER_BATCH."""
    return classification_loader(cfg, dataset, cfg.CLS.SOLVER.TEST_IMS_PER_BATCH)


def build_cls_train_loader(cfg: CfgNode, dataset: Dataset, seed: int) -> DataLoader:
    """Endless augmented loader at CLS.SOLVER.IMS_PER_BATCH (seeded order, full batches)."""
    batch = per_process_batch(cfg.CLS.SOLVER.IMS_PER_BATCH, "CLS.SOLVER.IMS_PER_BATCH")
    return classification_loader(cfg, dataset, batch, seed)


def training_iters(cfg: CfgNode, num_images: int) -> int:
    """CLS.SOLVER.ITERS, or EPOCHS passes over ``num_images`` at IMS_PER_BATCH."""
    solver = cfg.CLS.SOLVER
    if solver.ITERS > 0:
        return solver.ITERS
    if solver.EPOCHS <= 0:
        raise ValueError("CLS.SOLVER: set ITERS > 0 or EPOCHS > 0")
    return max(1, math.ceil(solver.EPOCHS * num_images / solver.IMS_PER_BATCH))


@dataclass
class ClassificationData:
    """What a run trains on and what it is scored on (``eval_name``: "test" or "val")."""

    train_set: Dataset
    eval_set: Dataset
    eval_name: str


def load_test_protocol_data(cfg: CfgNode) -> ClassificationData:
    """All of CLS.TRAIN_ROOT to train, CLS.TEST_ROOT to score; checked against the model."""
    train_set = classification_dataset(cfg, train=True)
    check_classification_config(cfg, train_set)
    test_set = classification_dataset(cfg, train=False)
    if test_set.classes != train_set.classes:
        raise ValueError(
            f"CLS.TEST_ROOT classes {test_set.classes} differ from CLS.TRAIN_ROOT classes "
            f"{train_set.classes}"
        )
    return ClassificationData(train_set, test_set, "test")


def load_search_data(cfg: CfgNode) -> ClassificationData:
    """CLS.TRAIN_ROOT minus a held-out split (CLS.SEARCH.VAL_FRACTION, seeded by SEED) to train,
    that split (evaluation transform) to score; CLS.TEST_ROOT is not read."""
    train_full = classification_dataset(cfg, train=True)
    check_classification_config(cfg, train_full)
    train_idx, val_idx = validation_split(
        dataset_targets(train_full), cfg.CLS.SEARCH.VAL_FRACTION, max(cfg.SEED, 0)
    )
    # A shallow copy shares the file list; only its own transform attribute is replaced.
    val_set = Subset(eval_view(cfg, copy.copy(train_full)), val_idx)
    return ClassificationData(Subset(train_full, train_idx), val_set, "val")
