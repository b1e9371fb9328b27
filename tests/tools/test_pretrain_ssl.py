"""tools/pretrain_ssl.py: SimCLR/BYOL pretraining runs, exports a BiSSL-ready backbone, resumes."""

from __future__ import annotations

import importlib.util
import json
import math

from bissl_det.checkpoint import load_pretext_checkpoint, lower_state_without_backbone
from bissl_det.engine.pretrain import PretrainTrainer
from bissl_det.runtime.setup import load_config
from bissl_det.solver.build import warmup_cosine
from tests.helpers import CONFIGS, NARROW_RESNET, REPO, tiny_config

import pytest
import torch
from detectron2.modeling import build_model

DEMO = {p: CONFIGS / "quick" / f"pretrain_{p}_demo.yaml" for p in ("simclr", "byol")}
# The narrow ResNet with test_tiny_C4's heads, 32 px crops, batch 8.
TINY = [
    *NARROW_RESNET,
    *["MODEL.SIMCLR.PROJECTOR_DIMS", "[32, 16]", "MODEL.BYOL.PROJECTOR_DIMS", "[32, 16]"],
    *["MODEL.BYOL.PREDICTOR_DIMS", "[32, 16]", "BISSL.PRETEXT_DATA.AUG.CROP_SIZE", "32"],
    *["PRETRAIN.IMS_PER_BATCH", "8", "PRETRAIN.WARMUP_STEPS", "1", "PRETRAIN.LOG_PERIOD", "1"],
    *["PRETRAIN.BASE_LR", "0.5", "SEED", "0"],
]


