"""The hypergradient verdict: per-stage range checks, advice values, and a real run's summary."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from bissl_det.config.defaults import add_bissl_config
from bissl_det.engine.verdict import iterations_for, stage_problems
from tests.helpers import REPO, TINY_C4

import pytest
from detectron2.config import get_cfg


def _hg(**changes):
    cfg = add_bissl_config(get_cfg())
    for key, value in changes.items():
        cfg.BISSL.HYPERGRAD[key] = value
    return cfg.BISSL.HYPERGRAD


@pytest.mark.parametrize("kappa", [1.0, 10.0, 1e3, 1e5])
@pytest.mark.parametrize("tol", [0.3, 1e-2, 1e-4])
def test_iterations_meet_the_cg_bound(kappa, tol):
    """2 ((sqrt k - 1)/(sqrt k + 1))^n <= tol at the advised n, and n - 2 would not always do."""
    n = iterations_for(kappa, tol)
    rate = (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)
    assert 2 * rate**n <= tol
    if kappa >= 1e3:  # the rule is tight for ill-conditioned systems: a few fewer do not reach tol
        assert 2 * rate ** (0.9 * n) > tol


def test_sound_stage_has_no_problems():
    metrics = {
        "hypergrad_rel_residual_max": 0.05,
        "hypergrad_negative_curvature": 0.0,
        "hypergrad_norm_ratio": 0.4,
        "hypergrad_eig_min": 1.0,
        "hypergrad_eig_max": 20.0,
    }
    assert stage_problems(metrics, _hg(), 0.001) == ([], "")


def test_high_residual_asks_for_a_basis_from_the_condition_number():
    hg = _hg(SOLVER="lanczos", BASIS_SIZE=5)
    metrics = {
        "hypergrad_rel_residual_max": 0.82,
        "hypergrad_negative_curvature": 0.0,
        "hypergrad_norm_ratio": 0.3,
        "hypergrad_eig_min": 1.0,
        "hypergrad_eig_max": 93.5,
    }
    problems, advice = stage_problems(metrics, hg, 0.001)
    assert problems == ["true residual 0.82 > 0.3"]
    # kappa 93.5, target 0.1: sqrt(93.5)/2 ln(20) = 14.5 -> 15
    assert advice.startswith("raise BISSL.HYPERGRAD.BASIS_SIZE to >= 15 (now 5)")
    cg = stage_problems(metrics, _hg(SOLVER="cg", MAX_ITER=5), 0.001)[1]
    assert cg.startswith("raise BISSL.HYPERGRAD.MAX_ITER to >= 15 (now 5)")


def test_indefinite_stage_asks_for_ggn_or_a_damping():
    metrics = {
        "hypergrad_rel_residual_max": 529.0,
        "hypergrad_negative_curvature": 2.0,
        "hypergrad_norm_ratio": 118.0,
        "hypergrad_eig_min": -3.0,
        "hypergrad_eig_max": 40.0,
    }
    problems, advice = stage_problems(metrics, _hg(DAMPING=10.0), 0.001)
    assert len(problems) == 4
    # c_min = (-3 - 1) x 10.001 = -40.004; 2 x 40.004 - 0.001 = 80.007 -> eig_min(A) >= 1/2
    assert "BISSL.HYPERGRAD.CURVATURE ggn" in advice
    assert "BISSL.HYPERGRAD.DAMPING 80 (now 10)" in advice
    c_min = (-3.0 - 1.0) * 10.001
    assert 1 + c_min / (0.001 + 80.007) == pytest.approx(0.5, abs=1e-6)


@pytest.mark.e2e
def test_bissl_run_on_an_indefinite_system_warns_and_counts(in_demo_workdir, tmp_path):
    """Near init with the Hessian and no damping, A = I + H / lambda is indefinite."""
    out = tmp_path / "run"
    command = [
        sys.executable, str(REPO / "tools" / "train_bissl.py"), "--config-file", str(TINY_C4),
        "BISSL.STAGES", "3", "BISSL.HYPERGRAD.CURVATURE", "hessian",
        "BISSL.HYPERGRAD.DAMPING", "0.0", "BISSL.HYPERGRAD.EIGEN_STEPS", "4",
        "DATASETS.TEST", "()", "OUTPUT_DIR", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, cwd=in_demo_workdir, env=env, capture_output=True, text=True, timeout=600
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    verdict = json.loads((out / "results.json").read_text())["hypergradient"]
    assert verdict["stages_checked"] == 3
    assert verdict["stages_out_of_range"] >= 1
    assert verdict["stages_out_of_range"] == len(verdict["out_of_range_stages"])
    assert "WARNING" in log and "hypergradient out of range" in log
    assert "Hypergradient verdict:" in log and "BISSL.HYPERGRAD." in verdict["advice"]
    # The console counts stages truthfully and gives an ETA from the first one.
    assert "stage 1/3:" in log and "ETA" in log
    assert "BiSSL stages: 3 in" in log and "Overall training speed" not in log
    assert "coupling lambda|theta-phi|/|grad L_P|" in log
    assert "Upper level: nothing evaluated" in log


def test_coupling_ratio_is_lambda_distance_over_the_pretext_gradient(in_demo_workdir, tmp_path):
    """lambda ||theta - phi|| / ||grad L_P||: the distance before the step, the pretext gradient
    alone (what the Fisher history receives), for a phi moved away from theta by hand."""
    from bissl_det.bilevel import tuple_norm
    from bissl_det.data.build import build_pretext_loader
    from bissl_det.engine import BilevelTrainer
    from tests.helpers import tiny_config

    import torch

    cfg = tiny_config(TINY_C4, tmp_path, "BISSL.LAMBDA", "0.5")
    trainer = BilevelTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer._pretext_iter = iter(build_pretext_loader(cfg, cfg.BISSL.LOWER.IMS_PER_BATCH))
    pairs = trainer.model.backbone_pairs
    torch.manual_seed(0)
    with torch.no_grad():
        for p in pairs.upper:
            p.add_(0.01 * torch.randn_like(p))
        distance = tuple_norm(torch._foreach_sub(pairs.lower, pairs.upper)).item()
    pretext_norms = []
    record = trainer.hypergrad.record_lower_gradient

    def spy(grads):
        pretext_norms.append(tuple_norm(tuple(grads)).item())
        record(grads)

    trainer.hypergrad.record_lower_gradient = spy
    trainer._coupling = []
    trainer.lower_step(0)
    assert distance > 0 and pretext_norms[0] > 0
    assert trainer._coupling == [pytest.approx(0.5 * distance / pretext_norms[0], rel=1e-6)]
