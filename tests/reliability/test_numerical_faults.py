"""A NaN anywhere in a BiSSL stage stops training loudly, after a diagnostic checkpoint.

Each fault is injected into the real tiny R50-C4 trainer: the pretext loss (lower level), the
downstream loss on phi or on theta (upper level), and the Hessian-vector products that the
conjugate-gradient solver of the implicit gradient uses.
"""

from __future__ import annotations

import math
from pathlib import Path

from tests.helpers import TINY_C4, tiny_config

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

NAN = float("nan")


def _trainer(output_dir: Path, stages: int = 3):
    from bissl_det.engine import BilevelTrainer

    cfg = tiny_config(
        TINY_C4,
        output_dir,
        "BISSL.STAGES", str(stages),
        "BISSL.HEAD_WARMUP.ITERS", "0",
        "DATASETS.TEST", "()",
        "SEED", "0",
    )  # fmt: skip
    trainer = BilevelTrainer(cfg)
    trainer.resume_or_load(resume=False)
    return trainer


def _fail_on_call(fn, call: int, poison=lambda out: out * NAN):
    """``fn`` whose ``call``-th invocation (1-based) returns a poisoned result."""
    count = {"n": 0}

    def wrapped(*args, **kwargs):
        count["n"] += 1
        out = fn(*args, **kwargs)
        return poison(out) if count["n"] == call else out

    return wrapped


def _check_diagnostic(trainer, stage: int) -> None:
    path = Path(trainer.cfg.OUTPUT_DIR) / f"model_nonfinite_stage{stage:07d}.pth"
    assert path.is_file(), "no diagnostic checkpoint was written"
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["iteration"] == stage
    # The fault is caught before an optimiser step: the saved weights are finite, never cleaned.
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    live = trainer.model.state_dict()
    assert all(torch.equal(v, live[k]) for k, v in state["model"].items())
    for key in ("lower_optimizer", "upper_optimizer", "progress"):
        assert key in state


def test_nonfinite_pretext_loss_stops_at_the_lower_level(in_demo_workdir, tmp_path):
    trainer = _trainer(tmp_path / "out")
    # Two lower steps per stage: the 4th pretext loss is stage 1, step 1.
    trainer.model.pretext_loss = _fail_on_call(trainer.model.pretext_loss, call=4)
    with pytest.raises(FloatingPointError) as err:
        trainer.train()
    assert str(err.value).startswith(
        "non-finite pretext loss (nan) at the lower level, stage 1, step 1; diagnostic checkpoint"
    )
    _check_diagnostic(trainer, stage=1)


@pytest.mark.parametrize(
    ("on_theta", "what"), [(False, "downstream loss on phi"), (True, "downstream loss on theta")]
)
def test_nonfinite_downstream_loss_stops_at_the_upper_level(
    in_demo_workdir, tmp_path, on_theta, what
):
    trainer = _trainer(tmp_path / "out")
    losses = trainer.model.downstream_losses

    def poisoned_view(batch, with_lower_backbone=False):
        return losses(batch, with_lower_backbone=with_lower_backbone)

    # Two upper steps per stage, one call per view and step: the 2nd call of the view is step 1.
    poisoned_view = _fail_on_call(
        poisoned_view, call=2, poison=lambda d: {k: v * NAN for k, v in d.items()}
    )

    def downstream_losses(batch, with_lower_backbone=False):
        view = poisoned_view if with_lower_backbone == on_theta else losses
        return view(batch, with_lower_backbone=with_lower_backbone)

    trainer.model.downstream_losses = downstream_losses
    with pytest.raises(FloatingPointError) as err:
        trainer.train()
    assert str(err.value).startswith(f"non-finite {what} (nan) at the upper level, stage 0, step 1")
    _check_diagnostic(trainer, stage=0)


def test_nonfinite_cg_residual_stops_at_the_upper_level(in_demo_workdir, tmp_path):
    trainer = _trainer(tmp_path / "out")
    stage_system = trainer.stage_system

    def overflowing_system():
        """The stage's real system, its curvature products overflowing from stage 1 on."""
        system = stage_system()
        if trainer.iter >= 1:
            real = system.curvature.matvec
            system.curvature.matvec = lambda v: tuple(t * math.inf for t in real(v))
        return system

    trainer.stage_system = overflowing_system
    with pytest.raises(FloatingPointError) as err:
        trainer.train()
    message = str(err.value)
    assert message.startswith("implicit gradient solver: ")
    assert "at the upper level, stage 1, step 0" in message
    assert "nan" in message or "inf" in message
    _check_diagnostic(trainer, stage=1)


def test_fault_in_the_last_stage_leaves_no_final_result(in_demo_workdir, tmp_path):
    """A failed run must not look finished: no model_final.pth and no exported lower backbone."""
    trainer = _trainer(tmp_path / "out", stages=2)
    trainer.model.pretext_loss = _fail_on_call(trainer.model.pretext_loss, call=3)
    with pytest.raises(FloatingPointError, match="lower level, stage 1, step 0"):
        trainer.train()
    _check_diagnostic(trainer, stage=1)
    out = Path(trainer.cfg.OUTPUT_DIR)
    assert not (out / "model_final.pth").exists()
    assert not (out / "lower_backbone.pth").exists(), "a failed run exported its lower backbone"
