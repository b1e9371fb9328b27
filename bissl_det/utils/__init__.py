"""Small utilities shared across the project (no detectron2 imports here)."""

from .distributed import (
    all_reduce_grads_,
    all_reduce_mean,
    all_reduce_mean_,
    gather_with_grad,
    is_distributed,
    rank,
    world_size,
)

__all__ = [
    "all_reduce_grads_",
    "all_reduce_mean",
    "all_reduce_mean_",
    "gather_with_grad",
    "is_distributed",
    "rank",
    "world_size",
]
