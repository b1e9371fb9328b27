"""Train and test loaders of both levels, built from the config and resumable by position.

Every train loader is endless and driven by :class:`InfiniteSampler`; ``start_batches`` (batches
this process already drew) makes a resumed run continue with exactly the next samples. With
``NUM_WORKERS = 0`` the random augmentations continue exactly too (their RNG state is in the
checkpoint); with workers, each worker restarts its RNG from the run's seed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from detectron2.config import CfgNode
from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
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
        mapper=DatasetMapper(cfg, is_train=True),
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
