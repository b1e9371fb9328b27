"""What every benchmark shares: the machine it ran on, timing, demo data and the JSON it writes.

Benchmarks are modules of the ``benchmarks`` package, run from the repository root as
``python -m benchmarks.<name>``; they import each other and this module as a package, with no
edits of ``sys.path``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bissl_det.checkpoint.io import atomic_write_text
from bissl_det.data.demo import INFO_FILE, make_demo_data
from bissl_det.utils.provenance import git_state, utc_now

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
# CPU: this process's CPU time (with one thread, the work done; immune to the preemption that
# other jobs on a shared machine cause, which made wall times 2-3x noisier here); CUDA: wall.
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
RESULTS = REPO / "benchmarks" / "results"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings of CUDA calls measure nothing otherwise)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object],
    device: torch.device,
    repeats: int,
    warmup: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict:
    """Median time of ``fn`` (seconds of ``clock``, wall by default) over ``repeats`` runs after
    ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = clock()
        fn()
        synchronize(device)
        times.append(clock() - start)
    return {"median_s": statistics.median(times), "times_s": [round(t, 4) for t in times]}


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators run inside it, views excluded: on a GPU each is about one
    kernel launch (a ``_foreach_*`` op is one launch per chunk of tensors, counted once here).

    Attributes:
        ops: Operators counted.
        by_name: The count per operator name (``aten.dot.default``, ...).
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.by_name: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _launches(func, args):
            self.ops += 1
            self.by_name[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _launches(func, args) -> bool:
    """Views and detach launch nothing, nor do operators on dtypes alone (promote_types)."""
    if func.is_view:
        return False
    if any("Tensor" in str(r.type) for r in func._schema.returns):
        return True
    return any(
        isinstance(a, torch.Tensor)
        or (isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in a))
        for a in args
    )


def ratio(a: dict, b: dict) -> float:
    """``a / b`` of two :func:`measure` results (medians)."""
    return a["median_s"] / b["median_s"]


def cpu_has_bf16() -> bool:
    """Whether the CPU has native bfloat16 instructions (else bf16 is emulated and slow)."""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
        return any(f in flags for f in ("avx512_bf16", "amx_bf16"))
    return False


def machine_info(device: torch.device) -> dict:
    """CPU model and count, threads, versions, and the GPU when ``device`` is CUDA."""
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16": cpu_has_bf16(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def provenance(device: torch.device) -> dict:
    """Where a result comes from: the checkout (commit, dirty files), machine, command, time."""
    return {
        "git": git_state(REPO),
        "machine": machine_info(device),
        "argv": sys.argv,
        "utc": utc_now(),
        "load_average": os.getloadavg(),
    }


def write_json(path: str | os.PathLike, results: dict, device: torch.device) -> dict:
    """Write ``results`` plus ``"provenance"`` atomically as JSON to ``path``; return it."""
    if "provenance" in results:
        raise ValueError("results already hold a 'provenance' key")
    record = {**results, "provenance": provenance(device)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(record, indent=1, default=str) + "\n", path)
    return record


def demo_workdir(sizes: dict, data_root: str = "") -> Path:
    """A folder holding ``datasets/demo``: ``data_root`` as given, or one made once per size.

    The quick configs name their data relative to the working directory, so a benchmark
    ``chdir``s into this folder.
    """
    if data_root:
        root = Path(data_root).resolve()
        if not (root / "datasets" / "demo").is_dir():
            raise FileNotFoundError(f"--data-root {root}: no datasets/demo inside")
        return root
    root = REPO / "output" / "bench_data" / "_".join(f"{v}" for v in sizes.values())
    if not (root / "datasets" / "demo" / INFO_FILE).is_file():
        make_demo_data(root / "datasets" / "demo", seed=0, **sizes)
    return root
