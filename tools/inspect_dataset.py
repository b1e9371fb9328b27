#!/usr/bin/env python
r"""Inspect a config's detection data and print settings that fit it (anchors, sizes, counts).

    python tools/inspect_dataset.py --config-file configs/quick/finetune_C4_demo.yaml \
        --out output/inspect_demo

For every split in DATASETS.TRAIN and DATASETS.TEST (DATASETS.CUSTOM entries are registered and
validated first): images, boxes per image, box sizes (sqrt(area) in pixels, at the original size
and after the config's INPUT resize), aspect ratios (h/w), class counts and image sizes. Then
suggested settings as KEY VALUE lines, each under a '#' line saying why and what the config has
now; the last line holds every changed setting, ready to paste after any tool's arguments.
Writes OUT/dataset_stats.json and OUT/dataset_histograms.png (OUT: --out, default
OUTPUT_DIR/dataset_inspection). Trailing KEY VALUE pairs override the config, as in every tool.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import bissl_det  # noqa: F401  (compatibility shims + registrations, before detectron2 is used)
from bissl_det.data.detection import register_from_config
from bissl_det.data.inspect import (
    collect_split,
    resize_scales,
    split_statistics,
    suggest_settings,
)
from bissl_det.engine.setup import load_config
from bissl_det.utils.cli import describe
from bissl_det.utils.plots import plot_histograms

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    parser = describe(argparse.ArgumentParser(), __doc__)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="config to inspect")
    parser.add_argument("--out", type=Path, help="folder for the JSON and PNG")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def format_value(value) -> str:
    """A config value as one shell word that yacs' merge_from_list reads back unchanged."""
    if isinstance(value, (list, tuple)):
        text = repr(value)
        return shlex.quote(text.replace("'", '"'))
    return shlex.quote(str(value))


def _describe(stats: dict) -> str:
    def row(p: dict, unit: str = "", digits: int = 1) -> str:
        keys = ("min", "p5", "p50", "p95", "max")
        return "  ".join(f"{k} {p[k]:.{digits}f}{unit}" for k in keys if k in p)

    size = stats["box_sqrt_area_px"]
    classes = ", ".join(f"{k} {v}" for k, v in stats["class_counts"].items())
    images = ", ".join(f"{k} ({v})" for k, v in stats["most_common_image_sizes_wxh"].items())
    return "\n".join(
        [
            f"  boxes per image      mean {stats['boxes_per_image'].get('mean', 0):.2f}  "
            + row(stats["boxes_per_image"], digits=0),
            f"  box size, original   {row(size['original'], ' px')}",
            f"  after train resize   {row(size['train_resize'], ' px')}",
            f"  after test resize    {row(size['test_resize'], ' px')}",
            f"  aspect ratio h/w     {row(stats['aspect_ratio_h_over_w'], digits=2)}",
            f"  classes              {classes}",
            f"  image sizes (w x h)  {images}",
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    register_from_config(cfg)
    roles: dict[str, list[str]] = {}
    for role, names in (("train", cfg.DATASETS.TRAIN), ("test", cfg.DATASETS.TEST)):
        for name in names:
            roles.setdefault(name, []).append(role)
    if not roles:
        raise SystemExit(f"{args.config_file}: DATASETS.TRAIN and DATASETS.TEST are both empty")
    splits = {name: collect_split(name) for name in roles}
    stats = {}
    for name, split in splits.items():
        stats[name] = {"role": "+".join(roles[name]), **split_statistics(split, cfg)}
        s = stats[name]
        print(
            f"== {name} ({s['role']}): {s['images']} images, {s['boxes']} boxes, "
            f"{s['images_without_boxes']} images without boxes"
        )
        print(_describe(s))
    train = [splits[n] for n in cfg.DATASETS.TRAIN]
    suggestions = suggest_settings(train, list(splits.values()), cfg)

    print("\n# Suggested settings ('#': why, and the config's current value)")
    for s in suggestions:
        status = "change" if s.changes else "keep"
        print(f"# {s.reason} [{status}; now {format_value(s.current)}]")
        print(f"{s.key} {format_value(s.value)}")
    changed = [f"{s.key} {format_value(s.value)}" for s in suggestions if s.changes]
    print("\n# Changed settings on one line (append to a tool's command):")
    print(" ".join(changed) if changed else "# (none: the config already fits the data)")

    out = args.out or Path(cfg.OUTPUT_DIR) / "dataset_inspection"
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "config_file": args.config_file,
        "overrides": list(args.opts),
        "splits": stats,
        "suggestions": [
            {
                "key": s.key,
                "value": s.value,
                "current": s.current,
                "changes": s.changes,
                "reason": s.reason,
            }
            for s in suggestions
        ],
    }
    (out / "dataset_stats.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_histograms(
        [
            (
                "box size sqrt(area), original",
                "pixels",
                {n: np.sqrt(s.box_wh.prod(axis=1)) for n, s in splits.items()},
                True,
            ),
            (
                "box size after the training resize (mean scale)",
                "pixels",
                {n: _train_sizes(s, cfg) for n, s in splits.items()},
                True,
            ),
            ("boxes per image", "boxes", {n: s.boxes_per_image for n, s in splits.items()}, False),
            (
                "aspect ratio h/w",
                "height / width",
                {n: s.box_wh[:, 1] / s.box_wh[:, 0] for n, s in splits.items()},
                True,
            ),
        ],
        out / "dataset_histograms.png",
        title=f"{args.config_file}",
    )
    print(f"\nwrote {out / 'dataset_stats.json'} and {out / 'dataset_histograms.png'}")
    return report


def _train_sizes(split, cfg) -> np.ndarray:
    """Box sizes at each image's mean training scale (one value per box, for the histogram)."""
    inp = cfg.INPUT
    scales = resize_scales(
        split.image_hw, inp.MIN_SIZE_TRAIN, inp.MAX_SIZE_TRAIN, inp.MIN_SIZE_TRAIN_SAMPLING
    ).mean(axis=1)
    return np.sqrt(split.box_wh.prod(axis=1)) * scales[split.box_image]


if __name__ == "__main__":
    main()
