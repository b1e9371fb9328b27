"""What tests share besides fixtures: paths, tiny configs of the real architectures, one builder.

Fixtures live in ``tests/conftest.py`` (pytest finds them); everything a test imports is here.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TRAIN_BISSL = REPO / "tools" / "train_bissl.py"
# The smallest real R50-C4 BiSSL run (narrow ResNet-50, 64 px, two short stages).
TINY_C4 = CONFIGS / "quick" / "test_tiny_C4.yaml"
# The demo's classification BiSSL config (half-width ResNet-50, 64 px).
TINY_CLS = CONFIGS / "quick" / "bissl_simclr_cls_demo.yaml"
# The smallest BiSSL run with the classification upper level (narrow ResNet-50, 32 px).
NARROW_CLS = CONFIGS / "quick" / "test_tiny_cls.yaml"
# A ResNet-50 with the same blocks and names, 8x narrower: the model code is the full-scale code.
NARROW_RESNET = [
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "16",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "8",
]  # fmt: skip


def tiny_config(config_file: Path, output_dir: Path, *opts: str):
    """A frozen config as the tools' set-up makes it (datasets registered, OUTPUT_DIR checked
    and created), without their logging."""
    from bissl_det.data.detection import register_from_config
    from bissl_det.runtime.setup import check_output_dir, load_config

    cfg = load_config(str(config_file), ["OUTPUT_DIR", str(output_dir), *opts])
    register_from_config(cfg)
    cfg.freeze()
    check_output_dir(cfg.OUTPUT_DIR)
    return cfg
