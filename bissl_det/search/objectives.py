"""What one search trial trains and scores: classification transfer or detection fine-tuning.

Both train on the training data minus a held-out validation split (seeded by SEED) and return the
validation metric in percent; the test split (CLS.TEST_ROOT, DATASETS.TEST) is never read.
Parameters are config keys (e.g. ``SOLVER.BASE_LR``), so a trial's config, and the best one, is
the searched config with those keys set.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.utils.env import seed_all_rng

from ..config.defaults import config_value
from ..data.classification_transfer import held_out_indices, load_search_data
from ..data.tasks import registered_downstream_tasks, standalone_task
from ..engine.cls_trainer import read_classifier_backbone, train_classifier
from ..engine.finetune import FinetuneTrainer, summarise

logger = logging.getLogger(__name__)

DETECTION_METRICS = ("AP50", "AP")


@dataclass(frozen=True)
class SearchTask:
    """``ranges``: {searched config key: (low, high)}, drawn log-uniformly."""

    name: str
    metric: str
    ranges: dict[str, tuple[float, float]]


@dataclass(frozen=True)
class SearchSpace:
    """How one downstream task is searched.

    Attributes:
        metric: ``cfg`` -> the validation metric maximised (checked).
        ranges: {searched config key: config key of its (low, high) range}.
        objective: ``(cfg, task, linear_probe)`` -> ``(params, trial number) -> metric``.
    """

    metric: Callable[[CfgNode], str]
    ranges: dict[str, str]
    objective: Callable[[CfgNode, SearchTask, bool], Callable[[dict[str, float], int], float]]


def _detection_metric(cfg: CfgNode) -> str:
    if cfg.DET_SEARCH.METRIC not in DETECTION_METRICS:
        raise ValueError(
            f"DET_SEARCH.METRIC = {cfg.DET_SEARCH.METRIC!r}: use one of {DETECTION_METRICS}"
        )
    return cfg.DET_SEARCH.METRIC


def search_task(cfg: CfgNode) -> SearchTask:
    """The search a config calls for, from its downstream task; ranges checked."""
    task = standalone_task(cfg)
    if task is None or task.name not in SEARCH_SPACES:
        raise ValueError(
            f"MODEL.META_ARCHITECTURE = {cfg.MODEL.META_ARCHITECTURE!r}: tools/search.py "
            f"searches a model trained alone for one of the tasks {sorted(SEARCH_SPACES)} "
            f"(models with a task: {registered_downstream_tasks()})"
        )
    space = SEARCH_SPACES[task.name]
    metric = space.metric(cfg)
    ranges = {}
    for param, range_key in space.ranges.items():
        bounds = tuple(float(b) for b in config_value(cfg, range_key))
        if len(bounds) != 2 or not 0.0 < bounds[0] < bounds[1]:
            raise ValueError(f"{range_key} = {bounds}: need (low, high) with 0 < low < high")
        ranges[param] = bounds
    return SearchTask(task.name, metric, ranges)


def with_params(cfg: CfgNode, params: dict[str, float], output_dir: str | Path) -> CfgNode:
    """A frozen copy of ``cfg`` with the searched keys set and OUTPUT_DIR = ``output_dir``."""
    out = cfg.clone()
    out.defrost()
    out.merge_from_list([*(v for kv in params.items() for v in kv), "OUTPUT_DIR", str(output_dir)])
    out.freeze()
    return out


def trial_dir(cfg: CfgNode, number: int) -> Path:
    return Path(cfg.OUTPUT_DIR) / "trials" / f"trial_{number:04d}"


class ClassificationObjective:
    """Train on CLS.TRAIN_ROOT minus CLS.SEARCH.VAL_FRACTION; score top-1 (or mAP) there."""

    def __init__(self, cfg: CfgNode, task: SearchTask, linear_probe: bool):
        self.cfg, self.task, self.linear_probe = cfg, task, linear_probe
        self.data = load_search_data(cfg)
        self.backbone_state = read_classifier_backbone(cfg)
        self.split_sizes = {"train": len(self.data.train_set), "val": len(self.data.eval_set)}

    def __call__(self, params: dict[str, float], number: int) -> float:
        out = trial_dir(self.cfg, number)
        cfg = with_params(self.cfg, params, out)
        _, metrics = train_classifier(
            cfg,
            self.backbone_state,
            self.data,
            lr=cfg.CLS.SOLVER.BASE_LR,
            weight_decay=cfg.CLS.SOLVER.WEIGHT_DECAY,
            seed=max(cfg.SEED, 0),
            linear_probe=self.linear_probe,
            output_dir=out,
            run_name=f"trial {number}",
        )
        return metrics[self.task.metric]


def register_search_splits(cfg: CfgNode) -> tuple[str, str, dict[str, int]]:
    """Register DATASETS.TRAIN minus DET_SEARCH.VAL_FRACTION of its images, and that fraction,
    as two datasets; returns (train name, val name, sizes). The val split is scored by
    Detectron2's COCO evaluator (any source format; AP, AP50, AP75 in percent)."""
    fraction, seed = cfg.DET_SEARCH.VAL_FRACTION, max(cfg.SEED, 0)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"DET_SEARCH.VAL_FRACTION = {fraction}: must be in (0, 1)")
    if not cfg.DATASETS.TRAIN:
        raise ValueError("DATASETS.TRAIN is empty: name the detection training dataset(s)")
    dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    )
    if len(dicts) < 2:
        raise ValueError(f"DATASETS.TRAIN {cfg.DATASETS.TRAIN}: {len(dicts)} image(s), need 2+")
    val_idx = set(held_out_indices(len(dicts), fraction, seed))
    splits = {
        "train": [d for i, d in enumerate(dicts) if i not in val_idx],
        "val": [d for i, d in enumerate(dicts) if i in val_idx],
    }
    if not any(d.get("annotations") for d in splits["val"]):
        raise ValueError(
            f"DET_SEARCH.VAL_FRACTION = {fraction}: the {len(splits['val'])} held-out images of "
            f"{cfg.DATASETS.TRAIN} have no boxes to score; raise the fraction"
        )
    classes = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).thing_classes
    base = f"{'+'.join(cfg.DATASETS.TRAIN)}_search{fraction:g}_seed{seed}"
    for split, records in splits.items():
        name = f"{base}_{split}"
        if name not in DatasetCatalog.list():
            DatasetCatalog.register(name, functools.partial(copy.deepcopy, records))
            MetadataCatalog.get(name).set(thing_classes=list(classes), evaluator_type="coco")
    sizes = {split: len(records) for split, records in splits.items()}
    return f"{base}_train", f"{base}_val", sizes


