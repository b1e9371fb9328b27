"""``make gpu-check``: what only a GPU can check, in under 8 minutes on one H100-class device.

Steps (each a subprocess with its own timeout; a failing step does not stop the others, but makes
the exit status non-zero; ``benchmarks/results/gpu_check.json`` is rewritten after every step):

1. ``tests``: the tests that use CUDA (pytest marker ``gpu``);
2. ``data``: ``python -m benchmarks.bench_data --quick --threads 1``: the pretext loader's
   images/s per core at 96 and 224 px on this machine's CPU, and the workers per GPU it needs;
3. ``stage``: one full-size R50-C4 BiSSL stage (full-width ResNet-50, SimCLR, pretext batch 256 at
   96 px, detection batch 2 at 800 px, N_L = 20, N_U = 8, the default estimator), twice; then a
   plain pretext step (P) and a plain downstream step (D): stage / (N_L P + N_U D); the memory
   planner's estimate next to ``torch.cuda.max_memory_allocated``; the TF32 check (one curvature
   product with TF32 on and off: relative difference and time);
4. ``bench_bilevel``: ``python -m benchmarks.bench_bilevel --device cuda`` at GPU sizes,
   detection only;
5. ``bench_hypergrad``: ``python -m benchmarks.bench_hypergrad --device cuda --quick``, detection
   only (the full preset took 2,888 s on the CPU: it is a CPU benchmark).

Sizing: each timeout is about twice the step's expected time on one H100 (estimated from the
number of passes and products at these sizes; no GPU run has confirmed it yet: each step's
seconds are written to ``gpu_check.json``, compare them with the timeouts after the first run).

At the end a summary prints the loader's images/s, the stage / plain-step ratio, peak memory
against the planner and the TF32 check. Without CUDA (or with ``--dry-run``) nothing heavy runs:
the plan is printed, the stage step runs at a tiny size on the CPU (so its code cannot rot), the
summary is printed from it, and the exit status is 0 if that worked.

Usage::

    python -m benchmarks.gpu_check [--dry-run] [--steps tests,data,stage,bench_bilevel,...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BUDGET_S = 470  # all steps together: under 8 minutes with start-up
# About twice each step's expected time on one H100 (module docstring).
TIMEOUTS_S = {"tests": 60, "data": 40, "stage": 150, "bench_bilevel": 110, "bench_hypergrad": 110}
FULL_STAGE = {
    "pretext_batch": 256,
    "crop_size": 96,
    "det_batch": 2,
    "image_size": 800,
    "rois_per_image": 512,
    "lower_steps": 20,
    "upper_steps": 8,
}
TINY_STAGE = {
    "pretext_batch": 8,
    "crop_size": 32,
    "det_batch": 2,
    "image_size": 64,
    "rois_per_image": 16,
    "lower_steps": 2,
    "upper_steps": 2,
}


def step_commands(python: str) -> dict[str, list[str]]:
    """The command line of every step on a CUDA machine."""
    return {
        "tests": [python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"],
        "data": [
            python,
            *["-m", "benchmarks.bench_data"],
            "--quick",
            "--threads",
            "1",
            "--device",
            "cuda",
            "--out",
            str(RESULTS / "gpu_check_data.json"),
        ],
        "stage": [
            python,
            *["-m", "benchmarks.gpu_check"],
            "--run-stage",
            "cuda",
            "--stage-out",
            str(RESULTS / "gpu_stage_cuda.json"),
        ],
        "bench_bilevel": [
            python,
            *["-m", "benchmarks.bench_bilevel"],
            "--device",
            "cuda",
            "--image-size",
            "512",
            "--crop-size",
            "96",
            "--pretext-batch",
            "256",
            "--det-batch",
            "8",
            "--cls-batch",
            "64",
            "--rois-per-image",
            "128",
            "--models",
            "det",
            "--repeats",
            "2",
            "--skip-options",
            "--skip-floor",  # the stage step measures the stage against plain steps
            "--out",
            str(RESULTS / "gpu_r50.json"),
        ],
        "bench_hypergrad": [
            python,
            *["-m", "benchmarks.bench_hypergrad"],
            "--device",
            "cuda",
            "--quick",
            "--models",
            "det",
            "--out",
            str(RESULTS / "hypergrad_quick_cuda.json"),
        ],
    }


# ---- Step 2: one full-size stage (run in its own process) -------------------------------------


def run_stage(device: str, out: Path, tiny: bool, data_root: str = "") -> dict:
    """Build the R50-C4 BiSSL trainer at full (or tiny) size and time two stages."""
    from bissl_det.config.defaults import add_bissl_config
    from bissl_det.data.build import build_downstream_train_loader, build_pretext_loader
    from bissl_det.engine.memory_plan import plan_stage_memory
    from bissl_det.engine.trainer import BilevelTrainer

    import torch
    from detectron2.config import get_cfg
    from detectron2.utils.events import EventStorage

    from . import bench_bilevel as bb
    from . import bench_hypergrad as bh
    from .harness import demo_workdir, synchronize

    sizes = TINY_STAGE if tiny else FULL_STAGE
    os.chdir(demo_workdir(bh.PRESETS["quick" if tiny else "full"]["data"], data_root))
    args = argparse.Namespace(device=device, quick=tiny, cls_batch=8, cls_image_size=64, **sizes)
    result: dict = {"sizes": sizes, "device": device, "tiny": tiny}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = bb.build_cfg("det", args, tmp)
        cfg.defrost()
        # The project's default estimator and its diagnostics (bench_bilevel turns them off).
        cfg.BISSL.HYPERGRAD = add_bissl_config(get_cfg()).BISSL.HYPERGRAD
        if not tiny:  # the standard C4 RPN, not the demo's small one
            cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN, cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 12000, 2000
            cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 256
            cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32, 64, 128, 256, 512]]
            cfg.BISSL.PRETEXT_DATA.NUM_WORKERS = 8
            cfg.DATALOADER.NUM_WORKERS = 2
        cfg.freeze()
        torch.manual_seed(0)
        trainer = BilevelTrainer(cfg)
        trainer.model.copy_lower_backbone_to_upper()
        trainer.model.train()
        trainer._pretext_iter = iter(build_pretext_loader(cfg, sizes["pretext_batch"], 0, 0))
        trainer._downstream_iter = iter(
            build_downstream_train_loader(cfg, sizes["det_batch"], 0, 1)
        )
        dev = torch.device(device)
        plan = plan_stage_memory(cfg, trainer.model)
        result["plan_peak_gib"] = plan.peak_bytes / 2**30
        result["plan_parts_gib"] = {k: v / 2**30 for k, v in plan.parts.items()}
        seconds = []
        with EventStorage(0) as trainer.storage:
            for _ in range(2):
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                synchronize(dev)
                start = time.perf_counter()
                trainer.run_step()
                synchronize(dev)
                seconds.append(time.perf_counter() - start)
            latest = {k: v[0] for k, v in trainer.storage.latest().items()}
            if dev.type == "cuda":
                result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                result["gpu"] = torch.cuda.get_device_name(dev)
            result["plain_s"] = plain_steps(trainer, dev, synchronize)
            result["tf32_check"] = tf32_check(trainer, dev, synchronize)
        result["stage_s"] = seconds
        result["metrics"] = latest
        n_l, n_u = sizes["lower_steps"], sizes["upper_steps"]
        plain = n_l * result["plain_s"]["pretext"] + n_u * result["plain_s"]["downstream"]
        result["stage_over_plain_steps"] = seconds[-1] / plain
    bad = {k: v for k, v in latest.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise FloatingPointError(f"stage metrics not finite: {bad}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps(result, default=str))
    return result


def _timed(fn, dev, synchronize, repeats: int = 3) -> float:
    """Median seconds of ``fn`` after one warm-up call."""
    times = []
    for _ in range(repeats + 1):
        synchronize(dev)
        start = time.perf_counter()
        fn()
        synchronize(dev)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def plain_steps(trainer, dev, synchronize) -> dict:
    """Seconds of a plain pretext step (P: batch, forward, backward, LARS) and of a plain
    downstream step (D: batch, forward, backward, SGD): the floor of a stage is N_L P + N_U D."""
    model = trainer.model

    def pretext() -> None:
        trainer.lower_optimizer.zero_grad(set_to_none=True)
        model.pretext_loss(*trainer.next_pretext_batch()).backward()
        trainer.lower_optimizer.step()

    def downstream() -> None:
        trainer.upper_optimizer.zero_grad(set_to_none=True)
        sum(model.downstream_losses(trainer.next_downstream_batch()).values()).backward()
        trainer.upper_optimizer.step()

    return {
        "pretext": _timed(pretext, dev, synchronize),
        "downstream": _timed(downstream, dev, synchronize),
    }


def tf32_check(trainer, dev, synchronize) -> dict:
    """One curvature product with TF32 allowed and forbidden (BISSL.HYPERGRAD.ALLOW_TF32): the
    relative difference, the float32 repeat's (non-determinism) and the time ratio. On a CPU
    TF32 does not exist: both differences are rounding noise."""
    from bissl_det.bilevel import tuple_norm
    from bissl_det.utils.precision import tf32

    import torch

    with tf32(False):
        system = trainer.stage_system()
    try:
        generator = torch.Generator().manual_seed(0)
        v = tuple(torch.randn(p.shape, generator=generator).to(p) for p in system.curvature.params)
        products, seconds = {}, {}
        for name, allowed in (("fp32", False), ("fp32_again", False), ("tf32", True)):
            with tf32(allowed):
                seconds[name] = _timed(lambda: system.curvature.matvec(v), dev, synchronize, 1)
                products[name] = system.curvature.matvec(v)
    finally:
        system.release()
    norm = tuple_norm(products["fp32"]).item()

    def rel(name: str) -> float:
        diff = torch._foreach_sub(products[name], products["fp32"])
        return tuple_norm(tuple(diff)).item() / norm

    return {
        "tf32_rel_diff": rel("tf32"),
        "fp32_repeat_rel_diff": rel("fp32_again"),
        "tf32_over_fp32_time": seconds["tf32"] / seconds["fp32"],
        "product_s": seconds,
    }


def summary_lines(data: dict | None, stage: dict | None) -> list[str]:
    """The figures a GPU run is for, one line each."""
    lines = []
    if data:
        for crop, rate in data["images_per_s_per_core"].items():
            lines.append(
                f"loader {crop} px: {rate['new']:.0f} images/s per core "
                f"({data['speedup_per_core'][crop]:.2f}x the previous pipeline); workers per GPU "
                f"for 256 images/step: {data['workers_per_gpu'][crop]}"
            )
            device_side = data.get("device_side_ms_per_image", {}).get(crop, {})
            if device_side:
                costs = ", ".join(f"{k} {v:.3f} ms" for k, v in device_side.items())
                lines.append(f"loader {crop} px: batched augmentation per image: {costs}")
    if stage:
        lines.append(
            f"stage: {stage['stage_s'][-1]:.2f} s; stage / (N_L P + N_U D) = "
            f"{stage['stage_over_plain_steps']:.2f} (P {stage['plain_s']['pretext']:.3f} s, "
            f"D {stage['plain_s']['downstream']:.3f} s)"
        )
        peak = stage.get("peak_memory_gib")
        measured = f"{peak:.2f} GiB measured (max_memory_allocated)" if peak else "not measured"
        lines.append(f"memory: {measured}; planner {stage['plan_peak_gib']:.2f} GiB")
        t = stage["tf32_check"]
        lines.append(
            f"TF32 check: product with TF32 differs by {t['tf32_rel_diff']:.1e} (relative; fp32 "
            f"repeat {t['fp32_repeat_rel_diff']:.1e}); TF32 / fp32 time "
            f"{t['tf32_over_fp32_time']:.2f}"
        )
    return lines


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---- The driver --------------------------------------------------------------------------------


def run_steps(steps: list[str], summary_path: Path) -> int:
    commands = step_commands(sys.executable)
    summary: dict = {
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "budget_s": BUDGET_S,
        "steps": {},
    }
    start = time.perf_counter()
    logs = RESULTS / "gpu_check_logs"
    logs.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in steps:
        left = BUDGET_S - (time.perf_counter() - start)
        timeout = max(10, min(TIMEOUTS_S[name], left))
        print(f"== {name} (timeout {timeout:.0f} s): {' '.join(commands[name])}", flush=True)
        t0 = time.perf_counter()
        log = logs / f"{name}.log"
        with log.open("w") as handle:
            try:
                rc = subprocess.run(
                    commands[name],
                    cwd=REPO,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                ).returncode
                status = "ok" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                rc, status = None, "timeout"
        tail = log.read_text(errors="replace").splitlines()[-15:]
        summary["steps"][name] = {
            "command": commands[name],
            "status": status,
            "returncode": rc,
            "seconds": round(time.perf_counter() - t0, 1),
            "log": str(log),
            "tail": tail,
        }
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"   {status} in {summary['steps'][name]['seconds']} s (log {log})", flush=True)
        if status != "ok":
            failed.append(name)
    summary["failed"] = failed
    lines = summary_lines(
        _read(RESULTS / "gpu_check_data.json") if "data" in steps else None,
        _read(RESULTS / "gpu_stage_cuda.json") if "stage" in steps else None,
    )
    summary["summary"] = lines
    print("\n".join(lines))
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    print("gpu-check:", "all steps passed" if not failed else f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


def dry_run(steps: list[str], summary_path: Path, data_root: str = "") -> int:
    """Print the plan; run the stage step at a tiny size on the CPU."""
    commands = step_commands(sys.executable)
    print(f"gpu-check DRY RUN (no CUDA device): would run, with a budget of {BUDGET_S} s in all:")
    for name in steps:
        print(f"  {name} (timeout {TIMEOUTS_S[name]} s): {' '.join(commands[name])}")
    summary: dict = {"dry_run": True, "plan": {n: commands[n] for n in steps}}
    if "stage" in steps:
        print("running the stage step at a tiny size on the CPU ...", flush=True)
        t0 = time.perf_counter()
        tiny_out = summary_path.with_name(summary_path.stem + "_tiny_stage_cpu.json")
        tiny = run_stage("cpu", tiny_out, tiny=True, data_root=data_root)
        summary["tiny_stage"] = {"seconds": time.perf_counter() - t0, "stage_s": tiny["stage_s"]}
        summary["summary"] = summary_lines(None, tiny)
        print("\n".join(summary["summary"]))
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"gpu-check dry run done; wrote {summary_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing heavy")
    p.add_argument("--steps", default=",".join(TIMEOUTS_S), help="comma-separated step names")
    p.add_argument("--summary", default=str(RESULTS / "gpu_check.json"))
    p.add_argument("--data-root", default="", help="folder with datasets/demo (default: made)")
    p.add_argument("--run-stage", default="", choices=("", "cpu", "cuda"), help=argparse.SUPPRESS)
    p.add_argument("--stage-out", default="", help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_stage:
        out = Path(args.stage_out or RESULTS / f"gpu_stage_{args.run_stage}.json")
        run_stage(args.run_stage, out, args.tiny, args.data_root)
        return 0
    steps = args.steps.split(",")
    unknown = set(steps) - set(TIMEOUTS_S)
    if unknown:
        p.error(f"--steps: unknown {sorted(unknown)}; valid: {list(TIMEOUTS_S)}")
    import torch

    if args.dry_run or not torch.cuda.is_available():
        return dry_run(steps, Path(args.summary), args.data_root)
    return run_steps(steps, Path(args.summary))


if __name__ == "__main__":
    sys.exit(main())
