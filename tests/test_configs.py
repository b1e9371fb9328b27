"""Every YAML under configs/ loads with the project's loader and builds its model (narrowed, on
CPU); leaves are short and say only what differs from their base; the defaults are the paper's."""

from pathlib import Path

from bissl_det.config.defaults import add_bissl_config
from bissl_det.config.values import flatten
from bissl_det.runtime.setup import load_config

import pytest
import yaml
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from .helpers import CONFIGS, NARROW_RESNET

# configs/study/*.yaml are study files of tools/study.py (tests/tools/test_study.py), not configs.
ALL_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent != CONFIGS / "study")
LEAVES = [p for p in ALL_CONFIGS if not p.name.startswith("Base-")]
BISSL_LEAVES = sorted((CONFIGS / "bissl").glob("[!B]*.yaml"))
IDS = {"ids": lambda p: str(p.relative_to(CONFIGS))}
# A leaf that needs more than this many lines is a base in disguise.
MAX_LEAF_LINES = 45


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def _base_chain_values(path: Path) -> dict:
    """The keys the ``_BASE_`` files of ``path`` set themselves (nearest base wins)."""
    base = _raw(path).get("_BASE_")
    if base is None:
        return {}
    base_path = path.parent / base
    own = {k: v for k, v in flatten(_raw(base_path)).items() if k != "_BASE_"}
    return {**_base_chain_values(base_path), **own}


def _node(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def test_the_configs_named_in_the_readme_ship():
    names = {str(p.relative_to(CONFIGS)) for p in ALL_CONFIGS}
    for kind in ("simclr", "byol"):
        for arch in ("C4", "FPN"):
            for data in ("voc", "coco"):
                assert f"bissl/{kind}_R50_{arch}_{data}.yaml" in names
        assert f"pretrain/{kind}_R50.yaml" in names


@pytest.mark.parametrize("path", ALL_CONFIGS, **IDS)
def test_config_loads_with_the_projects_loader(path):
    cfg = load_config(str(path))
    assert cfg.MODEL.META_ARCHITECTURE, path
    assert "BISSL" in cfg and "PRETRAIN" in cfg and "CLS" in cfg


@pytest.mark.parametrize("path", LEAVES, **IDS)
def test_leaves_are_short_and_do_not_repeat_their_base(path):
    lines = path.read_text().splitlines()
    assert len(lines) <= MAX_LEAF_LINES, f"{path}: {len(lines)} lines"
    inherited = _base_chain_values(path)
    own = {k: v for k, v in flatten(_raw(path)).items() if k != "_BASE_"}
    repeated = sorted(k for k, v in own.items() if k in inherited and inherited[k] == v)
    assert not repeated, f"{path} repeats its base's values of {repeated}"


# The BiSSL paper's settings (see /work/shared/BISSL_REFERENCE.md): config key -> value.
PAPER_DEFAULTS = {
    "BISSL.STAGES": 500,
    "BISSL.LOWER_STEPS": 20,
    "BISSL.UPPER_STEPS": 8,
    "BISSL.LAMBDA": 1e-3,
    "BISSL.HYPERGRAD.DAMPING": 10.0,
    "BISSL.HYPERGRAD.MAX_ITER": 5,
    "BISSL.LOWER.BASE_LR": 1.0,
    "BISSL.LOWER.MOMENTUM": 0.9,
    "BISSL.LOWER.WEIGHT_DECAY": 1e-6,
    "BISSL.LOWER.WARMUP_STEPS": 200,
    "BISSL.LOWER.FINAL_LR_FACTOR": 1e-3,
    "BISSL.UPPER.FINAL_LR_FACTOR": 1e-3,
    "BISSL.LOWER.CLIP_GRAD_NORM": 10.0,
    "BISSL.UPPER.CLIP_GRAD_NORM": 10.0,
    "MODEL.SIMCLR.TEMPERATURE": 0.5,
    "MODEL.SIMCLR.PROJECTOR_DIMS": [256, 256, 256],
    "MODEL.BYOL.PROJECTOR_DIMS": [256, 256, 256],
    "MODEL.BYOL.PREDICTOR_DIMS": [256, 256, 256],
    "MODEL.BYOL.EMA_MOMENTUM": 0.9995,
}


def test_defaults_are_the_papers():
    cfg = add_bissl_config(get_cfg())
    for key, value in PAPER_DEFAULTS.items():
        assert _node(cfg, key) == value, key


@pytest.mark.parametrize("path", BISSL_LEAVES, **IDS)
def test_shipped_bissl_configs_keep_the_papers_settings(path):
    cfg = load_config(str(path))
    for key, value in PAPER_DEFAULTS.items():
        assert _node(cfg, key) == value, f"{path}: {key}"


# Upper-level (downstream) lr and weight decay of the VOC leaves, per pretext task.
VOC_UPPER = {"simclr": (0.015, 0.0), "byol": (0.03, 2e-4)}


@pytest.mark.parametrize("path", sorted((CONFIGS / "bissl").glob("*_voc.yaml")), **IDS)
def test_voc_leaves_upper_lr_and_weight_decay(path):
    cfg = load_config(str(path))
    pretext = cfg.MODEL.BISSL.PRETEXT
    assert path.name.startswith(pretext)
    assert VOC_UPPER[pretext] == (cfg.BISSL.UPPER.BASE_LR, cfg.BISSL.UPPER.WEIGHT_DECAY)


@pytest.mark.parametrize("path", ALL_CONFIGS, **IDS)
def test_config_builds_its_model(path):
    cfg = load_config(str(path), ["MODEL.DEVICE", "cpu", *NARROW_RESNET])
    if cfg.MODEL.RESNETS.NORM == "SyncBN":  # single-process CPU build: the same layers
        cfg.MODEL.RESNETS.NORM = "BN"
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0
    if cfg.MODEL.META_ARCHITECTURE == "BiSSL":
        pairs = model.backbone_pairs
        lower = dict(model.lower_backbone.named_parameters())
        assert set(pairs.names) == set(lower), "every lower backbone tensor has an upper twin"
        assert "res5.0.conv1.weight" in pairs.names
