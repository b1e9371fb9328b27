"""Train and test loaders of both levels, built from the config and resumable by position.

Every train loader is endless and driven by :class:`InfiniteSampler`; ``start_batches`` (batches
this process already drew) makes a resumed run continue with exactly the next samples. With
``NUM_WORKERS = 0`` the random augmentations continue exactly too (their RNG state is in the
checkpoint); with workers, each worker restarts its RNG from the run's seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from detectron2.config import CfgNode
from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.utils import comm
from torch.utils.data import DataLoader

from .classification import ImageFolderDataset, VOC07MultiLabelDataset, classification_transforms
from .pretext import (
    InfiniteSampler,
    TwoViewAugmentation,
    TwoViewTransform,
    UnlabeledImages,
    find_images,
)

logger = logging.getLogger(__name__)


def per_process_batch(total: int, what: str) -> int:
    world = comm.get_world_size()
    if total <= 0 or total % world:
        raise ValueError(f"{what} = {total} must be a positive multiple of the {world} processes")
    return total // world


def is_classification(cfg: CfgNode) -> bool:
    """Whether the downstream task is image classification (else detection)."""
    upper = cfg.MODEL.BISSL.UPPER_META_ARCHITECTURE
    return cfg.MODEL.META_ARCHITECTURE == "ResNetClassifier" or (
        cfg.MODEL.META_ARCHITECTURE == "BiSSL" and upper == "ResNetClassifier"
    )


def normalisation(cfg: CfgNode) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """MODEL.PIXEL_MEAN/STD on the 0-1 scale, for loaders that normalise outside the model.

    The detector normalises inside the model; pretext and classification tensors must match it,
    so BiSSL configs use RGB input (MoCo's detection protocol).
    """
    if cfg.INPUT.FORMAT != "RGB":
        raise ValueError(
            f"INPUT.FORMAT = {cfg.INPUT.FORMAT!r}: BiSSL configs must use 'RGB' with "
            "MODEL.PIXEL_MEAN/STD in RGB order (torchvision-style SSL checkpoints)"
        )
    mean = tuple(m / 255.0 for m in cfg.MODEL.PIXEL_MEAN)
    std = tuple(s / 255.0 for s in cfg.MODEL.PIXEL_STD)
    return mean, std


def check_num_classes(cfg: CfgNode) -> int | None:
    """Fail at start-up if the downstream head's class count differs from the data's.

    Detection: MODEL.ROI_HEADS.NUM_CLASSES against ``thing_classes`` of every DATASETS.TRAIN and
    DATASETS.TEST set. Classification: MODEL.CLASSIFIER.NUM_CLASSES against the classes of
    CLS.TRAIN_ROOT. Other architectures (pretext-only models) are not checked.

    Returns:
        The number of classes checked, or None when the model has no downstream head.

    Raises:
        ValueError: The message names the key, its value, the data set and its classes.
    """
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "BiSSL":
        arch = cfg.MODEL.BISSL.UPPER_META_ARCHITECTURE
    if arch == "ResNetClassifier":
        if not cfg.CLS.TRAIN_ROOT:
            return None
        classes = _classification_dataset(cfg, train=True).classes
        if len(classes) != cfg.MODEL.CLASSIFIER.NUM_CLASSES:
            raise ValueError(
                f"MODEL.CLASSIFIER.NUM_CLASSES = {cfg.MODEL.CLASSIFIER.NUM_CLASSES}, but "
                f"CLS.TRAIN_ROOT {cfg.CLS.TRAIN_ROOT!r} has {len(classes)} classes {classes}"
            )
        return len(classes)
    if arch != "GeneralizedRCNN":
        return None
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST):
        metadata = MetadataCatalog.get(name)
        if not hasattr(metadata, "thing_classes"):
            DatasetCatalog.get(name)  # COCO JSON sets its classes when first loaded
        classes = list(metadata.get("thing_classes", []))
        if classes and len(classes) != num_classes:
            raise ValueError(
                f"MODEL.ROI_HEADS.NUM_CLASSES = {num_classes}, but dataset {name!r} has "
                f"{len(classes)} classes {classes}"
            )
    return num_classes


# ---- Pretext (lower level) ------------------------------------------------------------------


def pretext_image_paths(cfg: CfgNode) -> list[Path]:
    """Image files of BISSL.PRETEXT_DATA: folders, plus images of registered datasets."""
    data = cfg.BISSL.PRETEXT_DATA
    paths: list[Path] = []
    for root in data.IMAGE_ROOTS:
        paths.extend(find_images(root))
    for name in data.DATASETS:
        paths.extend(Path(record["file_name"]) for record in DatasetCatalog.get(name))
    if not paths:
        raise ValueError(
            "BISSL.PRETEXT_DATA: no pretext images - set IMAGE_ROOTS (folders) or DATASETS "
            "(registered dataset names)"
        )
    return sorted(set(paths))


def build_pretext_loader(
    cfg: CfgNode, total_batch: int, start_batches: int = 0, seed: int = 0
) -> DataLoader:
    """Endless loader of (view1, view2) batches of unlabeled images."""
    aug = cfg.BISSL.PRETEXT_DATA.AUG
    mean, std = normalisation(cfg)
    transform = TwoViewTransform(
        TwoViewAugmentation(
            crop_size=aug.CROP_SIZE,
            crop_scale=tuple(aug.CROP_SCALE),
            flip_p=aug.FLIP_P,
            jitter=tuple(aug.JITTER),
            jitter_p=aug.JITTER_P,
            gray_p=aug.GRAY_P,
            blur_p=tuple(aug.BLUR_P),
            solarize_p=tuple(aug.SOLARIZE_P),
            mean=mean,
            std=std,
        )
    )
    dataset = UnlabeledImages(
        pretext_image_paths(cfg), transform, cfg.BISSL.PRETEXT_DATA.MAX_BAD_FRACTION
    )
    batch = per_process_batch(total_batch, "pretext IMS_PER_BATCH")
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=InfiniteSampler(len(dataset), seed=seed, start=start_batches * batch),
        num_workers=cfg.BISSL.PRETEXT_DATA.NUM_WORKERS,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=cfg.BISSL.PRETEXT_DATA.NUM_WORKERS > 0,
    )


# ---- Downstream (upper level) ----------------------------------------------------------------


def _classification_dataset(cfg: CfgNode, train: bool):
    mean, std = normalisation(cfg)
    root = cfg.CLS.TRAIN_ROOT if train else cfg.CLS.TEST_ROOT
    key = "CLS.TRAIN_ROOT" if train else "CLS.TEST_ROOT"
    if not root:
        raise ValueError(f"{key} is empty: set it to the classification data folder")
    transform = classification_transforms(train, cfg.CLS.IMAGE_SIZE, mean, std)
    classes = list(cfg.CLS.CLASSES) or None
    if cfg.CLS.FORMAT == "imagefolder":
        return ImageFolderDataset(root, transform, classes=classes)
    if cfg.CLS.FORMAT == "voc07":
        split = "trainval" if train else "test"
        return VOC07MultiLabelDataset(root, split, classes, transform)
    raise ValueError(f"CLS.FORMAT: unknown format {cfg.CLS.FORMAT!r} (imagefolder, voc07)")


def collate_classification(samples) -> dict[str, torch.Tensor]:
    images, targets = zip(*samples, strict=True)
    return {
        "images": torch.stack(images),
        "targets": torch.stack([torch.as_tensor(t) for t in targets]),
    }


class NameFileOnError:
    """Wrap a detection mapper so a decode error names the image (PIL's errors often do not).

    Policy: labelled images are never skipped (that would silently change the training set);
    images are not decoded at start-up either (too slow for COCO), so a corrupt one stops
    training when it is first drawn, with its path.
    """

    def __init__(self, mapper: Callable[[dict], dict]) -> None:
        self.mapper = mapper

    def __call__(self, record: dict) -> dict:
        try:
            return self.mapper(record)
        except (OSError, ValueError, SyntaxError) as e:
            raise OSError(
                f"detection image {record.get('file_name')!r}: {type(e).__name__}: {e} - labelled "
                "images are not skipped: replace the file or remove it from the split"
            ) from e


def build_downstream_train_loader(
    cfg: CfgNode, total_batch: int, start_batches: int = 0, seed: int = 0
):
    """Endless loader of downstream batches: detection dicts or classification tensors."""
    batch = per_process_batch(total_batch, "downstream IMS_PER_BATCH")
    if is_classification(cfg):
        dataset = _classification_dataset(cfg, train=True)
        return DataLoader(
            dataset,
            batch_size=batch,
            sampler=InfiniteSampler(len(dataset), seed=seed, start=start_batches * batch),
            num_workers=cfg.CLS.NUM_WORKERS,
            collate_fn=collate_classification,
            drop_last=True,
            pin_memory=torch.cuda.is_available(),
        )
    if not cfg.DATASETS.TRAIN:
        raise ValueError("DATASETS.TRAIN is empty: name the detection training dataset(s)")
    dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    )
    return build_detection_train_loader(
        dataset=dicts,
        mapper=NameFileOnError(DatasetMapper(cfg, is_train=True)),
        sampler=InfiniteSampler(len(dicts), seed=seed, start=start_batches * batch),
        total_batch_size=total_batch,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )


def downstream_train_size(cfg: CfgNode) -> int:
    """Number of downstream training samples (head warm-up epochs -> iterations)."""
    if is_classification(cfg):
        return len(_classification_dataset(cfg, train=True))
    return len(
        get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
    )


def build_classification_test_loader(cfg: CfgNode, batch_size: int = 64) -> DataLoader:
    """Finite, unshuffled loader of the classification test set (each process sees all)."""
    return DataLoader(
        _classification_dataset(cfg, train=False),
        batch_size=batch_size,
        num_workers=cfg.CLS.NUM_WORKERS,
        collate_fn=collate_classification,
    )


def build_detection_test_loaders(cfg: CfgNode) -> dict:
    return {name: build_detection_test_loader(cfg, name) for name in cfg.DATASETS.TEST}
