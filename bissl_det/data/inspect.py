"""Statistics of registered detection data sets, and config settings that fit them.

:func:`collect_split` reads a registered split (detectron2 dataset dicts) into arrays;
:func:`split_statistics` summarises it (images, boxes per image, box sizes at the original size and
after the config's resize, aspect ratios, classes, image sizes); :func:`suggest_settings` turns
the training splits into anchor, input-size and detections-per-image settings. Every rule is a
function of percentiles, stated in the suggestion's ``reason``.

Box size is ``sqrt(width * height)`` in pixels; aspect ratio is ``height / width`` (Detectron2's
``ANCHOR_GENERATOR.ASPECT_RATIOS`` convention).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.structures import BoxMode

from .catalog import dataset_dicts
from .inspect_cost import HeadCost

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
# Boxes smaller than this (p5, at training scale) cover less than one cell of the feature map
# the RPN sees: one res4 cell (stride 16) for C4, two P2 cells (stride 4) for FPN.
MIN_OBJECT_PX = {"C4": 16.0, "FPN": 8.0}
# Sampled min sizes of a "range" MIN_SIZE_TRAIN (it is uniform between its two ends).
RANGE_GRID = 5
DETECTIONS_MARGIN = 2.0  # DETECTIONS_PER_IMAGE >= this x the most boxes in one image
PROPOSALS_PER_OBJECT = 10  # POST_NMS_TOPK_TEST >= this x the most boxes in one image
POSITIVE_ROIS_PER_OBJECT = 4  # sampled foreground RoIs per object in a dense (p95) image
# Suggested RoI and proposal counts may make a training (test) image at most this many times
# slower than the config's current counts do (tools/inspect_dataset.py --cost-limit).
COST_LIMIT = 1.5
OUTLIER_FACTOR = 2.0  # an image side this many times off the median one is an outlier
OUTLIER_EXAMPLES = 5


@dataclass
class SplitBoxes:
    """One split as arrays: per image (height, width, box count), per box (w, h, class, image)."""

    name: str
    image_hw: np.ndarray  # (images, 2) original height, width
    box_wh: np.ndarray  # (boxes, 2) width, height in original pixels
    box_image: np.ndarray  # (boxes,) index of each box's image
    box_class: np.ndarray  # (boxes,) category id
    class_names: list[str]
    evaluator: str = "pascal_voc"  # the set's evaluator_type: "pascal_voc" or "coco"

    @property
    def boxes_per_image(self) -> np.ndarray:
        return np.bincount(self.box_image, minlength=len(self.image_hw))


def collect_split(name: str) -> SplitBoxes:
    """Load registered split ``name`` (DatasetCatalog) into :class:`SplitBoxes`.

    Crowd annotations (``iscrowd`` 1) are left out, as Detectron2's training mapper does.
    """
    dicts = dataset_dicts(name)
    hw, wh, image_index, classes = [], [], [], []
    for i, record in enumerate(dicts):
        hw.append((record["height"], record["width"]))
        for ann in record.get("annotations", []):
            if ann.get("iscrowd", 0):
                continue
            x0, y0, x1, y1 = BoxMode.convert(ann["bbox"], ann["bbox_mode"], BoxMode.XYXY_ABS)
            wh.append((x1 - x0, y1 - y0))
            image_index.append(i)
            classes.append(ann["category_id"])
    meta = MetadataCatalog.get(name)
    names = list(meta.get("thing_classes", []))
    return SplitBoxes(
        name=name,
        image_hw=np.asarray(hw, dtype=np.float64).reshape(-1, 2),
        box_wh=np.asarray(wh, dtype=np.float64).reshape(-1, 2),
        box_image=np.asarray(image_index, dtype=np.int64),
        box_class=np.asarray(classes, dtype=np.int64),
        class_names=names,
        evaluator=meta.get("evaluator_type", "pascal_voc"),
    )


def resize_scales(
    image_hw: np.ndarray, min_sizes, max_size: int, sampling: str = "choice"
) -> np.ndarray:
    """Scale factors of ResizeShortestEdge, shape (images, candidates), one per short side.

    ``sampling`` "choice": each of ``min_sizes`` equally likely; "range": ``RANGE_GRID`` short
    sides evenly spaced between the two ends. ``max_size`` <= 0 means no cap on the long side.
    """
    min_sizes = [float(s) for s in np.atleast_1d(min_sizes)]
    if sampling == "range":
        if len(min_sizes) != 2:
            raise ValueError(f"MIN_SIZE_TRAIN_SAMPLING range needs two sizes, got {min_sizes}")
        min_sizes = list(np.linspace(min_sizes[0], min_sizes[1], RANGE_GRID))
    elif sampling != "choice":
        raise ValueError(f"MIN_SIZE_TRAIN_SAMPLING = {sampling!r}: expected 'choice' or 'range'")
    short, long = image_hw.min(axis=1, keepdims=True), image_hw.max(axis=1, keepdims=True)
    scales = np.asarray(min_sizes)[None, :] / short
    if max_size > 0:
        scales = np.minimum(scales, max_size / long)
    return scales


def percentiles(values: np.ndarray) -> dict[str, float]:
    """min, p1..p99 (PERCENTILES), max and mean of ``values``; empty dict when there are none."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {}
    out = {"min": float(values.min())}
    values_at = np.percentile(values, PERCENTILES)
    out.update({f"p{q}": float(v) for q, v in zip(PERCENTILES, values_at, strict=True)})
    out.update({"max": float(values.max()), "mean": float(values.mean())})
    return out