def pretrainer(cfg, resume: bool = False, seed: int = 0) -> PretrainTrainer:
    """A PretrainTrainer of ``cfg``, built right after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    trainer = PretrainTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    return trainer


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_configs_match_the_quick_bissl_configs():
    """The exported demo backbone (and head) must load into the quick BiSSL configs."""
    for pretext, path in DEMO.items():
        pre = load_config(str(path))
        bissl = load_config(str(CONFIGS / "quick" / f"bissl_{pretext}_C4_demo.yaml"))
        assert pretext == pre.MODEL.BISSL.PRETEXT
        assert pre.MODEL.RESNETS == bissl.MODEL.RESNETS
        assert pre.MODEL.SIMCLR == bissl.MODEL.SIMCLR
        assert pre.MODEL.BYOL.PROJECTOR_DIMS == bissl.MODEL.BYOL.PROJECTOR_DIMS
        assert pre.MODEL.BYOL.PREDICTOR_DIMS == bissl.MODEL.BYOL.PREDICTOR_DIMS
        assert pre.MODEL.PIXEL_MEAN == bissl.MODEL.PIXEL_MEAN
    for name in ("simclr_R50.yaml", "byol_R50.yaml"):
        cfg = load_config(str(CONFIGS / "pretrain" / name))
        assert (cfg.PRETRAIN.IMS_PER_BATCH, cfg.PRETRAIN.BASE_LR) == (1024, 4.8)
        assert cfg.BISSL.PRETEXT_DATA.AUG.CROP_SIZE == 96


@pytest.mark.parametrize("pretext", ["simclr", "byol"])
def test_pretraining_exports_a_backbone_that_seeds_bissl(in_demo_workdir, tmp_path, pretext):
    iters = 3
    args = (
        _load_tool("pretrain_ssl")
        .default_argument_parser()
        .parse_args(
            ["--config-file", str(DEMO[pretext]), *TINY, "PRETRAIN.ITERS", str(iters)]
            + ["PRETRAIN.CHECKPOINT_PERIOD", "2", "OUTPUT_DIR", str(tmp_path)]
        )
    )
    torch.manual_seed(0)
    trainer = _load_tool("pretrain_ssl").main(args)
    cfg = trainer.cfg

    records = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(iters))
    assert all(math.isfinite(r["pretext_loss"]) for r in records)
    # Logged lr = BASE_LR x (linear warm-up, then cosine) at each step.
    schedule = warmup_cosine(iters, 1, cfg.PRETRAIN.FINAL_LR_FACTOR)
    for k, r in enumerate(records):
        assert r["lr"] == pytest.approx(0.5 * schedule(k / iters), rel=1e-6)
    if pretext == "byol":  # cosine target momentum 0.99 -> 1, closed form
        for k, r in enumerate(records):
            expected = 1 - 0.01 * (math.cos(math.pi * (k + 1) / iters) + 1) / 2
            assert r["ema_momentum"] == pytest.approx(expected, abs=1e-12)
    assert (tmp_path / "model_0000001.pth").is_file() and (tmp_path / "model_final.pth").is_file()
    assert (tmp_path / "pretext_backbone_torchvision.pth").is_file()

    # The export loads into a BiSSL model of the same config: theta = phi = the trained ResNet,
    # and the pretext head comes along.
    bissl = build_model(tiny_config(DEMO[pretext], tmp_path / "bissl", *TINY))
    assert type(bissl).__name__ == "BiSSL"
    load_pretext_checkpoint(bissl, str(tmp_path / "pretext_backbone.pth"), pretext)
    trained = trainer.model.encoder.resnet.state_dict()
    for key, value in bissl.lower_backbone.state_dict().items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0, msg=key)
    for lower, upper in zip(*(bissl.backbone_pairs.lower, bissl.backbone_pairs.upper), strict=True):
        torch.testing.assert_close(lower, upper, rtol=0, atol=0)
    head = lower_state_without_backbone(trainer.model)
    for key, value in lower_state_without_backbone(bissl.lower).items():
        torch.testing.assert_close(value, head[key], rtol=0, atol=0, msg=key)


def test_resume_continues_exactly(in_demo_workdir, tmp_path):
    """BYOL (LARS momentum, EMA target, BN statistics, data position, RNG): 2 + 2 == 4 steps."""
    opts = [*TINY, "PRETRAIN.ITERS", "4", "PRETRAIN.CHECKPOINT_PERIOD", "2"]
    straight = pretrainer(tiny_config(DEMO["byol"], tmp_path / "straight", *opts))
    straight.train()

    split_cfg = tiny_config(DEMO["byol"], tmp_path / "split", *opts)
    first = pretrainer(split_cfg)
    first.max_iter = 2  # stop half-way, as a crash would
    first.train()
    # The resumed run must not depend on the fresh process's RNG.
    second = pretrainer(split_cfg, resume=True, seed=123)
    assert second.start_iter == 2 and second.progress.pretext_batches == 2
    second.train()
    assert second.iter == 4 and second.progress.pretext_batches == 4
    expected = straight.model.state_dict()
    for key, value in second.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    # ... and differs from the half-way weights (the test could fail).
    halfway = torch.load(tmp_path / "split" / "model_0000001.pth", weights_only=True)["model"]
    assert not torch.equal(
        halfway["encoder.resnet.stem.conv1.weight"], expected["encoder.resnet.stem.conv1.weight"]
    )


def test_bad_schedule_key_is_named(in_demo_workdir, tmp_path):
    cfg = tiny_config(DEMO["byol"], tmp_path, *TINY, "PRETRAIN.EMA_SCHEDULE", "linear")
    with pytest.raises(ValueError, match="PRETRAIN.EMA_SCHEDULE"):
        PretrainTrainer(cfg)


def test_sync_bn_option(monkeypatch):
    """PRETRAIN.SYNC_BN converts every BN to SyncBatchNorm in multi-process runs (CUDA only)."""
    import bissl_det.engine.pretrain as pretrain

    cfg = load_config(str(DEMO["byol"]), [*TINY, "PRETRAIN.SYNC_BN", "True"])
    plain = pretrain.build_pretrain_model(cfg)  # one process: nothing to synchronise
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in plain.modules())
    monkeypatch.setattr(pretrain, "world_size", lambda: 2)
    with pytest.raises(ValueError, match="PRETRAIN.SYNC_BN needs CUDA"):
        pretrain.build_pretrain_model(cfg)
