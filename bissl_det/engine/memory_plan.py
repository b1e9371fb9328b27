"""How much device memory a BiSSL stage needs, estimated before it starts.

The graphs are measured, not modelled: the tensors autograd saves (``saved_tensors_hooks``,
counted once per storage, parameters excluded) while the model runs the stage's three passes on
two small synthetic batches, fitted linearly in the batch size and scaled to the config's
per-process batches. Parameters, gradients, optimiser state, solver vectors, the Lanczos basis
and the Fisher history are counted from the model's tensors.

The stage's peak is the larger of its two phases (the curvature graph lives from the end of the
lower steps to the end of the stage)::

    static = parameters + buffers + gradients + optimiser state (+ Fisher history on the device)
    lower  = graph of one lower step (LOWER.IMS_PER_BATCH per process)
    upper  = curvature graph (its batch) + graph of one downstream pass (UPPER.IMS_PER_BATCH)
             + solver vectors (CG: 6 vectors of theta; "lanczos": BASIS_SIZE more)
    peak   = static + max(lower, upper)

It leaves out what no tensor holds: the CUDA context, cuDNN workspaces, allocator fragmentation
(``SAFETY`` reserves a share of the device for them) and the transient buffers of a backward.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from detectron2.structures import BitMasks, Boxes, Instances
from torch import nn

from ..bilevel import get_curvature, pretext_curvature
from .curvature_batch import check_curvature_batch, graph_precision

__all__ = ["SAFETY", "MemoryPlan", "check_stage_memory", "plan_stage_memory"]

logger = logging.getLogger(__name__)

# Share of the device's memory the plan may use; the rest is for the CUDA context, cuDNN
# workspaces and fragmentation.
SAFETY = 0.9
_PROBE = (2, 4)  # images per probe batch: two points of the linear fit


@dataclass
class MemoryPlan:
    """The estimate, in bytes. ``parts`` add up to ``peak_bytes`` as the module docstring says."""

    peak_bytes: int
    parts: dict[str, int]
    per_image: dict[str, float]
    fixed: dict[str, float]
    batches: dict[str, int]
    host_bytes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def largest_curvature_batch(self, budget: float) -> int:
        """The largest per-process curvature batch (BISSL.HYPERGRAD.IMS_PER_BATCH / processes)
        whose stage fits ``budget`` bytes, at the current lower batch's graph (0: none)."""
        p = self.parts
        rest = budget - p["static"] - p["downstream_graph"] - p["solver_vectors"]
        per = self.per_image["curvature_graph"]
        curvature = rest - self.fixed["curvature_graph"]
        lower = budget - p["static"] - self.fixed["lower_graph"]
        fits = min(
            curvature / per if per > 0 else math.inf,
            lower / self.per_image["lower_graph"]
            if self.per_image["lower_graph"] > 0
            else math.inf,
        )
        return max(0, int(fits)) if math.isfinite(fits) else self.batches["curvature"]


