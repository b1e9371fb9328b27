"""Downstream tasks: what an upper meta-architecture trains on and how it is scored.

A :class:`DownstreamTask` bundles the train loader, the test loader(s), their evaluation and
the start-up class-count check of one upper meta-architecture; code that needs one asks
:func:`downstream_task` instead of testing architecture names. Registered here:

- ``GeneralizedRCNN`` (Faster R-CNN; Mask R-CNN is the same meta-architecture with
  MODEL.MASK_ON): DATASETS.TRAIN / DATASETS.TEST, scored by detectron2's evaluator of each test
  set's format (COCO-style for COCO JSON sets, VOC-style for VOC folders).
- ``ResNetClassifier``: CLS.TRAIN_ROOT / CLS.TEST_ROOT (ImageFolder or VOC07 multi-label),
  scored by top-1 and mean per-class accuracy, or VOC07 mAP.

Add a task with :func:`register_downstream_task`.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from detectron2.config import CfgNode
from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.data.build import (
    filter_images_with_only_crowd_annotations,
    print_instances_class_histogram,
)
from detectron2.data.detection_utils import check_metadata_consistency
from detectron2.evaluation import inference_on_dataset
from detectron2.utils import comm
from torch import nn
from torch.utils.data import DataLoader

from ..evaluation.evaluate import build_detection_evaluator, detection_metrics, evaluate_classifier
from ..utils.preemption import ignore_in_workers
from .aspect_groups import build_grouped_train_loader
from .catalog import dataset_dicts
from .classification import ImageFolderDataset, VOC07MultiLabelDataset, classification_transforms
from .common import normalisation, per_process_batch
from .mapper import DetectionMapper
from .pretext import InfiniteSampler
from .validation import check_image_paths

__all__ = [
    "DownstreamTask",
    "check_classification_model",
    "classification_loader",
    "downstream_task",
    "evaluate_downstream",
    "register_downstream_task",
    "registered_downstream_tasks",
    "standalone_task",
]
logger = logging.getLogger(__name__)

# Meta-architecture that wraps an upper one (MODEL.BISSL.UPPER_META_ARCHITECTURE).
BISSL_META_ARCHITECTURE = "BiSSL"


@dataclass(frozen=True)
class DownstreamTask:
    """The data and evaluation of one upper meta-architecture.

    Attributes:
        name: What the task is ("detection", "classification"); search spaces are keyed by it.
        train_tool: The tool that trains this task on its own (``tools/<name>.py``): its batch
            checks apply to a search trial.
        workers_key: The config key of the training loader's worker count.
        build_train_loader: ``(cfg, total_batch, start_batches, seed)`` -> endless batches,
            resumable by position (``start_batches`` this process already drew).
        train_size: ``cfg`` -> number of training samples (head warm-up epochs -> iterations).
        build_test_loaders: ``cfg`` -> {test set name: finite loader}.
        evaluate: ``(cfg, model, test set name, loader)`` -> metrics (None on processes that do
            not hold the result).
        check_num_classes: ``cfg`` -> the head's class count after checking it against the data
            (None when there is no data to check); raises ValueError naming key and data set.
        check_data: ``(cfg, mode)`` -> None, start-up checks of the task's data beyond the
            validation of registered data sets (which
            :func:`bissl_det.data.detection.register_from_config` does by name); ``mode`` is
            DATASETS.CHECK_IMAGES. Raises with the data set, file or key.
    """

    name: str
    train_tool: str
    workers_key: str
    build_train_loader: Callable[[CfgNode, int, int, int], Iterable]
    train_size: Callable[[CfgNode], int]
    build_test_loaders: Callable[[CfgNode], dict[str, Iterable]]
    evaluate: Callable[[CfgNode, nn.Module, str, Iterable], dict[str, float] | None]
    check_num_classes: Callable[[CfgNode], int | None]
    check_data: Callable[[CfgNode, str], None] | None = None


_TASKS: dict[str, DownstreamTask] = {}


def register_downstream_task(meta_architecture: str, task: DownstreamTask) -> None:
    """Register ``task`` for an upper meta-architecture name (one task per name)."""
    if meta_architecture in _TASKS and _TASKS[meta_architecture] is not task:
        raise ValueError(f"a downstream task for {meta_architecture!r} is already registered")
    _TASKS[meta_architecture] = task


def registered_downstream_tasks() -> list[str]:
    """Names of the upper meta-architectures with a downstream task."""
    return sorted(_TASKS)


def downstream_task(cfg: CfgNode, required: bool = True) -> DownstreamTask | None:
    """The task of the config's upper meta-architecture.

    MODEL.META_ARCHITECTURE itself, or MODEL.BISSL.UPPER_META_ARCHITECTURE under BiSSL.

    Args:
        cfg: The config.
        required: If False, a plain (non-BiSSL) meta-architecture without a task gives None
            (pretext-only models); BiSSL's upper level always needs one.

    Raises:
        ValueError: No task for that name; the message lists the registered ones.
    """
    arch = cfg.MODEL.META_ARCHITECTURE
    key = "MODEL.META_ARCHITECTURE"
    if arch == BISSL_META_ARCHITECTURE:
        arch, key, required = cfg.MODEL.BISSL.UPPER_META_ARCHITECTURE, f"{key} BiSSL's upper", True
    if arch in _TASKS:
        return _TASKS[arch]
    if not required:
        return None
    raise ValueError(
        f"{key} = {arch!r} has no downstream task (train/test data, evaluator); registered: "
        f"{registered_downstream_tasks()} (bissl_det.data.tasks.register_downstream_task)"
    )


def standalone_task(cfg: CfgNode) -> DownstreamTask | None:
    """The task of MODEL.META_ARCHITECTURE trained on its own (None for BiSSL or a model
    without a task): what a fine-tuning run or a search trial trains."""
    return _TASKS.get(cfg.MODEL.META_ARCHITECTURE)


def evaluate_downstream(cfg: CfgNode, model: nn.Module) -> OrderedDict:
    """Evaluate ``model`` (an upper model, or BiSSL's upper level) on its task's test data.

    The config's downstream task gives the test loaders and how each is scored; results are
    keyed by test set ("cls" for classification).
    """
    task = downstream_task(cfg)
    results = OrderedDict()
    for name, loader in task.build_test_loaders(cfg).items():
        metrics = task.evaluate(cfg, model, name, ignore_in_workers(loader))
        if metrics is not None:
            results[name] = metrics
            logger.info("%s: %s", name, metrics)
    return results


# ---- Detection ----------------------------------------------------------------------------------


def _detection_train_dicts(cfg: CfgNode) -> list[dict]:
    """DATASETS.TRAIN's records as detectron2's ``get_detection_dataset_dicts`` selects them
    (DATALOADER.FILTER_EMPTY_ANNOTATIONS: images with no non-crowd object left out), each set
    loaded once per process (:func:`~.catalog.dataset_dicts`)."""
    names = list(cfg.DATASETS.TRAIN)
    if not names:
        raise ValueError("DATASETS.TRAIN is empty: name the detection training dataset(s)")
    per_set = [dataset_dicts(name) for name in names]
    empty = [name for name, dicts in zip(names, per_set, strict=True) if not dicts]
    if empty:
        raise ValueError(f"DATASETS.TRAIN: dataset(s) {empty} have no images")
    dicts = [record for records in per_set for record in records]
    if "annotations" in dicts[0]:
        if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
            dicts = filter_images_with_only_crowd_annotations(dicts)
        if all(hasattr(MetadataCatalog.get(name), "thing_classes") for name in names):
            check_metadata_consistency("thing_classes", names)
            print_instances_class_histogram(dicts, MetadataCatalog.get(names[0]).thing_classes)
    if not dicts:
        raise ValueError(
            f"DATASETS.TRAIN {names}: no image has a non-crowd object "
            "(DATALOADER.FILTER_EMPTY_ANNOTATIONS is set)"
        )
    return dicts


def _detection_train_loader(cfg: CfgNode, total_batch: int, start_batches: int, seed: int):
    batch = per_process_batch(total_batch, "downstream IMS_PER_BATCH")
    dicts = _detection_train_dicts(cfg)
    if cfg.DATALOADER.ASPECT_RATIO_GROUPING:
        # Indices grouped before mapping, so that --resume continues exactly (aspect_groups.py).
        return build_grouped_train_loader(
            dicts,
            DetectionMapper(cfg, is_train=True),
            InfiniteSampler(len(dicts), seed=seed),
            batch,
            start_batches,
            cfg.DATALOADER.NUM_WORKERS,
        )
    return build_detection_train_loader(
        dataset=dicts,
        mapper=DetectionMapper(cfg, is_train=True),
        sampler=InfiniteSampler(len(dicts), seed=seed, start=start_batches * batch),
        total_batch_size=total_batch,
        aspect_ratio_grouping=False,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )


def _detection_test_loaders(cfg: CfgNode) -> dict[str, Iterable]:
    mapper = DetectionMapper(cfg, is_train=False)
    return {
        name: build_detection_test_loader(cfg, name, mapper=mapper) for name in cfg.DATASETS.TEST
    }


def _evaluate_detection(cfg: CfgNode, model: nn.Module, name: str, loader) -> dict | None:
    out_dir = os.path.join(cfg.OUTPUT_DIR, "inference", name)
    result = inference_on_dataset(model, loader, build_detection_evaluator(cfg, name, out_dir))
    return detection_metrics(result) if comm.is_main_process() else None


def _detection_num_classes(cfg: CfgNode) -> int:
    """MODEL.ROI_HEADS.NUM_CLASSES against ``thing_classes`` of every train and test set."""
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST):
        metadata = MetadataCatalog.get(name)
        if not hasattr(metadata, "thing_classes"):
            dataset_dicts(name)  # COCO JSON sets its classes when first loaded
        classes = list(metadata.get("thing_classes", []))
        if classes and len(classes) != num_classes:
            raise ValueError(
                f"MODEL.ROI_HEADS.NUM_CLASSES = {num_classes}, but dataset {name!r} has "
                f"{len(classes)} classes {classes}"
            )
    return num_classes


def _detection_check_masks(cfg: CfgNode, mode: str) -> None:
    """With MODEL.MASK_ON, every training object has a mask in a form INPUT.MASK_FORMAT reads
    (RLE needs "bitmask"); otherwise detectron2 fails in the middle of training."""
    if not cfg.MODEL.MASK_ON:
        return
    for name in cfg.DATASETS.TRAIN:
        for record in dataset_dicts(name):
            for ann in record.get("annotations", []):
                segm = ann.get("segmentation")
                if not segm:
                    raise ValueError(
                        f"MODEL.MASK_ON is set, but dataset {name!r} has an object without a "
                        f"mask (image {record['file_name']!r}): train Mask R-CNN on a COCO-format "
                        "set with instance masks"
                    )
                if isinstance(segm, dict) and cfg.INPUT.MASK_FORMAT != "bitmask":
                    raise ValueError(
                        f"dataset {name!r} has RLE masks (image {record['file_name']!r}), which "
                        f"INPUT.MASK_FORMAT = {cfg.INPUT.MASK_FORMAT!r} cannot read: set "
                        "INPUT.MASK_FORMAT to 'bitmask'"
                    )


register_downstream_task(
    "GeneralizedRCNN",
    DownstreamTask(
        name="detection",
        train_tool="finetune_det",
        workers_key="DATALOADER.NUM_WORKERS",
        build_train_loader=_detection_train_loader,
        train_size=lambda cfg: len(_detection_train_dicts(cfg)),
        build_test_loaders=_detection_test_loaders,
        evaluate=_evaluate_detection,
        check_num_classes=_detection_num_classes,
        check_data=_detection_check_masks,
    ),
)


# ---- Classification -----------------------------------------------------------------------------


def classification_dataset(cfg: CfgNode, train: bool):
    """CLS.TRAIN_ROOT (augmented) or CLS.TEST_ROOT as a dataset of (tensor, target)."""
    mean, std = normalisation(cfg)
    root = cfg.CLS.TRAIN_ROOT if train else cfg.CLS.TEST_ROOT
    key = "CLS.TRAIN_ROOT" if train else "CLS.TEST_ROOT"
    if not root:
        raise ValueError(f"{key} is empty: set it to the classification data folder")
    transform = classification_transforms(
        train, cfg.CLS.IMAGE_SIZE, mean, std, crop_scale=cfg.CLS.CROP_SCALE
    )
    classes = list(cfg.CLS.CLASSES) or None
    if cfg.CLS.FORMAT == "imagefolder":
        return ImageFolderDataset(root, transform, classes=classes)
    if cfg.CLS.FORMAT == "voc07":
        split = "trainval" if train else "test"
        return VOC07MultiLabelDataset(root, split, classes, transform)
    raise ValueError(f"CLS.FORMAT: unknown format {cfg.CLS.FORMAT!r} (imagefolder, voc07)")


def collate_classification(samples) -> dict[str, torch.Tensor]:
    """(image, target) pairs -> {"images": N x 3 x H x W, "targets": N or N x C}."""
    images, targets = zip(*samples, strict=True)
    return {
        "images": torch.stack(images),
        "targets": torch.stack([torch.as_tensor(t) for t in targets]),
    }


def classification_loader(
    cfg: CfgNode,
    dataset,
    batch_size: int,
    seed: int | None = None,
    start_batches: int = 0,
) -> DataLoader:
    """Batches of (image, target) pairs from ``dataset`` at ``batch_size`` per process.

    ``seed`` None: one finite, unshuffled pass (evaluation; each process sees all). Otherwise
    endless, in the seeded order, full batches only, starting after ``start_batches`` batches.
    """
    if seed is None:
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=cfg.CLS.NUM_WORKERS,
            collate_fn=collate_classification,
        )
    else:
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=InfiniteSampler(len(dataset), seed=seed, start=start_batches * batch_size),
            num_workers=cfg.CLS.NUM_WORKERS,
            collate_fn=collate_classification,
            drop_last=True,
            pin_memory=torch.cuda.is_available(),
        )
    return ignore_in_workers(loader)  # signals: the training process alone stops


def _classification_train_loader(cfg: CfgNode, total_batch: int, start_batches: int, seed: int):
    batch = per_process_batch(total_batch, "downstream IMS_PER_BATCH")
    dataset = classification_dataset(cfg, train=True)
    return classification_loader(cfg, dataset, batch, seed, start_batches)


def check_classification_model(cfg: CfgNode, train_set) -> int:
    """MODEL.CLASSIFIER (MULTI_LABEL, NUM_CLASSES) against CLS.TRAIN_ROOT's data; the count."""
    multi_label = cfg.CLS.FORMAT == "voc07"
    if multi_label != cfg.MODEL.CLASSIFIER.MULTI_LABEL:
        raise ValueError(
            f"MODEL.CLASSIFIER.MULTI_LABEL = {cfg.MODEL.CLASSIFIER.MULTI_LABEL} but CLS.FORMAT = "
            f"{cfg.CLS.FORMAT!r} (voc07 is multi-label, imagefolder single-label)"
        )
    classes = train_set.classes
    if len(classes) != cfg.MODEL.CLASSIFIER.NUM_CLASSES:
        raise ValueError(
            f"MODEL.CLASSIFIER.NUM_CLASSES = {cfg.MODEL.CLASSIFIER.NUM_CLASSES}, but "
            f"CLS.TRAIN_ROOT {cfg.CLS.TRAIN_ROOT!r} has {len(classes)} classes {classes}"
        )
    return len(classes)


def _classification_num_classes(cfg: CfgNode) -> int | None:
    if not cfg.CLS.TRAIN_ROOT:
        return None
    return check_classification_model(cfg, classification_dataset(cfg, train=True))


def _classification_check_images(cfg: CfgNode, mode: str) -> None:
    """Headers of every CLS.TRAIN_ROOT image, and CLS.TEST_ROOT's decoded as ``mode`` says."""
    for train, key in ((True, "CLS.TRAIN_ROOT"), (False, "CLS.TEST_ROOT")):
        if not (cfg.CLS.TRAIN_ROOT if train else cfg.CLS.TEST_ROOT):
            continue
        dataset = classification_dataset(cfg, train)
        paths = getattr(dataset, "image_files", None) or [p for p, _ in dataset.samples]
        decode = mode == "decode_all" or (mode == "decode_test" and not train)
        check_image_paths(key, paths, decode)


register_downstream_task(
    "ResNetClassifier",
    DownstreamTask(
        name="classification",
        train_tool="eval_cls",
        workers_key="CLS.NUM_WORKERS",
        build_train_loader=_classification_train_loader,
        train_size=lambda cfg: len(classification_dataset(cfg, train=True)),
        build_test_loaders=lambda cfg: {
            "cls": classification_loader(cfg, classification_dataset(cfg, train=False), 64)
        },
        evaluate=lambda cfg, model, name, loader: evaluate_classifier(
            model, loader, cfg.MODEL.CLASSIFIER.MULTI_LABEL
        ),
        check_num_classes=_classification_num_classes,
        check_data=_classification_check_images,
    ),
)
