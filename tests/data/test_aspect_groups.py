"""Aspect-ratio grouping by index: one-group batches, and a resumed loader continues exactly."""

from __future__ import annotations

import random

import bissl_det  # noqa: F401  (shims before detectron2)
from bissl_det.data.aspect_groups import GroupedBatchSampler, build_grouped_train_loader
from bissl_det.data.pretext import InfiniteSampler
from bissl_det.engine.checkpointer import rng_state, set_rng_state

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetMapper
from detectron2.structures import BoxMode
from PIL import Image


def test_batches_hold_one_group_and_resume_at_the_next_batch():
    groups = [i % 3 == 0 for i in range(30)]  # a third landscape
    reference = GroupedBatchSampler(InfiniteSampler(30, seed=1, world_size=1, rank=0), groups, 4)
    batches = [b for b, _ in zip(reference, range(40), strict=False)]
    for batch in batches:
        assert len({groups[i] for i in batch}) == 1
    for start in (1, 7, 23):
        resumed = GroupedBatchSampler(
            InfiniteSampler(30, seed=1, world_size=1, rank=0), groups, 4, start_batches=start
        )
        assert [b for b, _ in zip(resumed, range(40 - start), strict=False)] == batches[start:]


@pytest.fixture
def mixed_orientation_records(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for i in range(7):
        width, height = (48, 32) if i % 2 else (32, 48)
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
        records.append({
            "file_name": str(path), "image_id": i, "width": width, "height": height,
            "annotations": [{"bbox": [2, 3, 20, 25], "bbox_mode": BoxMode.XYXY_ABS,
                             "category_id": i % 2}],
        })  # fmt: skip
    return records


def _batches(loader, n):
    out = []
    for _, batch in zip(range(n), loader, strict=False):  # range first: no batch is skipped
        out.append([(d["image_id"], d["image"], d["instances"].gt_boxes.tensor) for d in batch])
    return out


def test_resumed_loader_draws_the_same_augmented_batches(mixed_orientation_records):
    cfg = get_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN = (24, 32, 40)  # random resize and flip: augmentations draw
    cfg.INPUT.MAX_SIZE_TRAIN = 80
    mapper = DatasetMapper(cfg, is_train=True)

    def loader(start):
        sampler = InfiniteSampler(len(mixed_orientation_records), seed=3, world_size=1, rank=0)
        return build_grouped_train_loader(mixed_orientation_records, mapper, sampler, 2, start)

    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    uninterrupted = iter(loader(0))
    _batches(uninterrupted, 3)
    checkpoint_rng = rng_state()  # what a checkpoint after 3 batches holds
    expected = _batches(uninterrupted, 4)

    np.random.seed(123)  # a new process
    set_rng_state(checkpoint_rng)
    resumed = _batches(iter(loader(3)), 4)
    assert [[d[0] for d in b] for b in resumed] == [[d[0] for d in b] for b in expected]
    for got, want in zip(resumed, expected, strict=True):
        for (_, image, boxes), (_, image_ref, boxes_ref) in zip(got, want, strict=True):
            assert torch.equal(image, image_ref) and torch.equal(boxes, boxes_ref)
    # Both orientations occur, each batch holds one.
    sizes = {tuple(image.shape[1:]) for b in expected for _, image, _ in b}
    assert any(h > w for h, w in sizes) and any(w > h for h, w in sizes)
