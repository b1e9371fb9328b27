"""Aspect-ratio grouping that resumes exactly: the sampler's indices are grouped before mapping.

Detectron2's ``AspectRatioGroupedDataset`` groups *mapped* images, so the images waiting in a
group at a checkpoint (already read and augmented, their random draws spent) are lost to a
resumed run. Grouping indices instead makes every batch a pure function of the index stream and
the images' sizes: a resumed run skips the batches it already drew by replaying indices only (no
image is read), and images are mapped when their batch is drawn, so with NUM_WORKERS = 0 the
random augmentations continue exactly from the checkpoint's RNG state. The groups are
Detectron2's: landscape (width > height) and the rest.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from detectron2.data.build import trivial_batch_collator, worker_init_reset_seed
from detectron2.data.common import DatasetFromList, MapDataset
from torch.utils.data import DataLoader, Sampler

__all__ = ["GroupedBatchSampler", "aspect_groups", "build_grouped_train_loader"]


def aspect_groups(records: Sequence[dict]) -> list[int]:
    """Group of each dataset record: 0 for landscape (width > height), 1 otherwise."""
    return [0 if record["width"] > record["height"] else 1 for record in records]


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` indices of one group each, from an endless index stream.

    Args:
        sampler: The index stream (e.g. an :class:`~bissl_det.data.pretext.InfiniteSampler`
            from position 0).
        groups: Group id of every dataset index.
        batch_size: Indices per batch.
        start_batches: Batches already drawn (a resumed run): replayed without being yielded.
    """

    def __init__(
        self, sampler: Iterable[int], groups: Sequence[int], batch_size: int, start_batches: int = 0
    ) -> None:
        if batch_size <= 0 or start_batches < 0:
            raise ValueError(
                f"batch_size {batch_size} must be > 0, start_batches {start_batches} >= 0"
            )
        self.sampler, self.groups = sampler, list(groups)
        self.batch_size, self.start_batches = batch_size, start_batches

    def __iter__(self) -> Iterator[list[int]]:
        buckets: dict[int, list[int]] = {}
        drawn = 0
        for index in self.sampler:
            bucket = buckets.setdefault(self.groups[index], [])
            bucket.append(index)
            if len(bucket) == self.batch_size:
                if drawn >= self.start_batches:
                    yield bucket[:]
                drawn += 1
                bucket.clear()


def build_grouped_train_loader(
    records: Sequence[dict],
    mapper,
    sampler: Iterable[int],
    batch_size: int,
    start_batches: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """Endless loader of lists of mapped records, grouped by aspect ratio, resumable exactly.

    ``sampler`` must start at position 0: ``start_batches`` skips the batches already drawn.
    """
    dataset = MapDataset(DatasetFromList(list(records), copy=False), mapper)
    return DataLoader(
        dataset,
        batch_sampler=GroupedBatchSampler(
            sampler, aspect_groups(records), batch_size, start_batches
        ),
        collate_fn=trivial_batch_collator,
        num_workers=num_workers,
        worker_init_fn=worker_init_reset_seed,
    )
