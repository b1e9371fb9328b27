"""The keys of a study file (configs/study/*.yaml), read by tools/study.py.

A study is not a Detectron2 config: it names the tool configs it runs (with KEY VALUE overrides
each) and how they are combined. Every key has a comment; :func:`load_study_config` checks the
values before any run starts, naming the key.
"""

from __future__ import annotations

import os
from pathlib import Path

from fvcore.common.config import CfgNode as CN

from ..config.defaults import COUPLINGS

REPO_ROOT = Path(__file__).resolve().parents[2]
TASKS = ("classification", "detection")
ARM_KINDS = ("bissl", "pretext")
# Metrics compared when METRICS is empty: a flattened results key equal to, or ending in "/", it.
DEFAULT_METRICS = {"classification": ["top1"], "detection": ["AP50", "AP"]}


def study_defaults() -> CN:
    _C = CN()
    # Where every run of the study (one folder each), study.json, report.md and the plots go.
    _C.OUTPUT_DIR = "output/study"
    # The downstream task: "classification" (tools/eval_cls.py) or "detection" (finetune_det.py).
    _C.TASK = "classification"

    _C.PRETEXT = CN()
    # The pretext backbone every arm starts from: trained once by tools/pretrain_ssl.py with
    # CONFIG (+ OPTS), or given as WEIGHTS (a pretext_backbone.pth; CONFIG then unused).
    _C.PRETEXT.CONFIG = ""
    _C.PRETEXT.OPTS = []
    _C.PRETEXT.WEIGHTS = ""

    _C.BISSL = CN()
    # tools/train_bissl.py config (+ OPTS) shared by every BiSSL-kind arm; MODEL.WEIGHTS, SEED
    # and OUTPUT_DIR are set by the study. Relative *.CONFIG paths: the current folder first,
    # then the repository; data paths inside the configs resolve from the current folder.
    _C.BISSL.CONFIG = ""
    _C.BISSL.OPTS = []

    # The pairs: one SEED per pair. Every BiSSL-kind arm runs once per pair with that SEED, so
    # the arms of a pair see the same data stream; differences are taken within pairs.
    _C.PAIRS = [0, 1, 2]
    # The arms, a list of {NAME, KIND, OPTS}. KIND "bissl" (default): train_bissl.py with the
    # BISSL config + OPTS (e.g. [BISSL.COUPLING, decoupled] for the compute-matched control,
    # whose NAME must contain "control"); KIND "pretext": the pretext backbone as is.
    _C.ARMS = []

    _C.EVAL = CN()
    # How each arm's backbone is scored: the tool config (eval_cls.py for classification,
    # finetune_det.py for detection) + OPTS; MODEL.WEIGHTS, SEED and OUTPUT_DIR set by the study.
    _C.EVAL.CONFIG = ""
    _C.EVAL.OPTS = []
    # Fine-tuning runs per backbone (evaluation seeds FIRST_SEED, FIRST_SEED + 1, ...).
    _C.EVAL.FINETUNE = True
    _C.EVAL.SEEDS = 3
    _C.EVAL.FIRST_SEED = 100
    # The deterministic linear probe (eval_cls.py --logistic-probe), classification only.
    _C.EVAL.LOGISTIC_PROBE = True
    _C.EVAL.SEARCH = CN()
    # > 0: tools/search.py chooses the fine-tuning lr and weight decay with this many trials on
    # a validation split of the training data (never the test split), once, on the pretext
    # backbone; every arm is then fine-tuned with the chosen values (one protocol for all).
    _C.EVAL.SEARCH.TRIALS = 0
    # Extra flags of tools/search.py (e.g. [--workers, 2, --sampler, tpe]).
    _C.EVAL.SEARCH.ARGS = []

    # Metrics compared (see DEFAULT_METRICS when empty).
    _C.METRICS = []
    # Comparisons [A, B] (B - A, paired over PAIRS). Empty: every arm against the control, and
    # the control against the pretext arm.
    _C.COMPARISONS = []
    _C.CONFIDENCE = 0.95
    # Arguments of tools/submit.py per tool with --submit: DEFAULT, or a tool's own list, e.g.
    #   SUBMIT: {DEFAULT: [--time, 240], train_bissl: [--gpus-per-node, 8, --time, 2880]}
    _C.SUBMIT = CN(new_allowed=True)
    _C.SUBMIT.DEFAULT = []
    return _C


