#!/usr/bin/env python
r"""Inspect a config's detection data and print settings that fit it (anchors, sizes, counts).

    python tools/inspect_dataset.py --config-file configs/quick/finetune_C4_demo.yaml \
        --out output/inspect_demo

For every split in DATASETS.TRAIN and DATASETS.TEST (DATASETS.CUSTOM entries are registered and
validated first): images, boxes per image, box sizes (sqrt(area) in pixels, at the original size
and after the config's INPUT resize), aspect ratios (h/w), class counts and image sizes. Then
suggested settings as KEY VALUE lines, each under '#' lines saying why, what the config has now
and what it costs: the config's backbone and RoI head are timed on this CPU (one image of the
typical training size, a few RoI counts), and RoI and proposal counts are capped where they
would make an image more than --cost-limit times slower (--no-cost-limit: not capped). Images
whose size is far from the rest (edge tiles) are listed. The last line holds every changed
setting, ready to paste after any tool's arguments.
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
    COST_LIMIT,
    collect_split,
    evaluator_of,
    image_size_outliers,
    resize_scales,
    split_statistics,
    suggest_settings,
)
from bissl_det.data.inspect_cost import measure_head_cost
from bissl_det.runtime.setup import load_config
from bissl_det.utils.cli import describe
from bissl_det.utils.plots import plot_histograms

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    parser = describe(argparse.ArgumentParser(), __doc__)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="config to inspect")
    parser.add_argument("--out", type=Path, help="folder for the JSON and PNG")
    parser.add_argument(
        "--cost-limit",
        type=float,
        default=COST_LIMIT,
        metavar="X",
        help="suggested RoI / proposal counts make an image at most X times slower than the "
        f"config's counts (default {COST_LIMIT:g})",
    )
    parser.add_argument(
        "--no-cost-limit",
        action="store_true",
        help="suggest the counts the data asks for, whatever they cost (the cost is still shown)",
    )
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
    register_from_config(cfg, pretext=False)  # the detection splits only
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
        outliers = image_size_outliers(split, cfg)
        s["image_size_outliers"] = outliers
        if outliers["count"]:
            shown = ", ".join(
                f"{e['wxh']} ({e['images']}, x{e['train_scale']:g})" for e in outliers["examples"]
            )
            print(
                f"  WARNING: {outliers['count']} images differ in size from the median "
                f"{outliers['median_wxh']} by more than x2: {shown}; the training resize scales "
                f"them by the factor shown, the median image by x{outliers['median_train_scale']:g}"
                " (their objects appear at other sizes: crop or drop them)"
            )
    train = [splits[n] for n in cfg.DATASETS.TRAIN]
    hw = tuple(float(v) for v in np.median(np.concatenate([t.image_hw for t in train]), axis=0))
    scale = resize_scales(
        np.array([hw]), cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
        cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING,
    ).mean()  # fmt: skip
    cost = measure_head_cost(cfg, (hw[0] * scale, hw[1] * scale))
    limit = None if args.no_cost_limit else args.cost_limit
    suggestions = suggest_settings(train, list(splits.values()), cfg, cost, limit)
    evaluator = evaluator_of(list(splits.values()))

    print(
        f"\n# Costs measured on this CPU (torch threads: {cost.threads}) for the config's model at "
        f"{cost.image_hw[1]}x{cost.image_hw[0]} px: backbone + RPN "
        f"{cost.image_train_s:.3g} s per training image, RoI head {1e3 * cost.roi_train_s:.3g} ms "
        f"per RoI (forward + backward); test {cost.image_test_s:.3g} s + "
        f"{1e3 * cost.roi_test_s:.3g} ms per proposal. Evaluator: "
        + ("COCO AP" if evaluator == "coco" else "VOC metric (pascal_voc)")
    )
    print("# Suggested settings ('#': why, the config's current value, the cost)")
    for s in suggestions:
        status = "change" if s.changes else "keep"
        print(f"# {s.reason} [{status}; now {format_value(s.current)}]")
        if s.cost and s.changes:
            print(f"#   cost: {s.cost}")
        print(f"{s.key} {format_value(s.value)}")
    changed = [f"{s.key} {format_value(s.value)}" for s in suggestions if s.changes]
    print("\n# Changed settings on one line (append to a tool's command):")
    print(" ".join(changed) if changed else "# (none: the config already fits the data)")

    out = args.out or Path(cfg.OUTPUT_DIR) / "dataset_inspection"
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "config_file": args.config_file,
        "overrides": list(args.opts),
        "evaluator": evaluator,
        "cost": {**cost.as_dict(), "limit": limit},
        "splits": stats,
        "suggestions": [
            {
                "key": s.key,
                "value": s.value,
                "current": s.current,
                "changes": s.changes,
                "reason": s.reason,
                "cost": s.cost,
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
