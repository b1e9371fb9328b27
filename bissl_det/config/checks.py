"""Config files read with the origin of every key, and every value checked before any work.

Detectron2 merges a YAML file and its ``_BASE_`` chain into one dict, so an error can only name
the file that was asked for (and a ``_BASE_`` cycle is a RecursionError). Here the chain is read
first, file by file: a cycle is refused with the chain of files, and every key remembers the
file that set it last (or the command line), so that every message reads like
``configs/quick/x.yaml (via _BASE_ configs/Base-x.yaml): BISSL.UPPER.BASE_LR = -0.1 must be > 0``.

:func:`check_config_values` checks what a config alone decides (learning rates, lengths,
periods, SimCLR's batch, fp16 autocast); what needs the data sets is checked at start-up by
:mod:`bissl_det.runtime.batch_checks`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import yaml
from detectron2.config import CfgNode

from .defaults import COUPLINGS

BASE_KEY = "_BASE_"
COMMAND_LINE = "command-line override"


class ConfigError(ValueError):
    """An invalid config; the message names each key, its value and where it was set."""


@dataclass
class ConfigOrigins:
    """Where each key of a config was set: the ``_BASE_`` chain from the leaf, or the command line.

    Attributes:
        leaf: the config file given to the tool.
        where: dotted key -> files from the leaf down to the one that set the key last, or
            ``(COMMAND_LINE,)``. Keys missing here kept their default.
    """

    leaf: str
    where: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def describe(self, key: str) -> str:
        """``leaf.yaml``, ``leaf.yaml (via _BASE_ a.yaml -> b.yaml)``, or COMMAND_LINE."""
        chain = self.where.get(key)
        if chain is None:
            return f"{self.leaf} (default value: not set in the file, its _BASE_ chain or opts)"
        if len(chain) == 1:
            return chain[0]
        return f"{chain[0]} (via _BASE_ {' -> '.join(chain[1:])})"

    def add_overrides(self, opts: list[str]) -> None:
        """Record KEY VALUE command-line overrides (they win over every file)."""
        for key in opts[0::2]:
            self.where[key] = (COMMAND_LINE,)

    def key_in_message(self, message: str) -> str | None:
        """The config key an error message (yacs's, Detectron2's) is about, if one is known."""
        match = re.search(r"config key:?\s*([\w.]+)", message)
        if match:
            return match.group(1)
        found = [k for k in self.where if re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", message)]
        return max(found, key=len, default=None)


# ---- Reading the _BASE_ chain --------------------------------------------------------------------


def read_config_chain(config_file: str) -> ConfigOrigins:
    """Read a config and its ``_BASE_`` files (detectron2's semantics) and record key origins.

    Raises:
        ConfigError: a ``_BASE_`` cycle (the message shows the chain), invalid YAML, or a file
            whose top level is not a mapping.
        FileNotFoundError: a ``_BASE_`` file is missing (the message names the file citing it).
    """
    origins = ConfigOrigins(config_file)
    _read_file(config_file, (), origins.where)
    return origins


def _read_file(path: str, chain: tuple[str, ...], where: dict[str, tuple[str, ...]]) -> None:
    chain = (*chain, path)
    real = os.path.realpath(path)
    for i, earlier in enumerate(chain[:-1]):
        if os.path.realpath(earlier) == real:
            loop = " -> ".join(chain[i:])
            raise ConfigError(f"{chain[0]}: _BASE_ cycle {loop} (a file cannot be its own base)")
    data = _load_yaml(path, cited_by=chain[-2] if len(chain) > 1 else None)
    bases = data.pop(BASE_KEY, [])
    for base in [bases] if isinstance(bases, str) else bases:
        _read_file(_resolve_base(str(base), path), chain, where)
    # Bases first, then this file: the last file to set a key is its origin, as in the merge.
    for key in _dotted_keys(data):
        where[key] = chain


def _resolve_base(base: str, cited_by: str) -> str:
    """A ``_BASE_`` path as detectron2 resolves it: relative to the citing file's folder."""
    base = os.path.expanduser(base)
    if os.path.isabs(base):
        return base
    return os.path.normpath(os.path.join(os.path.dirname(cited_by), base))


def _load_yaml(path: str, cited_by: str | None) -> dict:
    if not os.path.isfile(path):
        where = f" (the _BASE_ of {cited_by})" if cited_by else ""
        raise FileNotFoundError(f"config file not found: {path}{where}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.constructor.ConstructorError as e:
            # Python tags: detectron2 would merge the file with yaml.unsafe_load, which runs
            # code. Refused here, before detectron2 reads it.
            raise ConfigError(
                f"{path}: holds a Python tag that loading would execute ({e.problem}); a config "
                "may only hold plain YAML values"
            ) from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, not {type(data)}")
    return data


def _dotted_keys(data: dict, prefix: str = "") -> Iterator[str]:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        yield dotted
        if isinstance(value, dict):
            yield from _dotted_keys(value, f"{dotted}.")


def merge_with_origins(cfg: CfgNode, config_file: str, opts: list[str]) -> ConfigOrigins:
    """``cfg.merge_from_file`` + ``merge_from_list``; every error names the file that set the key.

    Raises:
        KeyError: an unknown key (in a file or the overrides), naming where it was set.
        ConfigError: a mistyped value or any other merge error, naming where it was set.
    """
    origins = read_config_chain(config_file)
    try:
        cfg.merge_from_file(config_file)
    except (KeyError, ValueError, TypeError, AssertionError) as e:
        raise _located(e, origins) from None
    origins.add_overrides(opts)
    try:
        cfg.merge_from_list(opts)
    except (KeyError, ValueError, TypeError, AssertionError) as e:
        raise _located(e, origins, f"command-line overrides {opts}") from None
    return origins


def _located(error: Exception, origins: ConfigOrigins, fallback: str | None = None) -> Exception:
    message = str(error.args[0]) if error.args else str(error)
    key = origins.key_in_message(message)
    where = origins.describe(key) if key else fallback or f"{origins.leaf} or its _BASE_ files"
    # yacs reports unknown keys as KeyError from a file but AssertionError from a list.
    unknown = isinstance(error, KeyError) or "Non-existent" in message
    return (KeyError if unknown else ConfigError)(f"{where}: {message}")


# ---- Values --------------------------------------------------------------------------------------

LEARNING_RATES = (
    "SOLVER.BASE_LR",
    "BISSL.LOWER.BASE_LR",
    "BISSL.UPPER.BASE_LR",
    "BISSL.HEAD_WARMUP.BASE_LR",
    "PRETRAIN.BASE_LR",
    "CLS.SOLVER.BASE_LR",
)
# Lengths, periods a modulo divides by, and sizes.
POSITIVE = (
    "BISSL.STAGES",
    "BISSL.LOWER_STEPS",
    "BISSL.UPPER_STEPS",
    "PRETRAIN.ITERS",
    "SOLVER.MAX_ITER",
    "BISSL.LOG_PERIOD",
    "PRETRAIN.LOG_PERIOD",
    "CLS.SOLVER.LOG_PERIOD",
    "SOLVER.CHECKPOINT_PERIOD",
    "SOLVER.IMS_PER_BATCH",
    "BISSL.LOWER.IMS_PER_BATCH",
    "BISSL.UPPER.IMS_PER_BATCH",
    "PRETRAIN.IMS_PER_BATCH",
    "CLS.SOLVER.IMS_PER_BATCH",
    "CLS.SOLVER.TEST_IMS_PER_BATCH",
    "CLS.IMAGE_SIZE",
    "CLS.PROBE.MAX_ITER",
    "BISSL.PRETEXT_DATA.AUG.CROP_SIZE",
    "MODEL.SIMCLR.TEMPERATURE",
    "BISSL.HYPERGRAD.WARN_RESIDUAL",
)
NON_NEGATIVE = (
    "BISSL.LAMBDA",
    "BISSL.GAMMA",
    "BISSL.HYPERGRAD.DAMPING",
    "BISSL.HYPERGRAD.TOL",
    # 0 is valid for the "lanczos" and "direct" solvers (engine/hypergrad.py checks the pair).
    "BISSL.HYPERGRAD.MAX_ITER",
    "BISSL.CHECKPOINT_PERIOD",
    "PRETRAIN.CHECKPOINT_PERIOD",
    "REPLICA_CHECK_PERIOD",
    "TEST.EVAL_PERIOD",
    "BISSL.HEAD_WARMUP.ITERS",
    "BISSL.HEAD_WARMUP.EPOCHS",
    "CLS.SOLVER.ITERS",
    "CLS.SOLVER.EPOCHS",
    "BISSL.LOWER.WARMUP_STEPS",
    "PRETRAIN.WARMUP_STEPS",
    "SOLVER.WARMUP_ITERS",
    "BISSL.LOWER.FINAL_LR_FACTOR",
    "BISSL.UPPER.FINAL_LR_FACTOR",
    "PRETRAIN.FINAL_LR_FACTOR",
    "BISSL.LOWER.CLIP_GRAD_NORM",
    "BISSL.UPPER.CLIP_GRAD_NORM",
    "PRETRAIN.CLIP_GRAD_NORM",
    "SOLVER.WEIGHT_DECAY",
    "BISSL.LOWER.WEIGHT_DECAY",
    "BISSL.UPPER.WEIGHT_DECAY",
    "BISSL.HEAD_WARMUP.WEIGHT_DECAY",
    "PRETRAIN.WEIGHT_DECAY",
    "CLS.SOLVER.WEIGHT_DECAY",
)
MOMENTA = (
    "SOLVER.MOMENTUM",
    "BISSL.LOWER.MOMENTUM",
    "BISSL.UPPER.MOMENTUM",
    "BISSL.HEAD_WARMUP.MOMENTUM",
    "PRETRAIN.MOMENTUM",
    "CLS.SOLVER.MOMENTUM",
)
FRACTIONS = ("MODEL.BYOL.EMA_MOMENTUM", "BISSL.PRETEXT_DATA.MAX_BAD_FRACTION")
# Pretext batches of the two tools that train a pretext task (BiSSL's lower level, pretraining).
PRETEXT_BATCHES = ("BISSL.LOWER.IMS_PER_BATCH", "PRETRAIN.IMS_PER_BATCH")
AMP_DTYPES = ("bfloat16", "float16")

_MISSING = object()


def _get(cfg: CfgNode, key: str):
    """A dotted key's value, or _MISSING when this config has no such key."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


RULES: tuple[tuple[tuple[str, ...], Callable[[float], bool], str], ...] = (
    (LEARNING_RATES, lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0"),
    (POSITIVE, lambda v: math.isfinite(v) and v > 0, "must be > 0"),
    (NON_NEGATIVE, lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0"),
    (MOMENTA, lambda v: 0 <= v < 1, "must be in [0, 1)"),
    (FRACTIONS, lambda v: 0 <= v <= 1, "must be in [0, 1]"),
)


def check_config_values(cfg: CfgNode, origins: ConfigOrigins) -> None:
    """Refuse values no tool can train with; every problem is listed, with where it was set.

    Raises:
        ConfigError: one line per invalid value.
    """
    problems = []

    def refuse(key: str, requirement: str) -> None:
        problems.append(f"{origins.describe(key)}: {key} = {_get(cfg, key)!r} {requirement}")

    for keys, valid, requirement in RULES:
        for key in keys:
            value = _get(cfg, key)
            if value is not _MISSING and _is_number(value) and not valid(value):
                refuse(key, requirement)
    if _get(cfg, "CLS.SOLVER.ITERS") == 0 and _get(cfg, "CLS.SOLVER.EPOCHS") == 0:
        refuse("CLS.SOLVER.EPOCHS", "with CLS.SOLVER.ITERS = 0 trains for zero steps")
    _check_lambda(cfg, refuse)
    _check_classification(cfg, refuse)
    _check_input_sizes(cfg, refuse)
    _check_steps(cfg, refuse)
    if str(_get(cfg, "MODEL.BISSL.PRETEXT")).lower() == "simclr":
        for key in PRETEXT_BATCHES:
            batch = _get(cfg, key)
            if _is_number(batch) and 0 < batch < 2:
                refuse(key, "is below 2: SimCLR's loss has no negatives and is identically 0")
    dtype = _get(cfg, "BISSL.AMP.DTYPE")
    if dtype is not _MISSING and dtype not in AMP_DTYPES:
        refuse("BISSL.AMP.DTYPE", f"must be one of {AMP_DTYPES}")
    elif dtype == "float16" and _get(cfg, "BISSL.AMP.ENABLED"):
        refuse(
            "BISSL.AMP.DTYPE",
            "with BISSL.AMP.ENABLED: float16 autocast without a gradient scaler loses small "
            "gradients to underflow; use 'bfloat16'",
        )
    if problems:
        raise ConfigError(join_problems(problems))


def _check_lambda(cfg: CfgNode, refuse: Callable[[str, str], None]) -> None:
    """lambda = 0 leaves theta independent of phi: the implicit gradient lambda (H + lambda)^-1 g
    is 0 and the damped system cannot be formed. The decoupled control says so explicitly."""
    coupling = _get(cfg, "BISSL.COUPLING")
    if coupling is not _MISSING and coupling not in COUPLINGS:
        refuse("BISSL.COUPLING", f"must be one of {COUPLINGS}")
    elif _get(cfg, "BISSL.LAMBDA") == 0 and coupling != "decoupled":
        refuse(
            "BISSL.LAMBDA",
            "cannot couple the levels (theta no longer depends on phi, the implicit-gradient "
            "system has no solution): use LAMBDA > 0, or BISSL.COUPLING 'decoupled' for the "
            "compute-matched control",
        )


def _check_input_sizes(cfg: CfgNode, refuse: Callable[[str, str], None]) -> None:
    """Image sizes that would fail only at the first batch (a resize to 0 or fewer pixels)."""
    sizes = _get(cfg, "INPUT.MIN_SIZE_TRAIN")
    if sizes is not _MISSING:
        sizes = sizes if isinstance(sizes, list | tuple) else [sizes]
        if not sizes or not all(_is_number(v) and v > 0 for v in sizes):
            refuse("INPUT.MIN_SIZE_TRAIN", "must be one or more sizes > 0 (pixels)")
    for key in ("INPUT.MAX_SIZE_TRAIN", "INPUT.MAX_SIZE_TEST"):
        value = _get(cfg, key)
        if value is not _MISSING and not (_is_number(value) and value > 0):
            refuse(key, "must be > 0 (pixels)")
    value = _get(cfg, "INPUT.MIN_SIZE_TEST")  # 0: test images are not resized
    if value is not _MISSING and not (_is_number(value) and value >= 0):
        refuse("INPUT.MIN_SIZE_TEST", "must be >= 0 (pixels; 0 keeps the test images' size)")


def _check_steps(cfg: CfgNode, refuse: Callable[[str, str], None]) -> None:
    """The multi-step schedule's milestones: fvcore refuses them at the first step, unnamed."""
    if _get(cfg, "SOLVER.LR_SCHEDULER_NAME") != "WarmupMultiStepLR":
        return
    steps, max_iter = _get(cfg, "SOLVER.STEPS"), _get(cfg, "SOLVER.MAX_ITER")
    if steps is _MISSING or not _is_number(max_iter):
        return
    if not all(_is_number(v) and 0 < v < max_iter for v in steps):
        refuse("SOLVER.STEPS", f"must all be in (0, SOLVER.MAX_ITER = {max_iter})")
    elif list(steps) != sorted(steps):
        refuse("SOLVER.STEPS", "must be increasing")


def _check_classification(cfg: CfgNode, refuse: Callable[[str, str], None]) -> None:
    scale = _get(cfg, "CLS.CROP_SCALE")
    if scale is not _MISSING and not (
        len(scale) == 2 and all(_is_number(v) for v in scale) and 0 < scale[0] <= scale[1] <= 1
    ):
        refuse("CLS.CROP_SCALE", "must be (lo, hi) with 0 < lo <= hi <= 1")
    grid = _get(cfg, "CLS.PROBE.L2_GRID")
    if grid is not _MISSING and not (
        len(grid) > 0 and all(_is_number(v) and math.isfinite(v) and v > 0 for v in grid)
    ):
        refuse("CLS.PROBE.L2_GRID", "must be a non-empty list of finite numbers > 0")
    fraction = _get(cfg, "CLS.PROBE.VAL_FRACTION")
    if fraction is not _MISSING and not (_is_number(fraction) and 0 < fraction < 1):
        refuse("CLS.PROBE.VAL_FRACTION", "must be in (0, 1)")


def join_problems(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} invalid config values:\n  " + "\n  ".join(problems)