class StudyConfigError(ValueError):
    """A study file that cannot run; the message names the file and the key."""


def load_study_config(path: str, opts: list[str] | None = None) -> CN:
    """The study file merged over the defaults, then KEY VALUE overrides; checked."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"study file not found: {path!r} (see configs/study/)")
    cfg = study_defaults()
    try:
        cfg.merge_from_file(path)
        cfg.merge_from_list(list(opts or []))
    except (KeyError, ValueError, AssertionError) as e:
        raise StudyConfigError(f"{path}: {e}") from None
    for section in ("PRETEXT", "BISSL", "EVAL"):
        cfg[section].CONFIG = resolve_config_path(cfg[section].CONFIG)
    check_study_config(cfg, path)
    cfg.freeze()
    return cfg


def resolve_config_path(path: str) -> str:
    """A relative tool config path: from the current folder if it is there, else from the
    repository (so a study runs from a data folder too, as data paths resolve from there)."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    in_repo = REPO_ROOT / path
    return str(in_repo) if in_repo.exists() else path


def _arm_problems(arms) -> list[str]:
    problems, names = [], []
    for i, arm in enumerate(arms):
        if not isinstance(arm, dict) or "NAME" not in arm:
            problems.append(f"ARMS[{i}] = {arm!r}: needs at least NAME (and KIND, OPTS)")
            continue
        unknown = set(arm) - {"NAME", "KIND", "OPTS"}
        if unknown:
            problems.append(f"ARMS[{i}] ({arm['NAME']}): unknown keys {sorted(unknown)}")
        kind = arm.get("KIND", "bissl")
        if kind not in ARM_KINDS:
            problems.append(f"ARMS[{i}].KIND = {kind!r}: must be one of {ARM_KINDS}")
        opts = arm.get("OPTS", [])
        if not isinstance(opts, list) or len(opts) % 2:
            problems.append(f"ARMS[{i}].OPTS = {opts!r}: must be a list of KEY VALUE pairs")
        elif kind == "pretext" and opts:
            problems.append(f"ARMS[{i}].OPTS: a 'pretext' arm trains nothing, it takes no OPTS")
        elif "BISSL.COUPLING" in opts[0::2]:
            value = opts[opts.index("BISSL.COUPLING") + 1]
            if value not in COUPLINGS:
                problems.append(f"ARMS[{i}].OPTS: BISSL.COUPLING {value!r} not in {COUPLINGS}")
            if value == "decoupled" and "control" not in str(arm["NAME"]):
                problems.append(
                    f"ARMS[{i}].NAME = {arm['NAME']!r}: the decoupled arm is the study's "
                    "control, its name must contain 'control'"
                )
        names.append(str(arm["NAME"]))
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"ARMS: names {duplicates} used twice")
    bad = [n for n in names if not n.replace("_", "").replace("-", "").isalnum()]
    if bad:
        problems.append(f"ARMS: names {bad} must be letters, digits, '_' or '-' (folder names)")
    return problems


