"""The stage memory planner against the measured peak of a real stage on CPU.

"Measured" is the peak of the CPU allocator's live bytes during one real stage
(``BilevelTrainer.run_step``: lower steps, curvature build, upper steps with their solves), read
from torch.profiler's allocation trace (``profile_memory=True``; every allocation and free in
time order), plus the parameters and buffers alive before it. The planner saw only two small
probe batches and the config. The gap is the backward passes' transient buffers, which the
saved-tensor accounting leaves out (about 20 % on both configs).
"""

from __future__ import annotations

import itertools

from bissl_det.engine.memory_plan import (
    _downstream_batch,
    _pretext_batch,
    check_stage_memory,
    plan_stage_memory,
)
from bissl_det.engine.trainer import BilevelTrainer
from tests.helpers import NARROW_RESNET, TINY_C4, TINY_CLS, tiny_config

import pytest
import torch
from detectron2.utils.events import EventStorage
from torch.profiler import ProfilerActivity, profile

STAGE = [
    "BISSL.LOWER_STEPS",
    "2",
    "BISSL.UPPER_STEPS",
    "2",
    "BISSL.PRETEXT_DATA.AUG.CROP_SIZE",
    "64",
]
CASES = {
    "C4_cg": (TINY_C4, ["BISSL.LOWER.IMS_PER_BATCH", "32", "BISSL.UPPER.IMS_PER_BATCH", "2"]),
    "cls_lanczos": (
        TINY_CLS,
        [*NARROW_RESNET, "BISSL.LOWER.IMS_PER_BATCH", "16", "BISSL.UPPER.IMS_PER_BATCH", "8",
         "CLS.IMAGE_SIZE", "64", "BISSL.HYPERGRAD.SOLVER", "lanczos"],
    ),
}  # fmt: skip


def measured_stage_peak(trainer: BilevelTrainer) -> int:
    cfg, device = trainer.cfg, trainer.device
    pretext = _pretext_batch(cfg, cfg.BISSL.LOWER.IMS_PER_BATCH, device)
    downstream = _downstream_batch(cfg, cfg.BISSL.UPPER.IMS_PER_BATCH, device)
    trainer._pretext_iter = itertools.repeat(pretext)
    trainer._downstream_iter = itertools.repeat(downstream)
    trainer.iter = 0
    with (
        EventStorage(0) as trainer.storage,
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        trainer.run_step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    model = trainer.model
    static = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return static + peak


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_within_25_percent_of_the_measured_stage_peak(in_demo_workdir, tmp_path, case):
    config, opts = CASES[case]
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = tiny_config(config, tmp_path, "MODEL.DEVICE", "cpu", *STAGE, *opts)
    trainer = BilevelTrainer(cfg)
    trainer.model.train()
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    rng = torch.get_rng_state()
    plan = plan_stage_memory(cfg, trainer.model)
    assert torch.equal(torch.get_rng_state(), rng)  # a resumed run's random stream is untouched
    after = trainer.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in state.items())  # BN statistics too
    assert plan.parts["curvature_graph"] > plan.parts["downstream_graph"] > 0
    measured = measured_stage_peak(trainer)
    assert abs(plan.peak_bytes - measured) <= 0.25 * measured, (plan.peak_bytes, measured)
    # A device of twice the plan fits; one of half refuses and names a smaller batch.
    assert check_stage_memory(plan, 3 * plan.peak_bytes, refuse=True).endswith("fits")
    with pytest.raises(MemoryError, match=r"largest pretext batch per process that fits is \d+"):
        check_stage_memory(plan, plan.peak_bytes // 2, refuse=True)
    assert plan.largest_curvature_batch(0.5 * plan.peak_bytes) < plan.batches["curvature"]


def test_plan_memory_tool_writes_peak_and_parts(tmp_path) -> None:
    import json

    from tools.plan_memory import main

    out = tmp_path / "plan.json"
    assert main(["--config-file", str(TINY_C4), "--out", str(out), "MODEL.DEVICE", "cpu"]) == 0
    record = json.loads(out.read_text())
    parts = record["parts"]
    upper = parts["curvature_graph"] + parts["downstream_graph"] + parts["solver_vectors"]
    assert record["peak_bytes"] == parts["static"] + max(parts["lower_graph"], upper) > 0
    # A half curvature batch halves its graph's images; a bf16 graph saves bf16 activations.
    variants = (
        (["BISSL.HYPERGRAD.IMS_PER_BATCH", "4"], 0.6),
        (["BISSL.HYPERGRAD.GRAPH_DTYPE", "bfloat16"], 0.75),
    )
    for opts, smaller in variants:
        other = tmp_path / "other.json"
        argv = ["--config-file", str(TINY_C4), "--out", str(other), "MODEL.DEVICE", "cpu", *opts]
        assert main(argv) == 0
        graph = json.loads(other.read_text())["parts"]["curvature_graph"]
        assert graph < smaller * parts["curvature_graph"], (opts, graph, parts["curvature_graph"])


def test_startup_check_validates_its_key_and_skips_cpu(tmp_path) -> None:
    from types import SimpleNamespace

    from tools.train_bissl import check_memory

    from detectron2.config import CfgNode

    cpu = SimpleNamespace(device=torch.device("cpu"))
    cfg = CfgNode({"BISSL": CfgNode({"MEMORY_PLAN": "refuse"})})
    assert check_memory(cfg, cpu) is None  # no CUDA device: nothing to compare with
    cfg.BISSL.MEMORY_PLAN = "maybe"
    with pytest.raises(ValueError, match="BISSL.MEMORY_PLAN = 'maybe'"):
        check_memory(cfg, cpu)
