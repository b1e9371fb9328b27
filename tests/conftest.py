"""Shared fixtures: a tiny synthetic demo set and tiny configs of the real architectures."""

from __future__ import annotations

from pathlib import Path

import bissl_det  # noqa: F401  (shims before detectron2)
from bissl_det.data.demo import make_demo_data

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY_C4 = CONFIGS / "quick" / "test_tiny_C4.yaml"
TINY_CLS = CONFIGS / "quick" / "bissl_simclr_cls_demo.yaml"
# A ResNet-50 with the same blocks and names, 8x narrower: the model code is the full-scale code.
NARROW_RESNET = [
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "16",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "8",
]  # fmt: skip


@pytest.fixture(scope="session")
def demo_workdir(tmp_path_factory) -> Path:
    """A folder holding ``datasets/demo`` (tiny): configs' relative data paths resolve in it."""
    root = tmp_path_factory.mktemp("demo_work")
    make_demo_data(
        root / "datasets" / "demo",
        seed=0,
        num_train=24,
        num_test=8,
        image_size=64,
        num_cls_train=32,
        num_cls_test=16,
        cls_image_size=32,
    )
    return root


@pytest.fixture
def in_demo_workdir(demo_workdir, monkeypatch) -> Path:
    monkeypatch.chdir(demo_workdir)
    return demo_workdir


def tiny_config(config_file: Path, output_dir: Path, *opts: str):
    """A frozen config with the datasets registered, as the tools' setup() makes it."""
    from bissl_det.data.detection import register_from_config
    from bissl_det.engine.setup import load_config

    cfg = load_config(str(config_file), ["OUTPUT_DIR", str(output_dir), *opts])
    register_from_config(cfg)
    cfg.freeze()
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return cfg
