"""The curvature batch (BISSL.HYPERGRAD.IMS_PER_BATCH) and graph precision (GRAPH_DTYPE)."""

from __future__ import annotations

from bissl_det.bilevel import pretext_curvature, tuple_cosine
from bissl_det.config.defaults import add_bissl_config
from bissl_det.engine import BilevelTrainer
from bissl_det.engine.curvature_batch import (
    check_curvature_batch,
    curvature_images,
    graph_precision,
)
from bissl_det.modeling.meta_arch import BiSSL
from tests.engine.test_distributed_trainer import BATCH, ToyLower, ToyUpper, _data

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.utils.events import EventStorage


def _cfg(tmp_path, **hypergrad):
    cfg = add_bissl_config(get_cfg())
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg.OUTPUT_DIR = str(tmp_path)
    cfg.BISSL.LOWER.IMS_PER_BATCH = BATCH
    cfg.BISSL.LOWER.WARMUP_STEPS = 0
    for key, value in hypergrad.items():
        cfg.BISSL.HYPERGRAD[key] = value
    return cfg


def test_keys_are_checked(tmp_path) -> None:
    cfg = _cfg(tmp_path)
    assert check_curvature_batch(cfg) == BATCH
    cfg.BISSL.HYPERGRAD.IMS_PER_BATCH = 4
    assert check_curvature_batch(cfg, world_size=2) == 2
    for bad, world in ((BATCH + 1, 1), (3, 2), (-1, 1)):
        cfg.BISSL.HYPERGRAD.IMS_PER_BATCH = bad
        with pytest.raises(ValueError, match=rf"IMS_PER_BATCH = {bad}: must be 0"):
            check_curvature_batch(cfg, world)
    with pytest.raises(ValueError, match="GRAPH_DTYPE = 'float16'"):
        graph_precision("float16", torch.device("cpu"))
    views = (torch.arange(8.0).view(8, 1), -torch.arange(8.0).view(8, 1))
    half = curvature_images(views, 3)
    assert torch.equal(half[0], views[0][:3]) and torch.equal(half[1], views[1][:3])
    assert curvature_images(views, 0) == views


def _stage_product(tmp_path, **hypergrad):
    """The trainer's stage system after one lower step; its product with a fixed v, the batch."""
    torch.manual_seed(0)
    model = BiSSL(lower=ToyLower(), upper=ToyUpper())
    model.copy_lower_backbone_to_upper()
    trainer = BilevelTrainer(_cfg(tmp_path, **hypergrad), model=model)
    pretext, _ = _data()
    trainer._pretext_iter = iter(pretext)
    trainer.iter = 0
    with EventStorage() as trainer.storage:
        trainer.lower_step(0)
        system = trainer.stage_system()
    params = model.backbone_pairs.lower
    v = tuple(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) for p in params)
    product = system.curvature.matvec(v)
    system.release()
    return model, params, v, product, pretext[1]


def test_curvature_batch_is_the_first_images_of_the_stage_batch(tmp_path) -> None:
    model, params, v, product, batch = _stage_product(tmp_path, IMS_PER_BATCH=BATCH // 2)
    expected = pretext_curvature(
        "hessian", model.lower, curvature_images(batch, BATCH // 2), params
    )
    torch.testing.assert_close(product, expected.matvec(v))
    whole = pretext_curvature("hessian", model.lower, batch, params).matvec(v)
    assert tuple_cosine(product, whole).item() < 0.9999  # a different matrix: the test can fail


def test_bf16_graph_is_close_to_the_float32_one(tmp_path) -> None:
    *_, fp32, _ = _stage_product(tmp_path / "a")
    *_, bf16, _ = _stage_product(tmp_path / "b", GRAPH_DTYPE="bfloat16")
    assert all(t.dtype == torch.float32 for t in bf16)  # products stay float32
    cos = tuple_cosine(bf16, fp32).item()
    assert 0.99 < cos < 1.0  # bf16 rounding: close, not equal