def saved_tensor_bytes(fn: Callable[[], object], exclude: set[int]) -> tuple[object, int]:
    """Run ``fn``; return its result and the bytes of the tensors autograd saved meanwhile,
    each storage once, storages in ``exclude`` (parameters, buffers) left out."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _pretext_batch(cfg, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    size = cfg.BISSL.PRETEXT_DATA.AUG.CROP_SIZE
    return tuple(torch.randn(n, 3, size, size, device=device) for _ in range(2))


def _downstream_batch(cfg, n: int, device: torch.device):
    """A synthetic batch of the upper level's format at the config's largest training size."""
    if cfg.MODEL.BISSL.UPPER_META_ARCHITECTURE == "ResNetClassifier":
        size, classes = cfg.CLS.IMAGE_SIZE, cfg.MODEL.CLASSIFIER.NUM_CLASSES
        targets = (
            torch.ones(n, classes, device=device)
            if cfg.MODEL.CLASSIFIER.MULTI_LABEL
            else torch.zeros(n, dtype=torch.long, device=device)
        )
        return {"images": torch.randn(n, 3, size, size, device=device), "targets": targets}
    short = max(cfg.INPUT.MIN_SIZE_TRAIN)
    long = min(cfg.INPUT.MAX_SIZE_TRAIN, round(short * 4 / 3))  # a VOC/COCO-shaped image
    batch = []
    for _ in range(n):
        instances = Instances((short, long))
        boxes = torch.tensor([[4.0, 4.0, long / 2, short / 2], [long / 4, short / 4, long, short]])
        instances.gt_boxes = Boxes(boxes)
        instances.gt_classes = torch.zeros(2, dtype=torch.long)
        if cfg.MODEL.MASK_ON:
            masks = torch.zeros(2, short, long, dtype=torch.bool)
            masks[0, 4 : short // 2, 4 : long // 2] = masks[1, short // 4 :, long // 4 :] = True
            instances.gt_masks = BitMasks(masks)
        image = torch.randint(0, 256, (3, short, long), dtype=torch.uint8)
        batch.append({"image": image, "instances": instances, "height": short, "width": long})
    return batch


def _fit(measure: Callable[[int], int]) -> tuple[float, float]:
    """(fixed, per image) of a graph's bytes from the two probe batches."""
    (n0, n1), (b0, b1) = _PROBE, [measure(n) for n in _PROBE]
    per = max(0.0, (b1 - b0) / (n1 - n0))
    return max(0.0, b0 - per * n0), per


