"""TF32 of the curvature and the solvers is set by BISSL.HYPERGRAD.ALLOW_TF32, not inherited."""

from __future__ import annotations

from bissl_det.config.defaults import add_bissl_config
from bissl_det.engine import BilevelTrainer
from bissl_det.modeling.meta_arch import BiSSL
from bissl_det.utils.precision import tf32
from tests.engine.test_distributed_trainer import ToyLower, ToyUpper, _data

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.utils.events import EventStorage


def _flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def global_tf32_on():
    before = _flags()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_tf32_context_sets_and_restores(global_tf32_on) -> None:
    with tf32(False):
        assert _flags() == (False, False)
        with tf32(True):
            assert _flags() == (True, True)
        assert _flags() == (False, False)
    assert _flags() == (True, True)
    with pytest.raises(RuntimeError, match="inside"), tf32(False):
        raise RuntimeError("inside")
    assert _flags() == (True, True)  # restored after an exception too


@pytest.mark.parametrize("allow", [False, True])
def test_stage_products_and_solves_follow_the_key(tmp_path, global_tf32_on, allow: bool) -> None:
    torch.manual_seed(0)
    model = BiSSL(lower=ToyLower(), upper=ToyUpper())
    model.copy_lower_backbone_to_upper()
    cfg = add_bissl_config(get_cfg())
    cfg.OUTPUT_DIR = str(tmp_path)
    cfg.BISSL.LOWER.WARMUP_STEPS = 0
    cfg.BISSL.HYPERGRAD.ALLOW_TF32 = allow
    trainer = BilevelTrainer(cfg, model=model)
    pretext, downstream = _data()
    trainer._pretext_iter = iter(pretext)
    trainer._downstream_iter = iter([downstream])
    trainer.iter = 0
    seen: dict[str, list[tuple[bool, bool]]] = {"lower": [], "build": [], "product": []}
    with EventStorage() as trainer.storage:
        next_batch = trainer.next_pretext_batch
        trainer.next_pretext_batch = lambda: (seen["lower"].append(_flags()), next_batch())[1]
        trainer.lower_step(0)
        trainer.next_pretext_batch = lambda: (seen["build"].append(_flags()), next_batch())[1]
        system = trainer.stage_system()
        matvec = system.curvature.matvec
        system.curvature.matvec = lambda v: (seen["product"].append(_flags()), matvec(v))[1]
        trainer.upper_step(system, 0)
        system.release()
    assert seen["lower"] == [(True, True)]  # first-order passes keep the global switches
    assert seen["build"] == [(allow, allow)]
    assert seen["product"] and set(seen["product"]) == {(allow, allow)}
    assert _flags() == (True, True)
