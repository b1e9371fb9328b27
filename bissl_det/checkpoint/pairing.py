"""Lining up one ResNet's tensors with their copies inside another model, by name suffix.

Pure torch (no Detectron2 model code): the BiSSL meta-architecture pairs theta with phi, and the
checkpoint checks pair a file's backbone with the detector it must initialise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["BackbonePairs", "pair_by_suffix"]


@dataclass(frozen=True)
class BackbonePairs:
    """Backbone tensors of the two levels, aligned: ``lower[i]`` is the copy of ``upper[i]``."""

    names: tuple[str, ...]  # Detectron2 ResNet names, e.g. "res5.0.conv1.weight"
    upper_names: tuple[str, ...]  # the same tensors' names inside the upper model
    lower: tuple[torch.Tensor, ...]
    upper: tuple[torch.Tensor, ...]


def pair_by_suffix(
    lower: Mapping[str, torch.Tensor], upper: Mapping[str, torch.Tensor], what: str
) -> BackbonePairs:
    """Match every lower tensor ``name`` to the one upper tensor named ``*.name``."""
    by_suffix: dict[str, list[str]] = {}
    for upper_name in upper:
        parts = upper_name.split(".")
        for start in range(1, len(parts)):
            by_suffix.setdefault(".".join(parts[start:]), []).append(upper_name)
    upper_names = []
    for name, tensor in lower.items():
        matches = by_suffix.get(name, [])
        if len(matches) != 1:
            found = ", ".join(matches) or "none"
            raise KeyError(f"backbone {what} {name!r}: expected one upper match, found {found}")
        if upper[matches[0]].shape != tensor.shape:
            raise ValueError(
                f"backbone {what} {name!r}: lower shape {tuple(tensor.shape)} != upper "
                f"{matches[0]!r} shape {tuple(upper[matches[0]].shape)}"
            )
        upper_names.append(matches[0])
    return BackbonePairs(
        names=tuple(lower),
        upper_names=tuple(upper_names),
        lower=tuple(lower.values()),
        upper=tuple(upper[n] for n in upper_names),
    )