def check_study_config(cfg: CN, path: str) -> None:
    """Every problem of a study, each naming its key; raised together."""
    problems = []
    if cfg.TASK not in TASKS:
        problems.append(f"TASK = {cfg.TASK!r}: must be one of {TASKS}")
    if not cfg.PRETEXT.WEIGHTS and not cfg.PRETEXT.CONFIG:
        problems.append("PRETEXT: give CONFIG (trained once) or WEIGHTS (a pretext backbone)")
    for key, value in (
        ("PRETEXT.CONFIG", cfg.PRETEXT.CONFIG if not cfg.PRETEXT.WEIGHTS else ""),
        ("BISSL.CONFIG", cfg.BISSL.CONFIG),
        ("EVAL.CONFIG", cfg.EVAL.CONFIG),
    ):
        if value and not Path(value).is_file():
            problems.append(f"{key} = {value!r}: no such file")
    for key in ("PRETEXT.OPTS", "BISSL.OPTS", "EVAL.OPTS"):
        section, leaf = key.split(".")
        if len(cfg[section][leaf]) % 2:
            problems.append(f"{key}: must be KEY VALUE pairs, got {list(cfg[section][leaf])}")
    if not cfg.EVAL.CONFIG:
        problems.append("EVAL.CONFIG is empty: the tool config that scores each backbone")
    pairs = list(cfg.PAIRS)
    if not pairs or len(set(pairs)) < len(pairs) or not all(isinstance(p, int) for p in pairs):
        problems.append(f"PAIRS = {pairs}: distinct integer seeds, at least one")
    if not cfg.ARMS:
        problems.append("ARMS is empty")
    problems += _arm_problems(cfg.ARMS)
    kinds = [a.get("KIND", "bissl") for a in cfg.ARMS if isinstance(a, dict)]
    if "bissl" in kinds and not cfg.BISSL.CONFIG:
        problems.append("BISSL.CONFIG is empty but some arms are BiSSL runs")
    if cfg.EVAL.SEEDS < 1 and cfg.EVAL.FINETUNE:
        problems.append(f"EVAL.SEEDS = {cfg.EVAL.SEEDS}: at least 1 with EVAL.FINETUNE")
    if cfg.EVAL.LOGISTIC_PROBE and cfg.TASK == "detection":
        problems.append("EVAL.LOGISTIC_PROBE: the linear probe is for classification only")
    if not (cfg.EVAL.FINETUNE or cfg.EVAL.LOGISTIC_PROBE):
        problems.append("EVAL: neither FINETUNE nor LOGISTIC_PROBE: nothing would score the arms")
    if cfg.EVAL.SEARCH.TRIALS < 0:
        problems.append(f"EVAL.SEARCH.TRIALS = {cfg.EVAL.SEARCH.TRIALS}: must be >= 0")
    names = {str(a["NAME"]) for a in cfg.ARMS if isinstance(a, dict) and "NAME" in a}
    for i, pair in enumerate(cfg.COMPARISONS):
        if len(pair) != 2 or not set(map(str, pair)) <= names:
            problems.append(f"COMPARISONS[{i}] = {pair}: two arm names of {sorted(names)}")
    if not 0 < cfg.CONFIDENCE < 1:
        problems.append(f"CONFIDENCE = {cfg.CONFIDENCE}: must be in (0, 1)")
    if problems:
        raise StudyConfigError(f"{path}:\n  " + "\n  ".join(problems))


def check_study_inputs(cfg: CN, path: str) -> None:
    """Files that must exist before the first run (not for a dry run or a GPU recipe's check)."""
    if cfg.PRETEXT.WEIGHTS and not Path(cfg.PRETEXT.WEIGHTS).is_file():
        raise StudyConfigError(f"{path}: PRETEXT.WEIGHTS = {cfg.PRETEXT.WEIGHTS!r}: no such file")


def arm_kind(arm) -> str:
    return arm.get("KIND", "bissl")


def metrics_of(cfg: CN) -> list[str]:
    return list(cfg.METRICS) or DEFAULT_METRICS[cfg.TASK]


def comparisons_of(cfg: CN) -> list[tuple[str, str]]:
    """COMPARISONS, or: every other arm against the control, the control against the pretext."""
    if cfg.COMPARISONS:
        return [(str(a), str(b)) for a, b in cfg.COMPARISONS]
    names = [str(a["NAME"]) for a in cfg.ARMS]
    controls = [n for n in names if "control" in n]
    pretext = [str(a["NAME"]) for a in cfg.ARMS if arm_kind(a) == "pretext"]
    out = []
    if controls:
        control = controls[0]
        out += [(p, control) for p in pretext]
        out += [(control, n) for n in names if n != control and n not in pretext]
    else:
        out += [(p, n) for p in pretext for n in names if n not in pretext]
    return out
