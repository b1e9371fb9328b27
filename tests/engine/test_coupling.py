"""BISSL.COUPLING: the study's arms see the same data and steps; the control ignores phi."""

from __future__ import annotations

import hashlib
import math

from bissl_det.engine import BilevelTrainer
from bissl_det.engine.coupling import FixedStageSystem
from tests.helpers import TINY_C4, tiny_config

import pytest
import torch
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

NO_WARMUP = ["BISSL.HEAD_WARMUP.ITERS", "0", "BISSL.HEAD_WARMUP.EPOCHS", "0.0"]


def _digest(tensors) -> str:
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _run(out, coupling: str, phi_noise: float = 0.0, solved: list | None = None):
    """A 2-stage tiny run; returns (trainer, pretext batch digests, downstream batch digests).

    ``phi_noise``: added to the upper backbone (phi) after initialisation, from a generator of
    its own (the global random stream stays the same in every run)."""
    cfg = tiny_config(TINY_C4, out, "BISSL.COUPLING", coupling, *NO_WARMUP)
    seed_all_rng(0)  # as the tools' setup does with SEED (augmentations draw from numpy's RNG)
    trainer = BilevelTrainer(cfg)
    trainer.resume_or_load(resume=False)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainer.model.backbone_pairs.upper:
            p.add_(torch.randn(p.shape, generator=noise), alpha=phi_noise)
    pretext, downstream = [], []
    draw_pretext, draw_downstream = trainer.next_pretext_batch, trainer.next_downstream_batch

    def spy_pretext():
        batch = draw_pretext()
        pretext.append(_digest(batch))
        return batch

    def spy_downstream():
        batch = draw_downstream()
        downstream.append(_digest(d["image"] for d in batch))
        return batch

    trainer.next_pretext_batch, trainer.next_downstream_batch = spy_pretext, spy_downstream
    if solved is not None:
        real = FixedStageSystem.solve

        def spy_solve(system, g):
            x, stats = real(system, g)
            solved.append((g, x))
            return x, stats

        FixedStageSystem.solve = spy_solve
    try:
        trainer.train()
    finally:
        if solved is not None:
            FixedStageSystem.solve = real
    return trainer, pretext, downstream


def _lower_state(trainer) -> dict[str, torch.Tensor]:
    """theta: the lower backbone's parameters and BN buffers."""
    return {k: v.clone() for k, v in trainer.model.lower_backbone.state_dict().items()}


@pytest.mark.slow
def test_arms_share_the_data_stream_and_the_control_ignores_phi(in_demo_workdir, tmp_path):
    solved = []
    runs = {
        c: _run(tmp_path / c, c, solved=solved if c == "decoupled" else None)
        for c in ("bilevel", "first_order", "proximal", "decoupled")
    }
    _, pretext, downstream = runs["bilevel"]
    # 2 stages x (2 lower steps + 1 curvature batch), 2 x 2 upper steps (tiny config).
    assert len(pretext) == 6 and len(downstream) == 4 and len(set(pretext)) == 6
    for coupling, (trainer, p, d) in runs.items():
        assert (p, d) == (pretext, downstream), coupling
        assert trainer.progress.pretext_batches == 6 and trainer.iter == 2
    # The first-order arm's upper gradient was g; logged as such.
    latest = runs["first_order"][0].storage.latest()
    assert latest["hypergrad_norm_ratio"][0] == 1.0 and latest["hypergrad_products"][0] == 0
    assert math.isnan(latest["hypergrad_rel_residual"][0])

    # The control: the implicit gradient contributed exactly nothing (x = 0 at each of the
    # 2 x 2 upper steps), and moving phi leaves theta the same bit for bit.
    assert len(solved) == 4
    for g, x in solved:
        assert all(torch.count_nonzero(t) == 0 for t in x) and any(t.abs().sum() > 0 for t in g)
    moved = _run(tmp_path / "decoupled_moved", "decoupled", phi_noise=0.05)[0]
    theta, theta_moved = _lower_state(runs["decoupled"][0]), _lower_state(moved)
    for key in theta:
        assert torch.equal(theta[key], theta_moved[key]), key
    # Positive controls: BiSSL's theta is not the control's, and moving phi moves it.
    bissl = _lower_state(runs["bilevel"][0])
    assert any(not torch.equal(bissl[k], theta[k]) for k in bissl)
    moved = _lower_state(_run(tmp_path / "bilevel_moved", "bilevel", phi_noise=0.05)[0])
    assert any(not torch.equal(bissl[k], moved[k]) for k in bissl)


def test_fixed_system_refuses_bilevel_and_keeps_g():
    with pytest.raises(ValueError, match="solves a system"):
        FixedStageSystem("bilevel")
    g = (torch.ones(3), torch.arange(4.0))
    x, stats = FixedStageSystem("first_order").solve(g)
    assert all(torch.equal(a, b) for a, b in zip(x, g, strict=True))
    with EventStorage():
        drawn = []
        FixedStageSystem.draw("decoupled", "fisher", lambda: drawn.append(1))
        FixedStageSystem.draw("decoupled", "ggn", lambda: drawn.append(1))
    assert drawn == [1]  # the Fisher arm draws no curvature batch, the others one
