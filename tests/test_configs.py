"""Every YAML under configs/ loads and builds its model (narrowed, on CPU)."""

from bissl_det.engine.setup import load_config

import pytest
from detectron2.modeling import build_model

from .conftest import CONFIGS, NARROW_RESNET

ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))


def test_configs_exist():
    assert len(ALL_CONFIGS) >= 20


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
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
