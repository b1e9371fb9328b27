"""Throughput of the pretext loader's per-image work (decode + two views), old pipeline vs new.

Usage::

    python -m benchmarks.bench_data --threads 1 [--quick] [--images DIR] [--out FILE]
        [--device cuda]

For each crop size (96 and 224 px) both pipelines process the same JPEG files in alternating
blocks in one process: read the file (``read_rgb``, the loader's reader: full decode, EXIF,
RGB) and make the two views. Per-core throughput is ``1 / median seconds per image`` with torch
limited to ``--threads`` threads (a loader worker is one process on one core), timed in CPU
seconds of the process (``time.process_time``: robust to other processes on a shared machine;
with ``--threads 1`` it is the time of one core). The old pipeline is the previous
``TwoViewTransform`` (torchvision on PIL images with the tensor Gaussian blur at a kernel of
10 % of the crop, float32 normalised output), kept here only as a reference. The new one is the
worker's part of :class:`bissl_det.data.pretext.TwoViewTransform`: crop + resize + flip to
uint8 and the draw of each view's colour/blur parameters.

The new pipeline's colour jitter, grayscale, blur and solarisation run on the device that holds
the batch (``data.build.pretext_batch_to_device``): that work moves, it does not vanish. It is
timed separately, per image (two views), on batches of ``--device-batch`` images: always on the
CPU (one thread, CPU time: what it would cost a CPU-only run, or a worker if it stayed there),
and with ``--device cuda`` also on the GPU (wall time after synchronising).

Without ``--images`` the files are synthetic 500x375 JPEGs (the size of a VOC image, quality
90, smooth colour fields plus texture). From the new workers' throughput the benchmark derives
the loader workers per GPU that feed ``--batch-per-gpu`` images in each of ``--step-times``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import bissl_det  # noqa: F401  (compat shims before detectron2)
from bissl_det.data.images import read_rgb
from bissl_det.data.pretext import (
    TwoViewAugmentation,
    TwoViewTransform,
    blur_kernel_size,
    normalise_pixels,
)
from bissl_det.data.view_augment import PretextView, augment_views
from bissl_det.utils.provenance import git_state, package_versions, utc_now

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision import transforms as T

CROP_SIZES = (96, 224)
GOALS = {"96": 2.0, "224": 5.0}  # minimum speed-up per core (issue 18)


class ReferenceTwoView:
    """The previous pipeline: torchvision transforms, tensor blur, float32 normalised views."""

    def __init__(self, aug: TwoViewAugmentation) -> None:
        self.views = [self._pipeline(aug, v) for v in (0, 1)]

    @staticmethod
    def _pipeline(aug: TwoViewAugmentation, view: int) -> T.Compose:
        kernel = blur_kernel_size(aug.crop_size)
        return T.Compose(
            [
                T.RandomResizedCrop(aug.crop_size, scale=aug.crop_scale, ratio=aug.crop_ratio),
                T.RandomHorizontalFlip(p=aug.flip_p),
                T.RandomApply([T.ColorJitter(*aug.jitter)], p=aug.jitter_p),
                T.RandomGrayscale(p=aug.gray_p),
                T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=aug.blur_p[view]),
                T.RandomSolarize(threshold=128, p=aug.solarize_p[view]),
                T.ToTensor(),
                T.Normalize(aug.mean, aug.std),
            ]
        )

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.views[0](image), self.views[1](image)


def synthetic_jpegs(folder: Path, count: int, size: tuple[int, int] = (500, 375)) -> list[Path]:
    """``count`` natural-looking JPEGs: upsampled colour noise (smooth fields) plus texture."""
    rng = np.random.default_rng(0)
    paths = []
    for k in range(count):
        low = rng.normal(size=(size[1] // 16, size[0] // 16, 3))
        low = ((low - low.min()) / np.ptp(low) * 255).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(low).resize(size, Image.Resampling.BICUBIC))
        pixels = smooth.astype(np.float32) + rng.normal(0, 12, size=smooth.shape)
        path = folder / f"synthetic_{k}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def per_image_seconds(fn: Callable[[Path], object], paths: list[Path], n: int) -> float:
    """CPU seconds of this process per image: on a shared machine, wall time also counts the
    time other processes hold the core; the CPU time is what a dedicated worker core spends."""
    start = time.process_time()
    for i in range(n):
        fn(paths[i % len(paths)])
    return (time.process_time() - start) / n


def device_seconds_per_image(
    transform: TwoViewTransform, paths: list[Path], args: argparse.Namespace, device: str
) -> float:
    """Seconds per image (two views) of the device's part of the new pipeline: augmentation and
    normalisation of uint8 batches of ``--device-batch`` images, as the trainer runs it. CPU:
    process time (one core at ``--threads 1``); CUDA: wall time between synchronisations."""
    aug, n = transform.aug, args.device_batch
    views = [transform(read_rgb(paths[i % len(paths)])) for i in range(n)]
    # Pixels on the device, parameters on the host: as pretext_batch_to_device passes them.
    batch = [PretextView(v.pixels.to(device), v.params) for v in default_collate(views)]

    def step() -> None:
        for view in batch:
            normalise_pixels(augment_views(view.pixels, view.params), aug.mean, aug.std)

    cuda = device.startswith("cuda")
    clock = time.perf_counter if cuda else time.process_time
    step()  # warm-up
    times = []
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
        start = clock()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append((clock() - start) / n)
    return statistics.median(times)


def bench_size(crop: int, paths: list[Path], args: argparse.Namespace, log) -> dict:
    aug = TwoViewAugmentation(crop_size=crop)
    pipelines = {"old": ReferenceTwoView(aug), "new": TwoViewTransform(aug)}
    # The loader's dataset calls the new transform's read (JPEGs at reduced scale where the
    # crops allow); the old pipeline got the fully decoded image.
    runs = {"old": lambda p: pipelines["old"](read_rgb(p)), "new": pipelines["new"].read}
    runs["decode_only"] = read_rgb
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():  # warm-up: first calls allocate and import lazily
        per_image_seconds(fn, paths, 2)
    for _ in range(args.repeats):  # alternating blocks: drift of a shared machine hits both
        for name, fn in runs.items():
            times[name].append(per_image_seconds(fn, paths, args.images_per_block))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    device_s = {"cpu": device_seconds_per_image(pipelines["new"], paths, args, "cpu")}
    if args.device != "cpu":
        device_s[args.device] = device_seconds_per_image(pipelines["new"], paths, args, args.device)
    cpu_only = median["new"] + device_s["cpu"]
    out = {
        "ms_per_image": {k: 1e3 * v for k, v in median.items()},
        "times_s": times,
        "images_per_s_per_core": {"old": 1 / median["old"], "new": 1 / median["new"]},
        "speedup_per_core": median["old"] / median["new"],
        "decode_share_of_new": median["decode_only"] / median["new"],
        "device_side_ms_per_image": {k: 1e3 * v for k, v in device_s.items()},
        "cpu_only_ms_per_image": 1e3 * cpu_only,
        "cpu_only_speedup_per_core": median["old"] / cpu_only,
        "bytes_per_image": {"old": 2 * 3 * crop * crop * 4, "new": 2 * 3 * crop * crop},
    }
    ms = out["ms_per_image"]
    log(
        f"{crop:>4} px: old {ms['old']:7.2f} ms/image, new workers {ms['new']:6.2f} ms/image "
        f"(decode {ms['decode_only']:.2f}) -> {out['speedup_per_core']:.2f}x; "
        f"{out['images_per_s_per_core']['new']:.0f} images/s per core"
    )
    device_ms = ", ".join(f"{k} {v:.2f}" for k, v in out["device_side_ms_per_image"].items())
    log(
        f"{crop:>4} px: + device side {device_ms} ms/image (batch {args.device_batch}); workers + "
        f"device side both on one CPU core: {out['cpu_only_ms_per_image']:.2f} ms/image, "
        f"{out['cpu_only_speedup_per_core']:.2f}x the old pipeline"
    )
    return out


def workers_needed(images_per_s: float, batch: int, step_s: float) -> int:
    """Loader worker processes (one core each) that produce ``batch`` images per ``step_s``."""
    return math.ceil(batch / (step_s * images_per_s))


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 = one loader worker)")
    p.add_argument("--quick", action="store_true", help="fewer images per block (< 2 minutes)")
    p.add_argument("--images", default="", help="folder of real images (default: synthetic)")
    p.add_argument("--num-files", type=int, default=8, help="distinct files cycled through")
    p.add_argument("--repeats", type=int, default=5, help="alternating blocks per pipeline")
    p.add_argument("--images-per-block", type=int, default=40)
    p.add_argument("--batch-per-gpu", type=int, default=256, help="pretext images per GPU step")
    p.add_argument("--step-times", type=float, nargs="+", default=[0.25, 0.5, 1.0],
                   help="lower-step times (s) the loader must keep up with")  # fmt: skip
    p.add_argument("--device", default="cpu", help="also time the device side here (cuda)")
    p.add_argument("--device-batch", type=int, default=32, help="images per device-side batch")
    p.add_argument("--out", default="", help="JSON output file")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.images_per_block, args.device_batch = 3, 12, 16
    if args.device != "cpu" and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        p.error(f"--device {args.device}: only cpu or an available cuda device")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start, started = time.perf_counter(), utc_now()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        if args.images:
            from bissl_det.data.pretext import find_images

            paths = find_images(args.images)[: args.num_files]
        else:
            paths = synthetic_jpegs(Path(tmp), args.num_files)
        sizes = [Image.open(p).size for p in paths]
        torch.manual_seed(0)
        per_size = {str(c): bench_size(c, paths, args, log) for c in CROP_SIZES}
    results = {
        "speedup_per_core": {c: r["speedup_per_core"] for c, r in per_size.items()},
        "images_per_s_per_core": {c: r["images_per_s_per_core"] for c, r in per_size.items()},
        "device_side_ms_per_image": {c: r["device_side_ms_per_image"] for c, r in per_size.items()},
        "cpu_only_speedup_per_core": {
            c: r["cpu_only_speedup_per_core"] for c, r in per_size.items()
        },
        "goals_speedup": GOALS,
        "goals_met": {c: per_size[c]["speedup_per_core"] >= g for c, g in GOALS.items()},
        "workers_per_gpu": {
            c: {
                f"{step:g}s": workers_needed(
                    r["images_per_s_per_core"]["new"], args.batch_per_gpu, step
                )
                for step in args.step_times
            }
            for c, r in per_size.items()
        },
        "sizes": per_size,
        "settings": {
            **{k: v for k, v in vars(args).items() if k != "out"},
            "files": "synthetic" if not args.images else os.path.abspath(args.images),
            "image_sizes": sorted({f"{w}x{h}" for w, h in sizes}),
        },
        "provenance": {
            "git": git_state(),
            "command": [sys.executable, *sys.argv],
            "versions": {**package_versions(), "pillow": Image.__version__},
            "machine": machine(),
            "hostname": socket.gethostname(),
            "load_average": os.getloadavg(),
            "start_time": started,
            "end_time": utc_now(),
        },
        "total_s": time.perf_counter() - start,
    }
    for c, table in results["workers_per_gpu"].items():
        log(f"{c:>4} px: workers per GPU for {args.batch_per_gpu} images per step: {table}")
    for c, goal in GOALS.items():
        met = "met" if results["goals_met"][c] else "MISSED"
        log(
            f"{c:>4} px: workers' speed-up {results['speedup_per_core'][c]:.2f}x, goal >= {goal}x "
            f"{met} (device side also on the CPU core: "
            f"{results['cpu_only_speedup_per_core'][c]:.2f}x)"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        log(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