def plan_stage_memory(cfg, model: nn.Module, world_size: int = 1) -> MemoryPlan:
    """Estimate a stage's peak device memory per process for ``model`` (a built BiSSL model on
    its device) under ``cfg``. Runs the passes on small synthetic batches; the model's state
    and the random streams are as before (state restored, RNG forked, no optimiser step)."""

    hg, bissl = cfg.BISSL.HYPERGRAD, cfg.BISSL
    device = next(model.parameters()).device
    exclude = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    theta = list(model.backbone_pairs.lower)
    params = theta + (
        [p for p in model.lower_head_parameters() if p.requires_grad]
        if hg.INCLUDE_PRETEXT_HEAD
        else []
    )
    was_training = model.training
    model.train()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}

    def lower(n: int) -> int:
        return saved_tensor_bytes(
            lambda: model.pretext_loss(*_pretext_batch(cfg, n, device)), exclude
        )[1]

    def curvature(n: int) -> int:
        batch = _pretext_batch(cfg, n, device)
        with graph_precision(hg.GRAPH_DTYPE, device):  # BISSL.HYPERGRAD.GRAPH_DTYPE
            system, nbytes = saved_tensor_bytes(
                lambda: pretext_curvature(
                    hg.CURVATURE,
                    model.lower,
                    batch,
                    params,
                    **get_curvature(hg.CURVATURE).options_from(hg),
                ),
                exclude,
            )
        system.release()
        return nbytes

    def downstream(n: int) -> int:
        batch = _downstream_batch(cfg, n, device)
        return saved_tensor_bytes(
            lambda: model.downstream_losses(batch, with_lower_backbone=True), exclude
        )[1]

    from detectron2.utils.events import EventStorage

    # The probes draw random batches: a forked RNG keeps a resumed run's random stream exact.
    devices = [device] if device.type == "cuda" else []
    try:
        # The detector logs to an event storage in its forward.
        with torch.random.fork_rng(devices=devices), EventStorage(0):
            fits = {"lower_graph": _fit(lower), "downstream_graph": _fit(downstream)}
            fits["curvature_graph"] = _fit(curvature) if hg.CURVATURE != "fisher" else (0.0, 0.0)
    finally:
        model.load_state_dict(snapshot)
        model.train(was_training)

    per_process = {
        "lower": bissl.LOWER.IMS_PER_BATCH // world_size,
        "curvature": check_curvature_batch(cfg, world_size),
        "upper": bissl.UPPER.IMS_PER_BATCH // world_size,
    }
    graph = {
        "lower_graph": fits["lower_graph"][0] + fits["lower_graph"][1] * per_process["lower"],
        "curvature_graph": fits["curvature_graph"][0]
        + fits["curvature_graph"][1] * per_process["curvature"],
        "downstream_graph": fits["downstream_graph"][0]
        + fits["downstream_graph"][1] * per_process["upper"],
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    theta_bytes = _bytes(params)
    # The Fisher history is sharded: each process keeps 1/world of every gradient's coordinates.
    fisher = -(-hg.FISHER_HISTORY * _bytes(theta) // world_size) if hg.CURVATURE == "fisher" else 0
    fisher_on_device = fisher if hg.FISHER_DEVICE == "model" else 0
    vectors = 6 + (hg.BASIS_SIZE if hg.SOLVER == "lanczos" else 0)
    parts = {
        "parameters_and_buffers": _bytes(model.parameters()) + _bytes(model.buffers()),
        "gradients": _bytes(trainable),
        # LARS (lower) and SGD (upper) keep one momentum buffer per trainable tensor.
        "optimizer_state": _bytes(trainable)
        if bissl.LOWER.MOMENTUM > 0 or bissl.UPPER.MOMENTUM > 0
        else 0,
        "fisher_history": fisher_on_device,
        "solver_vectors": vectors * theta_bytes,
        **{k: int(v) for k, v in graph.items()},
    }
    static = (
        parts["parameters_and_buffers"]
        + parts["gradients"]
        + parts["optimizer_state"]
        + parts["fisher_history"]
    )
    upper = parts["curvature_graph"] + parts["downstream_graph"] + parts["solver_vectors"]
    parts["static"] = static
    peak = static + max(parts["lower_graph"], upper)
    return MemoryPlan(
        peak_bytes=int(peak),
        parts=parts,
        per_image={k: v[1] for k, v in fits.items()},
        fixed={k: v[0] for k, v in fits.items()},
        batches=per_process,
        host_bytes={"fisher_history": fisher - fisher_on_device},
    )


def check_stage_memory(plan: MemoryPlan, total_bytes: int, refuse: bool) -> str:
    """Compare ``plan`` with a device of ``total_bytes``; return the verdict line. Raises
    MemoryError (``refuse``) or logs a warning when the stage does not fit."""
    budget = SAFETY * total_bytes
    gib = 2.0**30
    line = (
        f"stage memory plan: peak {plan.peak_bytes / gib:.1f} GiB per process of "
        f"{total_bytes / gib:.1f} GiB ({SAFETY:.0%} usable)"
    )
    if plan.peak_bytes <= budget:
        return line + ": fits"
    largest = plan.largest_curvature_batch(budget)
    p, per = plan.parts, plan.per_image["curvature_graph"]
    rest = budget - p["static"] - p["downstream_graph"] - p["solver_vectors"]
    curvature_only = max(0, int((rest - plan.fixed["curvature_graph"]) / per)) if per > 0 else 0
    message = (
        f"{line}: DOES NOT FIT. The largest pretext batch per process that fits is {largest} "
        f"(BISSL.LOWER.IMS_PER_BATCH {plan.batches['lower']} per process now); keeping the lower "
        f"batch, a curvature batch of up to {curvature_only} per process "
        "(BISSL.HYPERGRAD.IMS_PER_BATCH x processes; GRAPH_DTYPE bfloat16 about halves it); parts: "
        + ", ".join(f"{k} {v / gib:.2f} GiB" for k, v in plan.parts.items() if k != "static")
        + " (BISSL.MEMORY_PLAN 'warn' starts anyway)"
    )
    if refuse:
        raise MemoryError(message)
    logger.warning(message)
    return message
