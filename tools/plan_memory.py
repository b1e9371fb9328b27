#!/usr/bin/env python
r"""Estimate a BiSSL stage's peak device memory per process before running it.

    python tools/plan_memory.py --config-file configs/bissl/simclr_R50_C4_voc.yaml \
        --num-gpus 8 [--out plan.json] [KEY VALUE ...]

Builds the model on MODEL.DEVICE, measures the graphs of the stage's passes on two small
synthetic batches (saved-tensor accounting) and scales them to the config's per-process batches
(bissl_det/engine/memory_plan.py). Prints the parts and, on CUDA, whether the stage fits the
device and the largest pretext batch that does. ``--out`` writes JSON with "peak_bytes" and
its parts. Exits 1 when it does not fit a CUDA device.
"""

import argparse
import json
import sys
from pathlib import Path

import bissl_det  # noqa: F401  (compatibility shims + registrations, before detectron2 is used)
from bissl_det.engine.memory_plan import SAFETY, check_stage_memory, plan_stage_memory
from bissl_det.runtime.setup import load_config

import torch
from detectron2.modeling import build_model


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--num-gpus", type=int, default=1, help="processes the batches split over")
    p.add_argument("--out", default="", help="JSON output file")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.num_gpus < 1:
        raise SystemExit(f"--num-gpus {args.num_gpus}: must be >= 1")
    cfg = load_config(args.config_file, args.opts)
    if cfg.MODEL.META_ARCHITECTURE != "BiSSL":
        raise SystemExit(
            f"{args.config_file}: MODEL.META_ARCHITECTURE = {cfg.MODEL.META_ARCHITECTURE!r}; "
            "the planner estimates BiSSL stages"
        )
    torch.manual_seed(0)
    model = build_model(cfg)
    plan = plan_stage_memory(cfg, model, args.num_gpus)
    gib = 2.0**30
    for name, value in plan.parts.items():
        print(f"{name:<24} {value / gib:8.3f} GiB")
    print(f"{'peak_bytes':<24} {plan.peak_bytes / gib:8.3f} GiB  (per process, {plan.batches})")
    record = {**plan.to_dict(), "config_file": args.config_file, "num_gpus": args.num_gpus}
    code = 0
    device = next(model.parameters()).device
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        record["device_total_bytes"], record["usable_fraction"] = total, SAFETY
        try:
            print(check_stage_memory(plan, total, refuse=True))
        except MemoryError as e:
            print(e, file=sys.stderr)
            code = 1
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
