"""The fast implicit-gradient path (first-order graph built once per stage) equals the reference.

The reference code recomputes the pretext forward and backward for every Hessian-vector product
(:class:`RecomputingHessianVectorProduct`); the trainer builds the graph once
(:meth:`BilevelTrainer.stage_system`, :class:`HessianCurvature`). Both, and torch.func's
forward-over-reverse :func:`functional_hvp`, must give the same implicit gradient of an upper step.
"""

from __future__ import annotations

import copy
import itertools

from bissl_det.bilevel import (
    ProductCurvature,
    RecomputingHessianVectorProduct,
    batch_statistics_only,
    functional_hvp,
    implicit_gradient,
    tuple_norm,
)
from tests.helpers import TINY_C4, tiny_config

import pytest
import torch
from torch.func import functional_call

# Small damping: (I + H / (lam + delta)) must differ clearly from I, or a wrong H would pass.
DAMPING = 0.05
CG_ITERATIONS = 3


def _rel_diff(a, b) -> float:
    return (tuple_norm(tuple(x - y for x, y in zip(a, b, strict=True))) / tuple_norm(b)).item()


@pytest.fixture
def setup(in_demo_workdir, tmp_path):
    from bissl_det.data.build import (
        build_downstream_train_loader,
        build_pretext_loader,
        pretext_batch_to_device,
    )
    from bissl_det.engine.trainer import BilevelTrainer

    from detectron2.utils.events import EventStorage

    cfg = tiny_config(
        TINY_C4,
        tmp_path / "out",
        "BISSL.HYPERGRAD.DAMPING", str(DAMPING),
        "BISSL.HYPERGRAD.MAX_ITER", str(CG_ITERATIONS), "BISSL.HYPERGRAD.EIGEN_STEPS", "0",
        "BISSL.HYPERGRAD.ON_NEGATIVE_CURVATURE", "continue",
    )  # fmt: skip
    torch.manual_seed(0)
    trainer = BilevelTrainer(cfg)
    trainer.model.copy_lower_backbone_to_upper()
    views = next(iter(build_pretext_loader(cfg, cfg.BISSL.LOWER.IMS_PER_BATCH)))
    pretext = pretext_batch_to_device(cfg, views, torch.device("cpu"))  # the model's inputs
    downstream = next(iter(build_downstream_train_loader(cfg, cfg.BISSL.UPPER.IMS_PER_BATCH)))
    trainer._pretext_iter = itertools.repeat(pretext)
    trainer._downstream_iter = itertools.repeat(downstream)
    trainer.iter = 0

    def reference_hvp() -> RecomputingHessianVectorProduct:
        lower = trainer.model.lower

        def closure() -> torch.Tensor:
            buffers = {name: b.clone() for name, b in lower.named_buffers()}
            return functional_call(lower, buffers, pretext, strict=False)

        return RecomputingHessianVectorProduct(closure, trainer.model.backbone_pairs.lower)

    # The detector logs to an event storage during its forward.
    with EventStorage(0) as trainer.storage:
        yield trainer, pretext, downstream, reference_hvp


def _g(trainer, downstream) -> tuple[torch.Tensor, ...]:
    """grad_theta L_D(theta, phi_d), as the upper step computes it."""
    model, lower = trainer.model, trainer.model.backbone_pairs.lower
    torch.manual_seed(1)  # proposal sampling
    loss = sum(model.downstream_losses(downstream, with_lower_backbone=True).values())
    grads = torch.autograd.grad(loss, lower, allow_unused=True)
    return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(lower, grads, strict=True))


def _solve(trainer, hvp, g):
    bissl = trainer.cfg.BISSL
    x, info = implicit_gradient(
        hvp, g, lam=bissl.LAMBDA, damping=DAMPING, max_iter=CG_ITERATIONS, tol=0.0,
        on_negative_curvature="continue",
    )  # fmt: skip
    assert info.iterations == CG_ITERATIONS
    return x


def test_retained_graph_equals_recomputing_and_functional(setup):
    trainer, pretext, downstream, reference_hvp = setup
    lower = trainer.model.lower
    buffers_before = [b.clone() for b in lower.buffers()]
    g = _g(trainer, downstream)

    system = trainer.stage_system()
    x_fast = _solve(trainer, system.curvature.matvec, g)
    system.release()
    x_ref = _solve(trainer, reference_hvp(), g)

    # H must matter, else equality below proves nothing.
    assert _rel_diff(x_fast, g) > 0.1
    assert _rel_diff(x_fast, x_ref) < 1e-5
    # The products leave the lower model's BN statistics alone.
    for before, after in zip(buffers_before, lower.buffers(), strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=0)

    # torch.func forward-over-reverse: training-mode BN normalises with batch statistics, as in
    # stage_system; running statistics are switched off because torch.func cannot update them.
    names = {id(p): n for n, p in lower.named_parameters()}
    params = {names[id(p)]: p for p in trainer.model.backbone_pairs.lower}
    with batch_statistics_only(lower):
        x_func = _solve(
            trainer, lambda v: functional_hvp(lower, lambda loss: loss, params, v, args=pretext), g
        )
    # A different float32 algorithm, and CG on I + H / 0.051 amplifies rounding: looser.
    assert _rel_diff(x_func, x_fast) < 1e-3


def test_upper_step_fast_equals_reference(setup):
    """A whole upper step (phi update) is the same with either Hessian-vector product."""
    trainer, _, _, reference_hvp = setup
    state = copy.deepcopy(
        (
            trainer.model.state_dict(),
            trainer.upper_optimizer.state_dict(),
            trainer.upper_scheduler.state_dict(),
        )
    )
    phi = trainer.model.backbone_pairs.upper
    before = [p.detach().clone() for p in phi]

    def step(make_system) -> tuple[list[torch.Tensor], dict]:
        model_state, opt_state, sched_state = copy.deepcopy(state)
        trainer.model.load_state_dict(model_state)
        trainer.upper_optimizer.load_state_dict(opt_state)
        trainer.upper_scheduler.load_state_dict(sched_state)
        # Built after the restore: loading copies into theta in place, which would invalidate
        # a first-order graph built before.
        system = make_system()
        torch.manual_seed(1)
        stats = trainer.upper_step(system, 0)
        system.release()
        return [p.detach().clone() for p in phi], stats

    def reference_system():
        # The trainer's own mapping of BISSL.HYPERGRAD, with the reference code's products.
        return trainer.hypergrad.build_system(ProductCurvature(reference_hvp()))

    fast, fast_stats = step(trainer.stage_system)
    ref, ref_stats = step(reference_system)

    moved = [a - b for a, b in zip(fast, before, strict=True)]
    assert tuple_norm(tuple(moved)).item() > 0
    ref_moved = tuple(a - b for a, b in zip(ref, before, strict=True))
    assert _rel_diff(tuple(moved), ref_moved) < 1e-4
    assert fast_stats["hypergrad_iterations"] == ref_stats["hypergrad_iterations"] == CG_ITERATIONS
    assert fast_stats["hypergrad_cosine"] == pytest.approx(ref_stats["hypergrad_cosine"], abs=1e-5)
