"""Start-up work done once, on rank 0, and shared with the other processes.

Data-set validation (every image header, test images decoded) and the scan of pretext image
folders (a stat per file) cost the same on every rank and give the same answer: rank 0 does
them, the others wait for its answer (or its error) instead of repeating them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

from .distributed import is_distributed, rank

T = TypeVar("T")


class RankZeroError(RuntimeError):
    """What another process sees when rank 0's share of the start-up work failed."""


def on_rank_zero(work: Callable[[], T], what: str) -> T:
    """``work()`` on rank 0 only; its result on every rank (one process: just ``work()``).

    Every rank must call it (a collective). If ``work`` raises on rank 0, rank 0 raises that
    error and the others a :class:`RankZeroError` with its text, so no rank waits for a peer
    that failed. ``what`` names the work in that message.
    """
    if not is_distributed():
        return work()
    box: list = [None]
    error: BaseException | None = None
    if rank() == 0:
        try:
            box[0] = ("ok", work())
        except Exception as e:  # told to the other ranks, then raised here
            error = e
            box[0] = ("error", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    status, value = box[0]
    if status == "error":
        raise RankZeroError(f"{what} failed on rank 0: {value}")
    return value