def box_sizes_at_scale(split: SplitBoxes, scales: np.ndarray) -> np.ndarray:
    """sqrt(area) of every box under every candidate scale of its image, flattened."""
    size = np.sqrt(split.box_wh.prod(axis=1))
    return (size[:, None] * scales[split.box_image]).ravel()


def split_statistics(split: SplitBoxes, cfg) -> dict[str, Any]:
    """The JSON statistics of one split under ``cfg``'s INPUT resize settings."""
    inp = cfg.INPUT
    train_scales = resize_scales(
        split.image_hw, inp.MIN_SIZE_TRAIN, inp.MAX_SIZE_TRAIN, inp.MIN_SIZE_TRAIN_SAMPLING
    )
    test_scales = resize_scales(split.image_hw, inp.MIN_SIZE_TEST, inp.MAX_SIZE_TEST)
    counts = Counter(int(c) for c in split.box_class)
    names = split.class_names
    wh = split.box_wh
    per_image = split.boxes_per_image
    sizes = Counter(f"{int(w)}x{int(h)}" for h, w in split.image_hw)
    return {
        "images": len(split.image_hw),
        "images_without_boxes": int((per_image == 0).sum()),
        "boxes": len(wh),
        "boxes_per_image": percentiles(per_image),
        "box_sqrt_area_px": {
            "original": percentiles(np.sqrt(wh.prod(axis=1))),
            "train_resize": percentiles(box_sizes_at_scale(split, train_scales)),
            "test_resize": percentiles(box_sizes_at_scale(split, test_scales)),
        },
        "aspect_ratio_h_over_w": percentiles(wh[:, 1] / wh[:, 0]) if len(wh) else {},
        "class_counts": {
            (names[c] if 0 <= c < len(names) else str(c)): counts[c] for c in sorted(counts)
        },
        "image_height_px": percentiles(split.image_hw[:, 0]),
        "image_width_px": percentiles(split.image_hw[:, 1]),
        "most_common_image_sizes_wxh": dict(sizes.most_common(5)),
    }


@dataclass
class Suggestion:
    """One config setting: the suggested value, the config's current one, and why."""

    key: str
    value: Any
    current: Any
    reason: str
    cost: str = ""  # the expected change in time per iteration (or per test image), in words

    @property
    def changes(self) -> bool:
        return _plain(self.value) != _plain(self.current)


