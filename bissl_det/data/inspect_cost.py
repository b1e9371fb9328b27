"""What a detector's RoI and proposal counts cost: measured on this CPU for the config's model.

The inspector (:mod:`.inspect`) suggests RoI batches and proposal counts from the data alone;
with an R50-C4 box head (res5 runs on every RoI) those counts can decide the time per iteration.
:func:`measure_head_cost` builds the config's backbone, RPN head and RoI head (NORM "BN", masks
off: the same convolutions without a process group), times them on one image of the typical
training size and on a few RoI counts, and returns a :class:`HeadCost`: seconds per image and
per RoI, from which the time of any count follows (linear in the count: each RoI is one pooled
feature through the same head).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

# Time the RoI head on doubling counts from this one until a pass takes MIN_TIMED_S (so that the
# per-RoI slope stands above the fixed overhead), at most MAX_TIMED_ROIS.
FIRST_TIMED_ROIS = 16
MAX_TIMED_ROIS = 512
MIN_TIMED_S = 0.2
COUNT_STEP = 8  # capped counts are multiples of this


@dataclass
class HeadCost:
    """Seconds on this machine (``threads`` torch threads), per training image at ``image_hw``.

    ``image_*``: backbone + RPN head; ``roi_*``: the RoI head per RoI (box head and predictor,
    RoIAlign included). ``train``: forward + backward; ``test``: forward only.
    """

    image_hw: tuple[int, int]
    image_train_s: float
    roi_train_s: float
    image_test_s: float
    roi_test_s: float
    threads: int

    def train_s(self, rois: int) -> float:
        """Seconds per training image with ``rois`` RoIs (ROI_HEADS.BATCH_SIZE_PER_IMAGE)."""
        return self.image_train_s + rois * self.roi_train_s

    def test_s(self, proposals: int) -> float:
        """Seconds per test image with ``proposals`` RoIs scored (RPN.POST_NMS_TOPK_TEST)."""
        return self.image_test_s + proposals * self.roi_test_s

    def max_count(self, current: int, limit: float, per_roi: float, base: float) -> int:
        """The largest count whose time is <= ``limit`` x the time at ``current``.

        ``base`` + ``current`` x ``per_roi`` is the current time; the result is a multiple of
        COUNT_STEP and never below ``current``.
        """
        budget = (limit - 1.0) * (base + current * per_roi)
        extra = int(budget / per_roi) if per_roi > 0 else 1 << 20
        return max(current, (current + extra) // COUNT_STEP * COUNT_STEP)

    def as_dict(self) -> dict:
        return asdict(self)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _timing_config(cfg):
    """The config's detector, buildable and runnable on this CPU in one process."""
    timing = cfg.clone()
    timing.defrost()
    timing.MODEL.DEVICE = "cpu"
    timing.MODEL.MASK_ON = False
    timing.MODEL.RESNETS.NORM = "BN"  # SyncBN needs a process group; same convolutions
    if "BISSL" in timing.MODEL and timing.MODEL.META_ARCHITECTURE == "BiSSL":
        timing.MODEL.META_ARCHITECTURE = timing.MODEL.BISSL.UPPER_META_ARCHITECTURE
    return timing


def _random_boxes(count: int, height: int, width: int, generator) -> torch.Tensor:
    xy = torch.rand(count, 2, generator=generator) * torch.tensor([width * 0.8, height * 0.8])
    wh = (0.05 + 0.15 * torch.rand(count, 2, generator=generator)) * torch.tensor([width, height])
    return torch.cat([xy, xy + wh], dim=1)


def _roi_outputs(roi_heads, features: dict, boxes: torch.Tensor):
    """The training path of one image's RoIs through the box head: pooled features -> scores."""
    from detectron2.structures import Boxes

    if hasattr(roi_heads, "res5"):  # C4: res5 on every RoI
        names = roi_heads.in_features
        x = roi_heads._shared_roi_transform([features[f] for f in names], [Boxes(boxes)])
        return roi_heads.box_predictor(x.mean(dim=[2, 3]))
    names = roi_heads.box_in_features
    x = roi_heads.box_pooler([features[f] for f in names], [Boxes(boxes)])
    return roi_heads.box_predictor(roi_heads.box_head(x))


def _backward_of(outputs) -> None:
    torch.autograd.backward([o.float().sum() for o in outputs])


def measure_head_cost(cfg, image_hw: tuple[int, int]) -> HeadCost:
    """Time the config's detector parts on one ``image_hw`` (height, width) image on this CPU.

    Backbone + RPN head: one forward + backward (after a warm-up on a small image) and one
    forward. RoI head: forward + backward and forward alone on ``R/4`` and ``R`` RoIs, ``R``
    doubling from FIRST_TIMED_ROIS until a pass takes MIN_TIMED_S; the per-RoI cost is the
    slope between the two (the fixed overhead cancels).
    """
    from detectron2.modeling import build_backbone, build_proposal_generator, build_roi_heads

    timing = _timing_config(cfg)
    backbone = build_backbone(timing)
    rpn = build_proposal_generator(timing, backbone.output_shape())
    roi_heads = build_roi_heads(timing, backbone.output_shape())
    height, width = (int(round(s / 32.0)) * 32 for s in image_hw)
    generator = torch.Generator().manual_seed(0)

    def image_pass(h: int, w: int, train: bool) -> dict:
        with torch.set_grad_enabled(train):
            features = backbone(torch.randn(1, 3, h, w, generator=generator))
            outputs = rpn.rpn_head([features[f] for f in rpn.in_features])
            if train:
                _backward_of([t for level in outputs for t in level])
        return features

    def roi_pass(count: int, features: dict, train: bool) -> None:
        boxes = _random_boxes(count, height, width, generator)
        with torch.set_grad_enabled(train):
            outputs = _roi_outputs(roi_heads, features, boxes)
            if train:
                _backward_of(outputs)

    backbone.train(), rpn.train(), roi_heads.train()
    image_pass(64, 64, True)  # warm-up: allocators, first-call dispatch
    image_train_s = _seconds(lambda: image_pass(height, width, True))
    image_test_s = _seconds(lambda: image_pass(height, width, False))
    features = {k: v.detach().requires_grad_() for k, v in image_pass(height, width, False).items()}

    def best_of_two(count: int, train: bool) -> float:
        return min(_seconds(lambda: roi_pass(count, features, train)) for _ in range(2))

    def slope(train: bool) -> float:
        roi_pass(4, features, train)  # warm-up
        count = FIRST_TIMED_ROIS
        while True:
            long = best_of_two(count, train)
            if long >= MIN_TIMED_S or count >= MAX_TIMED_ROIS:
                break
            count *= 2
        short = best_of_two(count // 4, train)
        per_roi = (long - short) / (count - count // 4)
        # Timing noise can hide a slope that small: the mean cost bounds it from above.
        return per_roi if per_roi > 0 else long / count

    return HeadCost(
        image_hw=(height, width),
        image_train_s=image_train_s,
        roi_train_s=slope(True),
        image_test_s=image_test_s,
        roi_test_s=slope(False),
        threads=torch.get_num_threads(),
    )
