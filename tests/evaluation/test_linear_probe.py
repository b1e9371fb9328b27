"""The deterministic linear probe: optimality, separable data, L2 selection, identical reruns."""

from __future__ import annotations

import json

from bissl_det.engine.cls_eval import run_cls_eval
from bissl_det.evaluation.linear_probe import fit_logistic_probe, select_l2
from tests.tools.test_eval_cls import _cfg, backbone  # noqa: F401  (fixture)

import numpy as np
import pytest
import torch


def _blobs(n_per_class: int, centres: np.ndarray, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + spread * rng.standard_normal((n_per_class, len(c))) for c in centres])
    y = np.repeat(np.arange(len(centres)), n_per_class)
    return torch.tensor(x), torch.tensor(y)


def test_separable_features_are_classified_perfectly():
    # Four classes on the corners of a square 10 apart, within-class radius < 1.5: separable.
    centres = np.array([[0, 0, 3], [10, 0, 3], [0, 10, 3], [10, 10, 3]], dtype=float)
    x, y = _blobs(30, centres, 0.3, seed=0)
    x_test, y_test = _blobs(50, centres, 0.3, seed=1)
    probe = fit_logistic_probe(x, y, 4, l2=1e-4)
    assert probe.converged
    assert (probe.logits(x_test).argmax(1) == y_test).all()  # 100 %
    # The negative control: labels unrelated to the features cannot be fitted to 100 %.
    shuffled = y_test[torch.randperm(len(y_test), generator=torch.Generator().manual_seed(0))]
    assert (probe.logits(x_test).argmax(1) == shuffled).float().mean() < 0.6


def _objective_gradient(x, y, weight, bias, l2, multi_label):
    """The probe's gradient by hand in NumPy: standardised x, mean loss + l2/2 |W|^2."""
    x = (x - x.mean(0)) / x.std(0)
    z = x @ weight + bias
    if multi_label:
        known = y >= 0
        residual = np.where(known, 1 / (1 + np.exp(-z)) - np.clip(y, 0, 1), 0.0) / known.sum()
    else:
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        residual = (p - np.eye(z.shape[1])[y]) / len(y)
    return x.T @ residual + l2 * weight, residual.sum(0)


@pytest.mark.parametrize("multi_label", [False, True])
def test_solution_is_the_convex_optimum(multi_label):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((60, 5)) * [1, 10, 100, 0.1, 1] + 3
    if multi_label:
        y = rng.integers(-1, 2, size=(60, 3))
        y[:3] = 1  # every class has a positive
    else:
        y = rng.integers(0, 3, size=60)
    probe = fit_logistic_probe(
        torch.tensor(x), torch.tensor(y), 3, l2=0.01, multi_label=multi_label
    )
    gw, gb = _objective_gradient(x, y, probe.weight.numpy(), probe.bias.numpy(), 0.01, multi_label)
    assert probe.converged and probe.iterations > 1
    assert np.abs(gw).max() < 1e-7 and np.abs(gb).max() < 1e-7
    # Strict convexity: from any other start the optimum is the same; a rerun is bit-identical.
    again = fit_logistic_probe(
        torch.tensor(x), torch.tensor(y), 3, l2=0.01, multi_label=multi_label
    )
    assert torch.equal(again.weight, probe.weight) and torch.equal(again.bias, probe.bias)


def test_l2_selection_takes_the_best_score_and_the_stronger_penalty_on_ties():
    scores = {1e-3: 80.0, 1e-2: 90.0, 1e-1: 90.0, 1.0: 70.0}
    best, seen = select_l2(lambda l2: l2, lambda l2: scores[l2], [1.0, 1e-3, 1e-1, 1e-2])
    assert best == 1e-1 and seen == scores
    with pytest.raises(ValueError, match="empty"):
        select_l2(lambda l2: l2, lambda l2: 0.0, [])


def test_eval_cls_logistic_probe_is_identical_on_rerun(tmp_path, backbone):  # noqa: F811
    first = run_cls_eval(_cfg(tmp_path / "a", backbone), logistic_probe=True)
    second = run_cls_eval(_cfg(tmp_path / "b", backbone), logistic_probe=True)
    assert first["protocol"] == "logistic_probe"
    assert first["per_seed"] == second["per_seed"]  # exact, not approximate
    assert first["probe"]["l2"] == second["probe"]["l2"]
    assert first["probe"]["val_scores"] == second["probe"]["val_scores"]
    stored = json.loads((tmp_path / "a" / "out" / "cls_results.json").read_text())
    assert stored["per_seed"][0]["metrics"] == first["mean"]
    assert 0 <= first["mean"]["top1"] <= 100
    with pytest.raises(ValueError, match="deterministic"):
        run_cls_eval(_cfg(tmp_path / "c", backbone), seeds=2, logistic_probe=True)
