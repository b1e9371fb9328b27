"""Registering data sets in detectron2's catalogs (idempotent, never half-done), and loading
each registered set once per process (:func:`dataset_dicts`)."""

from __future__ import annotations

from collections.abc import Callable

from detectron2.data import DatasetCatalog, MetadataCatalog

from .validation import DatasetValidationError

__all__ = ["dataset_dicts", "register_dataset"]

# name -> the (format, resolved arguments) it was registered with, for idempotent re-registration.
_REGISTERED: dict[str, tuple] = {}
# name -> (the loader function detectron2 holds for it, what that function returned).
_LOADED: dict[str, tuple[Callable[[], list[dict]], list[dict]]] = {}


def dataset_dicts(name: str) -> list[dict]:
    """``DatasetCatalog.get(name)``, loaded once per process: every start-up check, loader and
    record that needs a set's dicts shares one parse of its annotation file.

    The list is shared: callers must not modify it or its records (detectron2's loaders
    serialise them, the mappers deep-copy). A name registered anew (removed and registered
    again, with another loader function) is loaded afresh.

    Raises:
        KeyError: ``name`` is not registered (detectron2's message lists the registered names).
    """
    if name not in DatasetCatalog:
        return DatasetCatalog.get(name)  # raises, listing the registered names
    load = DatasetCatalog[name]
    if name not in _LOADED or _LOADED[name][0] is not load:
        _LOADED[name] = (load, load())
    return _LOADED[name][1]


def _already_registered(name: str, spec: tuple) -> bool:
    """True if ``name`` is registered with ``spec``; raises if the name is taken otherwise."""
    if not isinstance(name, str) or not name:
        raise DatasetValidationError(f"dataset name {name!r} must be a non-empty string")
    if name in _REGISTERED:
        if _REGISTERED[name] == spec:
            return True
        raise DatasetValidationError(
            f"dataset {name!r} is already registered with different arguments:\n"
            f"  before: {_REGISTERED[name]}\n  now:    {spec}"
        )
    if name in DatasetCatalog.list():
        raise DatasetValidationError(
            f"dataset name {name!r} is already taken in detectron2's DatasetCatalog (a builtin "
            "or another registration); choose another NAME"
        )
    return False


def register_dataset(
    name: str, spec: tuple, register: Callable[[], None], validate: Callable[[], object] | None
) -> bool:
    """Register a data set with ``register`` (detectron2's own ``register_*``), then validate.

    Args:
        name: New data set name.
        spec: The resolved arguments; the same name with the same spec again is a no-op.
        register: Puts ``name`` into detectron2's DatasetCatalog and MetadataCatalog.
        validate: Checks the registered set now (None: later, at start-up); if it raises, the
            registration is undone, so nothing is left half-registered.

    Returns:
        True if registered now, False if already registered with the same spec.

    Raises:
        DatasetValidationError: ``name`` is taken, or ``validate`` found bad data.
    """
    if _already_registered(name, spec):
        return False
    _LOADED.pop(name, None)
    register()
    try:
        if validate is not None:
            validate()
    except BaseException:
        _LOADED.pop(name, None)
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        raise
    _REGISTERED[name] = spec
    return True