class DetectionObjective:
    """Fine-tune (FinetuneTrainer, as tools/finetune_det.py) on the carved train split; score
    DET_SEARCH.METRIC on the carved val split."""

    def __init__(self, cfg: CfgNode, task: SearchTask):
        self.cfg, self.task = cfg, task
        self.train_name, self.val_name, self.split_sizes = register_search_splits(cfg)

    def __call__(self, params: dict[str, float], number: int) -> float:
        cfg = with_params(self.cfg, params, trial_dir(self.cfg, number))
        cfg.defrost()
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (self.train_name,), (self.val_name,)
        cfg.freeze()
        seed_all_rng(max(cfg.SEED, 0))  # as tools/finetune_det.py's setup seeds a run
        trainer = FinetuneTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        metrics = summarise([self.val_name], trainer._last_eval_results)[self.val_name]
        # The trial's detector is not needed again (the chosen lr/wd are retrained on all of
        # DATASETS.TRAIN): free the disk of a search over many trials.
        Path(cfg.OUTPUT_DIR, "model_final.pth").unlink(missing_ok=True)
        return metrics[self.task.metric]


def _detection_objective(cfg: CfgNode, task: SearchTask, linear_probe: bool):
    if linear_probe:
        raise ValueError("--linear-probe is for classification configs only")
    return DetectionObjective(cfg, task)


# One entry per searchable downstream task (data/tasks.py), keyed by its name.
SEARCH_SPACES: dict[str, SearchSpace] = {
    "classification": SearchSpace(
        metric=lambda cfg: "mAP" if cfg.MODEL.CLASSIFIER.MULTI_LABEL else "top1",
        ranges={
            "CLS.SOLVER.BASE_LR": "CLS.SEARCH.LR_RANGE",
            "CLS.SOLVER.WEIGHT_DECAY": "CLS.SEARCH.WD_RANGE",
        },
        objective=ClassificationObjective,
    ),
    "detection": SearchSpace(
        metric=_detection_metric,
        ranges={
            "SOLVER.BASE_LR": "DET_SEARCH.LR_RANGE",
            "SOLVER.WEIGHT_DECAY": "DET_SEARCH.WD_RANGE",
        },
        objective=_detection_objective,
    ),
}


def build_objective(cfg: CfgNode, task: SearchTask, linear_probe: bool = False):
    """The objective of ``task`` (built in each worker: it loads data and weights)."""
    return SEARCH_SPACES[task.name].objective(cfg, task, linear_probe)
