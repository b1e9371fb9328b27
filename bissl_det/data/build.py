"""Train and test loaders of both levels, built from the config and resumable by position.

Every train loader is endless and driven by :class:`InfiniteSampler`; ``start_batches`` (batches
this process already drew) makes a resumed run continue with exactly the next samples. With
``NUM_WORKERS = 0`` the random augmentations continue exactly too (their RNG state is in the
checkpoint); with workers, each worker restarts its RNG from the run's seed.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from detectron2.config import CfgNode
from torch.utils.data import DataLoader

from ..utils.preemption import ignore_in_workers
from ..utils.rank_zero import on_rank_zero
from .catalog import dataset_dicts
from .common import normalisation, per_process_batch
from .image_lists import compact_paths, image_list, sorted_unique
from .pretext import (
    InfiniteSampler,
    TwoViewAugmentation,
    TwoViewTransform,
    UnlabeledImages,
    find_images,
    normalise_pixels,
)
from .tasks import downstream_task
from .view_augment import PretextView, augment_views

__all__ = [
    "build_downstream_train_loader",
    "build_pretext_loader",
    "pretext_batch_to_device",
    "check_num_classes",
    "downstream_train_size",
    "pretext_image_paths",
]

logger = logging.getLogger(__name__)


def check_num_classes(cfg: CfgNode) -> int | None:
    """Fail at start-up if the downstream head's class count differs from the data's.

    The check of the config's downstream task (:mod:`.tasks`); None for models without one.

    Raises:
        ValueError: The message names the key, its value, the data set and its classes.
    """
    task = downstream_task(cfg, required=False)
    return None if task is None else task.check_num_classes(cfg)


# ---- Pretext (lower level) ------------------------------------------------------------------


def pretext_image_paths(cfg: CfgNode) -> np.ndarray:
    """Image files of BISSL.PRETEXT_DATA: folders, plus images of registered datasets.

    Sorted and unique, as a compact array of paths (:mod:`.image_lists`; ``len`` and
    :func:`~.image_lists.path_at` read it). Listed by rank 0 and sent to the others (every rank
    must call it), folders through the cached list of :func:`~.image_lists.image_list`.
    """
    data = cfg.BISSL.PRETEXT_DATA
    return on_rank_zero(lambda: _list_pretext_images(data), "listing BISSL.PRETEXT_DATA's images")


def _list_pretext_images(data: CfgNode) -> np.ndarray:
    lists = [image_list(root, find_images) for root in data.IMAGE_ROOTS]
    for name in data.DATASETS:
        lists.append(compact_paths(record["file_name"] for record in dataset_dicts(name)))
    if not any(len(paths) for paths in lists):
        raise ValueError(
            "BISSL.PRETEXT_DATA: no pretext images - set IMAGE_ROOTS (folders) or DATASETS "
            "(registered dataset names)"
        )
    if len(lists) == 1 and not data.DATASETS:
        return lists[0]  # one folder's list is sorted and unique already
    return sorted_unique(lists)


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
    loader = DataLoader(
        dataset,
        batch_size=batch,
        sampler=InfiniteSampler(len(dataset), seed=seed, start=start_batches * batch),
        num_workers=cfg.BISSL.PRETEXT_DATA.NUM_WORKERS,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=cfg.BISSL.PRETEXT_DATA.NUM_WORKERS > 0,
    )
    return ignore_in_workers(loader)  # the training process alone stops on a signal


def pretext_batch_to_device(
    cfg: CfgNode, batch: tuple, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """The loader's views as the model's inputs on ``device``.

    A :class:`~.view_augment.PretextView` (the loader's: uint8 pixels and each view's random
    parameters) is copied, augmented there as one batch (:func:`~.view_augment.augment_views`:
    colour jitter, grayscale, blur, solarisation) and normalised (float32, MODEL.PIXEL_MEAN/STD);
    uint8 pixels are only normalised; floating tensors (already model inputs, e.g. tests'
    batches) are only moved (the config's normalisation is not read for them)."""
    out = []
    for item in batch:
        if isinstance(item, PretextView):
            pixels = item.pixels.to(device, non_blocking=True)
            # The parameters stay on the host: they say which rows take which operation.
            out.append(normalise_pixels(augment_views(pixels, item.params), *normalisation(cfg)))
        elif item.dtype == torch.uint8:
            out.append(normalise_pixels(item.to(device, non_blocking=True), *normalisation(cfg)))
        else:
            out.append(item.to(device, non_blocking=True))
    return tuple(out)


# ---- Downstream (upper level): the config's task ------------------------------------------------


def build_downstream_train_loader(
    cfg: CfgNode, total_batch: int, start_batches: int = 0, seed: int = 0
):
    """Endless loader of downstream batches: detection dicts or classification tensors."""
    loader = downstream_task(cfg).build_train_loader(cfg, total_batch, start_batches, seed)
    return ignore_in_workers(loader)


def downstream_train_size(cfg: CfgNode) -> int:
    """Number of downstream training samples (head warm-up epochs -> iterations)."""
    return downstream_task(cfg).train_size(cfg)