def _plain(value):
    """Tuples and lists compare equal (yacs stores either)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def nearest_power_of_two(x: float) -> int:
    """2**k closest to ``x`` on a log scale: ``x`` is within a factor sqrt(2) of it."""
    return 2 ** round(math.log2(x))


def is_fpn(cfg) -> bool:
    """Several RPN input features (p2..p6) mean FPN: one anchor size per level."""
    return len(cfg.MODEL.RPN.IN_FEATURES) > 1


def _round_up(x: float, step: int) -> int:
    return int(math.ceil(x / step) * step)


def _next_power_of_two(x: float) -> int:
    return 2 ** math.ceil(math.log2(max(x, 1.0)))


def evaluator_of(splits: list[SplitBoxes]) -> str:
    """ "coco" if any split is scored by COCO AP (it counts at most 100 detections per image),
    else "pascal_voc" (the VOC metric scores every detection)."""
    kinds = {s.evaluator for s in splits}
    return "coco" if "coco" in kinds else "pascal_voc"


def suggest_settings(
    train: list[SplitBoxes],
    all_splits: list[SplitBoxes],
    cfg,
    cost: HeadCost | None = None,
    cost_limit: float | None = COST_LIMIT,
) -> list:
    """Settings that fit the data: anchors, input size, detections and RoIs per image.

    Anchors, aspect ratios and input sizes fit the boxes of the training splits at training
    scale; detection and proposal counts fit the densest image of any split. Counts never go
    below the config's current value (a suggestion only raises them).

    With ``cost`` (measured for the config's model, :func:`.inspect_cost.measure_head_cost`)
    every suggestion states its expected change in time per training (or test) image, and with
    ``cost_limit`` the RoI batch and the test proposals are capped where their time per image
    would exceed ``cost_limit`` x the current one (a multiple of 8, never below the current
    value); the reason says what the data alone asked for. ``cost_limit`` None: no cap.
    """
    if not train or not sum(len(s.box_wh) for s in train):
        raise ValueError("no boxes in the training splits: nothing to fit anchors to")
    inp, rpn, roi = cfg.INPUT, cfg.MODEL.RPN, cfg.MODEL.ROI_HEADS
    arch = "FPN" if is_fpn(cfg) else "C4"

    def train_sizes(min_sizes, max_size) -> np.ndarray:
        sampling = inp.MIN_SIZE_TRAIN_SAMPLING
        return np.concatenate(
            [box_sizes_at_scale(s, resize_scales(s.image_hw, min_sizes, max_size, sampling))
             for s in train]
        )  # fmt: skip

    out = []
    # Input size first (small objects), then anchors fitted to the boxes at the new size.
    p5 = float(np.percentile(train_sizes(inp.MIN_SIZE_TRAIN, inp.MAX_SIZE_TRAIN), 5))
    factor = max(1.0, MIN_OBJECT_PX[arch] / p5)
    why = (
        f"5% of training boxes are smaller than {p5:.1f} px at training scale; {arch} needs "
        f">= {MIN_OBJECT_PX[arch]:.0f} px"
    )
    why += f": upscale x{factor:.2f}" if factor > 1 else ": no upscaling needed"
    scaled = {
        key: inp[key] if factor == 1 else _round_up(inp[key] * factor, 8)
        for key in ("MIN_SIZE_TEST", "MAX_SIZE_TRAIN", "MAX_SIZE_TEST")
    }
    min_train = tuple(inp.MIN_SIZE_TRAIN)
    if factor > 1:
        min_train = tuple(_round_up(m * factor, 8) for m in inp.MIN_SIZE_TRAIN)
    upscale_cost = size_cost(cost, factor) if factor > 1 else ("none" if cost else "")
    out.append(Suggestion("INPUT.MIN_SIZE_TRAIN", min_train, inp.MIN_SIZE_TRAIN, why, upscale_cost))
    for key, value in scaled.items():
        reason = why if key == "MIN_SIZE_TEST" else f"scaled like MIN_SIZE_TRAIN (x{factor:.2f})"
        with_it = "with MIN_SIZE_TEST" if key == "MAX_SIZE_TEST" else "with MIN_SIZE_TRAIN"
        size_text = "" if cost is None else f"counted {with_it}"
        if key == "MIN_SIZE_TEST" and cost is not None:
            size_text = f"backbone time per test image x{factor**2:.2f} (the same rule)"
        out.append(Suggestion(f"INPUT.{key}", value, inp[key], reason, size_text))
    p1, p99 = np.percentile(train_sizes(min_train, scaled["MAX_SIZE_TRAIN"]), (1, 99))

    lo, hi = nearest_power_of_two(p1), nearest_power_of_two(p99)
    if arch == "C4":
        anchor_sizes = [[2**k for k in range(int(math.log2(lo)), int(math.log2(hi)) + 1)]]
        why = f"powers of 2 within x1.41 of every box size p1..p99 = {p1:.1f}..{p99:.1f} px"
    else:
        levels = len(rpn.IN_FEATURES)
        start = max(lo, 8)
        anchor_sizes = [[start * 2**k] for k in range(levels)]
        why = f"one size per FPN level ({levels}) from p1 = {p1:.1f} px up"
        if anchor_sizes[-1][0] * math.sqrt(2) < p99:
            why += f"; boxes above {anchor_sizes[-1][0] * 1.41:.0f} px (p99 {p99:.0f}) exceed them"
    out.append(
        Suggestion(
            "MODEL.ANCHOR_GENERATOR.SIZES",
            anchor_sizes,
            cfg.MODEL.ANCHOR_GENERATOR.SIZES,
            why,
            "negligible (the RPN head's 1x1 convolutions per anchor)" if cost else "",
        )
    )

    wh = np.concatenate([s.box_wh for s in train])
    r1, r99 = np.percentile(wh[:, 1] / wh[:, 0], (1, 99))
    k_lo, k_hi = min(0, round(math.log2(r1))), max(0, round(math.log2(r99)))
    ratios = [[float(2.0**k) for k in range(k_lo, k_hi + 1)]]
    out.append(
        Suggestion(
            "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS",
            ratios,
            cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS,
            f"powers of 2 within x1.41 of every h/w in p1..p99 = {r1:.2f}..{r99:.2f}",
            "negligible (the RPN head's 1x1 convolutions per anchor)" if cost else "",
        )
    )

    per_image = np.concatenate([s.boxes_per_image for s in all_splits])
    most = int(per_image.max())
    dense = float(np.percentile(np.concatenate([s.boxes_per_image for s in train]), 95))
    dets = max(cfg.TEST.DETECTIONS_PER_IMAGE, _round_up(DETECTIONS_MARGIN * most, 10))
    if evaluator_of(all_splits) == "coco":
        scored = "COCO AP scores at most 100 detections per image"
        if dets > 100 >= cfg.TEST.DETECTIONS_PER_IMAGE:
            scored += ": more count for recall you read yourself, not for AP"
    else:
        scored = "the VOC metric scores every detection"
    out.append(
        Suggestion(
            "TEST.DETECTIONS_PER_IMAGE",
            dets,
            cfg.TEST.DETECTIONS_PER_IMAGE,
            f"up to {most} boxes in one image: keep >= {DETECTIONS_MARGIN:g}x that ({scored})",
            "negligible (sorting scores)" if cost else "",
        )
    )
    post = max(rpn.POST_NMS_TOPK_TEST, dets, PROPOSALS_PER_OBJECT * most)
    why = (
        f">= {PROPOSALS_PER_OBJECT} proposals per object of the densest image, "
        ">= DETECTIONS_PER_IMAGE"
    )
    post, why = _within_cost(post, rpn.POST_NMS_TOPK_TEST, why, cost, cost_limit, test=True)
    if post < dets:  # the cost cap won: at most `post` boxes can be detected
        why += f"; fewer than DETECTIONS_PER_IMAGE {dets}, which it bounds"
    out.append(
        Suggestion(
            "MODEL.RPN.POST_NMS_TOPK_TEST",
            post,
            rpn.POST_NMS_TOPK_TEST,
            why,
            _count_cost(cost, rpn.POST_NMS_TOPK_TEST, post, test=True),
        )
    )
    pre_factor = 1 if arch == "FPN" else 2  # FPN applies PRE_NMS_TOPK per level
    pre = max(rpn.PRE_NMS_TOPK_TEST, pre_factor * post)
    out.append(
        Suggestion(
            "MODEL.RPN.PRE_NMS_TOPK_TEST",
            pre,
            rpn.PRE_NMS_TOPK_TEST,
            f">= {pre_factor}x POST_NMS_TOPK_TEST"
            + (" (per level for FPN)" if pre_factor == 1 else ""),
            "negligible (NMS on boxes)" if cost else "",
        )
    )
    rois = max(
        roi.BATCH_SIZE_PER_IMAGE,
        _next_power_of_two(POSITIVE_ROIS_PER_OBJECT * dense / roi.POSITIVE_FRACTION),
    )
    why = (
        f"{POSITIVE_ROIS_PER_OBJECT} foreground RoIs per object in a dense image "
        f"(p95 = {dense:g} boxes) at POSITIVE_FRACTION {roi.POSITIVE_FRACTION:g}"
    )
    rois, why = _within_cost(rois, roi.BATCH_SIZE_PER_IMAGE, why, cost, cost_limit, test=False)
    out.append(
        Suggestion(
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
            rois,
            roi.BATCH_SIZE_PER_IMAGE,
            why,
            _count_cost(cost, roi.BATCH_SIZE_PER_IMAGE, rois, test=False),
        )
    )
    out.append(
        Suggestion(
            "MODEL.RPN.POST_NMS_TOPK_TRAIN",
            max(rpn.POST_NMS_TOPK_TRAIN, rois),
            rpn.POST_NMS_TOPK_TRAIN,
            ">= ROI_HEADS.BATCH_SIZE_PER_IMAGE, so that there are RoIs to sample",
            "negligible (proposals are sampled down to BATCH_SIZE_PER_IMAGE)" if cost else "",
        )
    )
    return out


def _within_cost(
    wanted: int, current: int, why: str, cost: HeadCost | None, limit: float | None, test: bool
) -> tuple[int, str]:
    """``wanted`` capped to what ``limit`` x the current time per image affords, and why."""
    if cost is None or limit is None or wanted <= current:
        return wanted, why
    per_roi, base = (
        (cost.roi_test_s, cost.image_test_s) if test else (cost.roi_train_s, cost.image_train_s)
    )
    cap = cost.max_count(current, limit, per_roi, base)
    if wanted <= cap:
        return wanted, why
    return cap, (
        f"{why} asks for {wanted}, capped at {cap}: the cost limit allows x{limit:g} the current "
        f"time per {'test' if test else 'training'} image (--cost-limit, --no-cost-limit)"
    )


def _count_cost(cost: HeadCost | None, current: int, value: int, test: bool) -> str:
    """The change in seconds per image from ``current`` to ``value`` RoIs (train) or proposals."""
    if cost is None:
        return ""
    time_of = cost.test_s if test else cost.train_s
    before, after = time_of(current), time_of(value)
    what = "test time per image" if test else "time per training iteration"
    return (
        f"{what} x{after / before:.2f} (per image {before:.3g} -> {after:.3g} s on this CPU; "
        f"{1e3 * (cost.roi_test_s if test else cost.roi_train_s):.3g} ms per RoI measured)"
    )


def size_cost(cost: HeadCost | None, factor: float) -> str:
    """Upscaling by ``factor``: backbone time grows with the pixels (factor^2), a rule."""
    if cost is None:
        return ""
    return (
        f"backbone time per training iteration x{factor**2:.2f} (a rule: convolution FLOPs grow "
        f"with the pixels; measured {cost.image_train_s:.3g} s per image now)"
    )


def image_size_outliers(split: SplitBoxes, cfg, factor: float = OUTLIER_FACTOR) -> dict:
    """Images whose short or long side differs from the split's median by more than ``factor``.

    Under the training resize such an image is scaled differently from the rest (a 49x400 edge
    tile is upscaled much more than a 400x400 one): its objects appear at other sizes.
    Returns the count and up to ``OUTLIER_EXAMPLES`` examples with their mean training scale
    and the median image's.
    """
    hw = split.image_hw
    if not len(hw):
        return {"count": 0, "examples": []}
    short, long = hw.min(axis=1), hw.max(axis=1)
    med_short, med_long = np.median(short), np.median(long)
    off = (
        (short * factor < med_short) | (short > factor * med_short)
        | (long * factor < med_long) | (long > factor * med_long)
    )  # fmt: skip
    inp = cfg.INPUT
    scales = resize_scales(hw, inp.MIN_SIZE_TRAIN, inp.MAX_SIZE_TRAIN, inp.MIN_SIZE_TRAIN_SAMPLING)
    typical = resize_scales(
        np.array([[np.median(hw[:, 0]), np.median(hw[:, 1])]]),
        inp.MIN_SIZE_TRAIN,
        inp.MAX_SIZE_TRAIN,
        inp.MIN_SIZE_TRAIN_SAMPLING,
    ).mean()
    examples = Counter(
        (int(hw[i, 1]), int(hw[i, 0]), round(float(scales[i].mean()), 2))
        for i in np.flatnonzero(off)
    )
    return {
        "count": int(off.sum()),
        "median_wxh": f"{int(np.median(hw[:, 1]))}x{int(np.median(hw[:, 0]))}",
        "median_train_scale": round(float(typical), 2),
        "examples": [
            {"wxh": f"{w}x{h}", "images": n, "train_scale": scale}
            for (w, h, scale), n in examples.most_common(OUTLIER_EXAMPLES)
        ],
    }
