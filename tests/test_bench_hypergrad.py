"""Smoke tests of benchmarks/bench_hypergrad.py and benchmarks/gpu_check.py (tiny sizes)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import bench_hypergrad as bh
from benchmarks import gpu_check

import pytest
import torch

TINY = ["authors (recomputing+layerwise_cg5)", "hessian+cg5", "ggn+lanczos5",
        "fisher+woodbury20", "first_order"]  # fmt: skip


def run_tiny(demo_workdir: Path, out: Path, device: str = "cpu") -> dict:
    bh.main([
        "--quick", "--device", device, "--data-root", str(demo_workdir), "--out", str(out),
        "--models", "det", "--estimators", ",".join(TINY), "--stage-estimators", "hessian+cg5",
        "--train-iters", "3", "--warmup-iters", "1", "--num-rhs", "2", "--reference-iters", "4",
        "--eig-steps", "3", "--stage-steps", "1x1", "--plain-repeats", "1",
    ])  # fmt: skip
    return json.loads(out.read_text())


@pytest.mark.slow
def test_tiny_benchmark_figures_are_consistent(demo_workdir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # main() changes the working directory
    results = run_tiny(demo_workdir, tmp_path / "hg.json")
    table = results["estimators"]
    assert set(table) == set(TINY)
    authors, fisher, first = table[TINY[0]], table["fisher+woodbury20"], table["first_order"]
    # 2 right-hand sides x 5 iterations, each product recomputing the forward.
    assert authors["products_per_stage"] == 10
    assert table["hessian+cg5"]["products_per_stage"] == 10
    assert table["ggn+lanczos5"]["products_per_stage"] == 5  # one basis for both g's
    assert fisher["products_per_stage"] == first["products_per_stage"] == 0
    # Woodbury is exact: CG on the same (small-rank) Fisher system must agree with it.
    assert fisher["cos_to_converged"] == pytest.approx(1.0, abs=1e-4)
    ggn_eigs = results["models"]["det"]["eigenvalues"]["ggn"]
    assert ggn_eigs["min"] >= -1e-3 * abs(ggn_eigs["max"])  # PSD up to rounding
    stage = results["models"]["det"]["stages"]["hessian+cg5 @ 1x1"]
    assert stage["stage_over_plain_steps"] > 1.0  # a bilevel stage costs more than plain steps


def test_peak_memory_sees_an_allocation():
    memory = bh.PeakMemory(torch.device("cpu"))
    out: dict = {}
    with memory.measure(out):
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    if out["peak_bytes"] is None:
        pytest.skip("/proc/self/clear_refs not writable here")
    assert out["peak_bytes"] >= 60 * 2**20


def test_gpu_check_dry_run(demo_workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    summary = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--summary", str(summary), "--data-root", str(demo_workdir)]) == 0
    printed = capsys.readouterr().out
    assert "DRY RUN" in printed
    plan = json.loads(summary.read_text())
    assert plan["dry_run"] is True
    assert set(plan["plan"]) == {"tests", "data", "stage", "bench_bilevel", "bench_hypergrad"}
    for name in ("bench_bilevel", "bench_hypergrad"):
        assert "cuda" in plan["plan"][name]
    assert len(plan["tiny_stage"]["stage_s"]) == 2
    # The summary's figures come from the tiny CPU stage: ratio, planner, TF32 check.
    lines = "\n".join(plan["summary"])
    assert "stage / (N_L P + N_U D)" in lines and "planner" in lines and "TF32 check" in lines
    assert "TF32 check" in printed
    # Each timeout leaves room for the others within the budget.
    assert sum(gpu_check.TIMEOUTS_S.values()) <= gpu_check.BUDGET_S + 10


def test_gpu_check_rejects_unknown_step():
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--steps", "tests,nonsense"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_benchmark_on_cuda(demo_workdir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = run_tiny(demo_workdir, tmp_path / "hg_cuda.json", device="cuda")
    assert results["models"]["det"]["memory_method"].startswith("cuda")
    assert results["estimators"]["fisher+woodbury20"]["cos_to_converged"] == pytest.approx(
        1.0, abs=1e-4
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_curvature_products_agree_on_cpu_and_cuda(kind):
    from bissl_det.bilevel import pretext_curvature, tuple_norm
    from bissl_det.modeling.pretext import SimCLR

    torch.manual_seed(0)
    encoder = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
    )  # fmt: skip
    model = SimCLR(encoder, feat_dim=8, projector_dims=(8, 16, 8), gather=False).double()
    views = torch.randn(2, 6, 3, 12, 12, dtype=torch.float64)
    products = {}
    for device in ("cpu", "cuda"):
        model.to(device)
        params = tuple(p for p in encoder.parameters())
        v = tuple(torch.ones_like(p) for p in params)
        curvature = pretext_curvature(kind, model, tuple(x.to(device) for x in views), params)
        products[device] = tuple(t.cpu() for t in curvature.matvec(v))
        curvature.release()
    diff = tuple(a - b for a, b in zip(products["cpu"], products["cuda"], strict=True))
    assert tuple_norm(diff) <= 1e-8 * tuple_norm(products["cpu"])
