"""The life of a run around the trainers: set-up and checks at start, one process per GPU, signals
and preemption, the output folder's lock and identity, logs, results records, cluster submission."""

from .launch import launch

__all__ = ["launch"]
