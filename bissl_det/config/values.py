"""A config as flat ``KEY.SUB: value`` pairs, JSON-comparable, less the keys that may differ.

Run identity (does a resume or an OUTPUT_DIR belong to this run?) and comparability (may these
results be averaged?) both compare configs this way, each with its own list of keys to ignore.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from typing import Any

__all__ = ["flatten", "values_except"]


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"A": {"B": 1}}`` -> ``{"A.B": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _plain(value: Any) -> Any:
    """Tuples become lists: a YAML list and a command-line tuple are the same value."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def values_except(cfg: Mapping, ignored: Iterable[str]) -> dict[str, Any]:
    """Every value of ``cfg`` whose flat key matches none of the ``ignored`` glob patterns,
    sorted by key and ready for JSON."""
    ignored = tuple(ignored)
    return {
        key: _plain(value)
        for key, value in sorted(flatten(cfg).items())
        if not any(fnmatchcase(key, pattern) for pattern in ignored)
    }
