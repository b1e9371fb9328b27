"""A run's identity: which tool, which kind of run, and the config values it cannot change.

Every run of a training tool writes ``OUTPUT_DIR/run.json`` (rank 0, at start-up, before any
other file) and a copy into every checkpoint::

    {"tool": "train_bissl", "kind": "bissl", "identity": "<sha256 of keys>", "keys": {...}}

``keys`` are the config values that define what the run computes (model shape, schedule
lengths, data, seed, initial weights); values that may change between a run and its resume
(logging/checkpoint/evaluation periods, loader workers, test-time settings, OUTPUT_DIR, device)
are left out (:data:`MAY_CHANGE`).

At start-up :func:`check_run_identity` refuses, before anything is written, a run whose OUTPUT_DIR
holds a run of another identity (``--resume`` with a changed config included), or outputs of an
unknown run, naming every value that differs with both sides; ``--overwrite`` allows it (logged,
and recorded in the new run.json). :func:`check_resume_checkpoint` refuses to resume from a
checkpoint of another kind or identity, or one that lacks a tensor of the model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..checkpoint.io import atomic_write_text
from ..config.values import values_except

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
# The kind of run each tool makes (a checkpoint of another kind is never resumed).
KINDS = {
    "train_bissl": "bissl",
    "pretrain_ssl": "pretrain",
    "finetune_det": "finetune",
    "eval_cls": "cls",
    "search": "search",
}
# Config keys (glob patterns) that may differ between a run and its resume.
MAY_CHANGE = (
    "OUTPUT_DIR",
    "VERSION",
    "GLOBAL.*",
    "CUDNN_BENCHMARK",
    "VIS_PERIOD",
    "MODEL.DEVICE",
    "*CHECKPOINT_PERIOD",
    "*LOG_PERIOD",
    "*EVAL_PERIOD",
    "*NUM_WORKERS",
    "TEST.*",
    "INPUT.*_TEST",
    "DATASETS.*TEST",
    "DATASETS.CHECK_IMAGES",
    "CLS.TEST_ROOT",
    "CLS.SOLVER.TEST_IMS_PER_BATCH",
    "BISSL.PRETEXT_DATA.MAX_BAD_FRACTION",
)
# Files that show a folder holds the outputs of a run.
RUN_OUTPUTS = (
    "model_final.pth",
    "last_checkpoint",
    "results.json",
    "cls_results.json",
    "lower_backbone.pth",
    "pretext_backbone.pth",
    "search_results.json",
)


class RunIdentityError(ValueError):
    """A run would resume from or overwrite a run that is not its own; names both sides."""


def add_overwrite_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The tools' ``--overwrite``: allow a run into an OUTPUT_DIR that holds another run."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an OUTPUT_DIR that holds a run of another tool or config, replacing "
        "its files (refused without this flag)",
    )
    return parser


def identity_keys(cfg: Mapping) -> dict[str, Any]:
    """The config values a run is defined by (all but :data:`MAY_CHANGE`), sorted by key."""
    return values_except(cfg, MAY_CHANGE)


def run_identity(cfg: Mapping, tool: str) -> dict[str, Any]:
    """``{"tool", "kind", "identity", "keys"}`` of a run of ``tool`` with ``cfg``."""
    keys = identity_keys(cfg)
    digest = hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()
    return {"tool": tool, "kind": KINDS.get(tool, tool), "identity": digest[:16], "keys": keys}


def describe(record: Mapping) -> str:
    return f"a {record.get('kind')} run of tools/{record.get('tool')}.py"


def differences(theirs: Mapping, ours: Mapping, limit: int = 12) -> list[str]:
    """``KEY: <theirs> there, <ours> here`` for each identity value that differs.

    Keys that only one side has are a code version's new (or removed) config keys, not a
    change of the run: they are not compared.
    """
    a, b = theirs.get("keys", {}), ours.get("keys", {})
    found = [
        f"{key}: {a[key]!r} there, {b[key]!r} here"
        for key in sorted(set(a) & set(b))
        if a[key] != b[key]
    ]
    return found[:limit] + ([f"... and {len(found) - limit} more"] if len(found) > limit else [])


def same_run(theirs: Mapping, ours: Mapping) -> bool:
    """Same kind and the same value of every identity key both record."""
    if theirs.get("kind") != ours.get("kind"):
        return False
    return theirs.get("identity") == ours.get("identity") or not differences(theirs, ours)


def read_run_file(output_dir: str | Path) -> dict | None:
    """OUTPUT_DIR's run.json, or None when there is none; a broken one is an error naming it."""
    path = Path(output_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunIdentityError(f"{path} cannot be read ({err}); move it away or fix it") from None
    if not isinstance(record, dict) or "identity" not in record:
        raise RunIdentityError(f"{path} is not a run identity file")
    return record


def running_script() -> str | None:
    """The tool this process runs (``tools/<name>.py``), if it is one with a run identity."""
    name = Path(sys.argv[0]).stem
    return name if name in KINDS else None


def check_run_identity(
    cfg: Mapping, tool: str, *, resume: bool = False, overwrite: bool = False
) -> dict:
    """Refuse a run into an OUTPUT_DIR holding another run; then write this run's run.json.

    Rank 0 only, after taking the OUTPUT_DIR lock and before anything else is written there.

    Raises:
        RunIdentityError: OUTPUT_DIR holds a run of another tool/kind/config (names every
            difference, both sides) or outputs without a run.json, and ``overwrite`` is False.
    """
    output_dir = Path(cfg["OUTPUT_DIR"])
    ours = run_identity(cfg, tool)
    theirs = read_run_file(output_dir)
    problem = None
    if theirs is not None and not same_run(theirs, ours):
        changed = differences(theirs, ours)
        other_kind = theirs.get("kind") != ours["kind"] or theirs.get("tool") != ours["tool"]
        what = f"{describe(theirs)}, this is {describe(ours)}" if other_kind else describe(theirs)
        problem = f"OUTPUT_DIR {output_dir} holds {what} with another config" + (
            f" ({'; '.join(changed)})" if changed else ""
        )
    elif theirs is None and not resume:
        found = [name for name in RUN_OUTPUTS if (output_dir / name).exists()]
        if found:
            problem = (
                f"OUTPUT_DIR {output_dir} holds the outputs of an earlier run ({', '.join(found)}) "
                f"without a {RUN_FILE} saying which"
            )
    if problem:
        action = "resuming would continue another run" if resume else "its files would be replaced"
        if not overwrite:
            raise RunIdentityError(
                f"{problem}: {action}. Give this run a new OUTPUT_DIR, or pass --overwrite to "
                "replace that run deliberately"
            )
        logger.warning("--overwrite: %s; going on as asked", problem)
        ours = {**ours, "replaced": theirs or "outputs without run.json"}
    if theirs is None or problem:
        atomic_write_text(json.dumps(ours, indent=2, default=str) + "\n", output_dir / RUN_FILE)
    return ours


def check_resume_checkpoint(
    filename: str, checkpoint: Mapping, run: Mapping | None, model_state: Mapping
) -> None:
    """Refuse to resume from ``filename`` unless it belongs to this run and fills the model.

    Args:
        checkpoint: The loaded file (``"model"`` and, from this version on, ``"run_identity"``).
        run: This run's identity (OUTPUT_DIR/run.json), or None when unknown.
        model_state: The model's ``state_dict()``.

    Raises:
        RunIdentityError: another kind or identity (names both sides), or a model tensor that
            the checkpoint lacks or holds in another shape.
    """
    saved = checkpoint.get("run_identity")
    if isinstance(saved, Mapping) and run is not None:
        if saved.get("kind") != run["kind"]:
            raise RunIdentityError(
                f"--resume: {filename} is a checkpoint of {describe(saved)}, this is "
                f"{describe(run)}: not resumed. Start this run in its own OUTPUT_DIR"
            )
        replaced = run.get("replaced")
        accepted = isinstance(replaced, Mapping) and replaced.get("identity") == saved.get(
            "identity"
        )
        if accepted:  # --resume --overwrite: the user changed this run's config on purpose
            logger.warning(
                "--resume from %s, written with another config (%s): continuing as --overwrite "
                "asked",
                filename,
                "; ".join(differences(saved, run)),
            )
        elif not same_run(saved, run):
            changed = "; ".join(differences(saved, run))
            raise RunIdentityError(
                f"--resume: {filename} was written by a run with another config ({changed}): "
                "not resumed (the schedule and results would mix two runs)"
            )
    weights = checkpoint.get("model", {})
    missing = [k for k in model_state if k not in weights]
    shapes = [
        f"{k}: {tuple(weights[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in model_state.items()
        if k in weights and hasattr(weights[k], "shape") and tuple(weights[k].shape) != v.shape
    ]
    if missing or shapes:
        what = "it is not a checkpoint of this model" if len(missing) == len(model_state) else ""
        raise RunIdentityError(
            f"--resume: {filename} does not fit this model ({what or 'another config'}): "
            f"{len(missing)} of {len(model_state)} tensors missing, e.g. {missing[:5]}"
            + (f"; shapes differ: {shapes[:5]}" if shapes else "")
            + ". Not resumed; start this run in its own OUTPUT_DIR"
        )
