"""Cost of a BiSSL stage, as ratios to plain training steps measured in the same run.

Usage::

    python -m benchmarks.bench_bilevel [--device cpu|cuda] [--image-size N] [--quick]
                                       [--out benchmarks/results/<name>.json]

Every figure is a ratio ``time(thing) / time(baseline)``, both medians of ``--repeats`` runs after
``--warmup`` runs, on the same model, the same fixed batches, in the same process. Baselines are
re-measured next to the things they divide (the machine may be shared: ratios drift less than
seconds). Models: a full-width ResNet-50 (Detectron2 names, the quick configs with the standard
R50 widths) with (1) the classification upper level and (2) the Faster R-CNN R50-C4 upper level;
``--quick`` uses the 8x narrower test ResNet for a smoke run.

Figures (see benchmarks/README.md for the definitions and the last results):

* (a) one Hessian-vector product on the retained first-order graph / one pretext forward+backward,
  and the one-time cost of building that graph (``BilevelTrainer.stage_hessian``);
* (b) one upper step / one plain downstream step for K = 0, 1, 5, 10 CG iterations; the upper step
  with the reference code's recomputing products (K = 5); fast / reference; upper step /
  (plain step + K products);
* (c) one stage (N_L lower + N_U upper steps) / (N_L plain pretext steps + N_U plain downstream
  steps);
* (d) peak memory of the upper step / plain downstream step (CUDA: ``max_memory_allocated``;
  CPU: peak RSS of fresh subprocesses minus that of a process that only built the model);
* (e) double-backward product vs ``torch.func`` forward-over-reverse (``functional_hvp``), with
  BatchNorm using batch statistics and not updating running statistics for both;
* (f) each estimator's stage against its floor ``N_L P + 2 N_U D`` (P, D: plain pretext and
  downstream steps measured next to it), where the time above it goes, and the ATen operators
  of one stage (products, solver vector work, the rest);
* options: bf16 autocast of the first-order passes (products and CG stay fp32), channels_last,
  activation checkpointing of every ResNet block, applied by wrapping, not by editing the trainer.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import bissl_det  # noqa: F401  (compat shims before detectron2)
from bissl_det.bilevel import (
    Curvature,
    HessianVectorProduct,
    ProductCurvature,
    RecomputingHessianVectorProduct,
    StageSystem,
    batch_statistics_only,
    functional_hvp,
    tuple_norm,
)
from bissl_det.modeling.memory import checkpoint_resnet_blocks

import torch
from detectron2.utils.events import EventStorage
from torch import nn
from torch.func import functional_call

from .harness import (
    CLOCKS,
    REPO,
    OpCounter,
    cpu_has_bf16,
    machine_info,
    measure,
    ratio,
    synchronize,
    write_json,
)

CONFIGS = {
    "cls": REPO / "configs" / "quick" / "Base-demo-cls.yaml",
    "det": REPO / "configs" / "quick" / "Base-demo-C4.yaml",
}
FULL_R50 = [
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "64",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "256",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "64",
]  # fmt: skip
NARROW_R50 = [
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "16",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "8",
]  # fmt: skip
CG_ITERATIONS = (0, 1, 5, 10)
REFERENCE_K = 5
AMORTISE_OVER = 8  # the authors' N_U: upper steps sharing one first-order graph


# ---- Set-up ----------------------------------------------------------------------------------


def build_cfg(kind: str, args: argparse.Namespace, output_dir: str):
    """The quick config of ``kind`` with the benchmark's sizes (frozen, datasets registered)."""
    from bissl_det.data.detection import register_from_config
    from bissl_det.runtime.setup import load_config

    opts = [
        "OUTPUT_DIR", output_dir,
        "MODEL.DEVICE", args.device,
        *(NARROW_R50 if args.quick else FULL_R50),
        "BISSL.LOWER.IMS_PER_BATCH", str(args.pretext_batch),
        "BISSL.PRETEXT_DATA.AUG.CROP_SIZE", str(args.crop_size),
        # Small lower lr: repeated lower steps on one batch must stay finite, cost is unchanged.
        "BISSL.LOWER.BASE_LR", "0.01",
        "BISSL.HYPERGRAD.TOL", "0.0",
        # Exactly K products per upper step: CG steps on through negative curvature (as the
        # reference does), no monitoring products (true residual, eigenvalue estimate).
        "BISSL.HYPERGRAD.ON_NEGATIVE_CURVATURE", "continue",
        "BISSL.HYPERGRAD.TRUE_RESIDUAL", "False",
        "BISSL.HYPERGRAD.EIGEN_STEPS", "0",
        "BISSL.LOWER_STEPS", str(args.lower_steps),
        "BISSL.UPPER_STEPS", str(args.upper_steps),
    ]  # fmt: skip
    if kind == "det":
        size = str(args.image_size)
        opts += [
            "BISSL.UPPER.IMS_PER_BATCH", str(args.det_batch),
            "INPUT.MIN_SIZE_TRAIN", f"({size},)",
            "INPUT.MAX_SIZE_TRAIN", size,
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", str(args.rois_per_image),
        ]  # fmt: skip
    else:
        opts += [
            "BISSL.UPPER.IMS_PER_BATCH", str(args.cls_batch),
            "CLS.IMAGE_SIZE", str(args.cls_image_size),
        ]  # fmt: skip
    cfg = load_config(str(CONFIGS[kind]), opts)
    register_from_config(cfg)
    cfg.freeze()
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return cfg


class Bench:
    """A BilevelTrainer on fixed batches, and the operations whose cost is measured."""

    def __init__(self, cfg, seed: int = 0):
        from bissl_det.data.build import (
            build_downstream_train_loader,
            build_pretext_loader,
            pretext_batch_to_device,
        )
        from bissl_det.engine.trainer import BilevelTrainer

        torch.manual_seed(seed)
        self.cfg = cfg
        self.trainer = BilevelTrainer(cfg)
        self.model = self.trainer.model
        self.device = self.trainer.device
        self.model.copy_lower_backbone_to_upper()
        self.model.train()
        pretext = next(iter(build_pretext_loader(cfg, cfg.BISSL.LOWER.IMS_PER_BATCH, 0, seed)))
        self.pretext = pretext_batch_to_device(cfg, pretext, self.device)  # normalised floats
        self.downstream = next(
            iter(build_downstream_train_loader(cfg, cfg.BISSL.UPPER.IMS_PER_BATCH, 0, seed + 1))
        )
        # Every variant sees the same data: the trainer's loaders become endless repeats.
        self.trainer._pretext_iter = itertools.repeat(self.pretext)
        self.trainer._downstream_iter = itertools.repeat(self.downstream)
        self.trainer.iter = 0
        self.pretext_params = [p for p in self.model.lower.parameters() if p.requires_grad]

    # -- baselines --

    def pretext_forward_backward(self) -> None:
        for p in self.pretext_params:
            p.grad = None
        self.model.pretext_loss(*self.pretext).backward()

    def plain_pretext_step(self) -> None:
        """Pretext forward+backward + LARS: lower training without the bilevel coupling."""
        self.trainer.lower_optimizer.zero_grad(set_to_none=True)
        self.model.pretext_loss(*self.pretext).backward()
        self.trainer.lower_optimizer.step()

    def plain_downstream_step(self) -> None:
        """Downstream forward+backward + SGD on phi, phi_d: ordinary fine-tuning."""
        optimizer = self.trainer.upper_optimizer
        optimizer.zero_grad(set_to_none=True)
        sum(self.model.downstream_losses(self.downstream).values()).backward()
        optimizer.step()

    # -- bilevel pieces --

    def set_cg_iterations(self, k: int) -> None:
        cfg = self.trainer.cfg
        cfg.defrost()
        cfg.BISSL.HYPERGRAD.MAX_ITER = k
        cfg.freeze()

    def build_hvp(self) -> StageSystem:
        """The trainer's stage system: the Hessian's first-order graph built once."""
        return self.trainer.stage_system()

    def reference_hvp(self) -> RecomputingHessianVectorProduct:
        """The reference code's products: pretext forward + backward + double backward each."""
        lower, batch = self.model.lower, self.pretext

        def closure() -> torch.Tensor:
            buffers = {name: b.clone() for name, b in lower.named_buffers()}
            return functional_call(lower, buffers, batch, strict=False)

        return RecomputingHessianVectorProduct(closure, self.model.backbone_pairs.lower)

    def reference_system(self) -> StageSystem:
        """The trainer's stage system with the reference code's recomputing products."""
        return self.trainer.hypergrad.build_system(ProductCurvature(self.reference_hvp()))

    def upper_step(self, hvp: StageSystem, k: int) -> None:
        self.set_cg_iterations(k)
        hvp.options["max_iter"] = k  # a system built earlier keeps its own options
        with EventStorage(0) as self.trainer.storage:
            self.trainer.upper_step(hvp, 0)

    def stage(self) -> None:
        with EventStorage(0) as self.trainer.storage:
            self.trainer.run_step()

    def random_vector(self) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator(device=self.device).manual_seed(1)
        return tuple(
            torch.randn(p.shape, generator=gen, device=self.device, dtype=p.dtype)
            for p in self.model.backbone_pairs.lower
        )


# ---- Wrappers for the options (no trainer edits) ----------------------------------------------


@contextlib.contextmanager
def bf16_first_order(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Autocast (bf16) the pretext and downstream forward passes the trainer calls by name.

    ``stage_hessian`` calls the lower model directly (not ``pretext_loss``), so the first-order
    graph of the Hessian products, the products and CG stay fp32.
    """

    def autocast(fn):
        def wrapped(*a, **kw):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return fn(*a, **kw)

        return wrapped

    model.pretext_loss = autocast(model.pretext_loss)
    model.downstream_losses = autocast(model.downstream_losses)
    try:
        yield
    finally:
        del model.pretext_loss, model.downstream_losses


@contextlib.contextmanager
def channels_last(bench: Bench) -> Iterator[None]:
    """NHWC weights and pretext inputs (parameter identity is kept by ``Module.to``)."""
    bench.model.to(memory_format=torch.channels_last)
    old = bench.pretext
    bench.pretext = tuple(t.contiguous(memory_format=torch.channels_last) for t in old)
    bench.trainer._pretext_iter = itertools.repeat(bench.pretext)
    try:
        yield
    finally:
        bench.model.to(memory_format=torch.contiguous_format)
        bench.pretext = old
        bench.trainer._pretext_iter = itertools.repeat(old)


@contextlib.contextmanager
def checkpointed_blocks(model: nn.Module) -> Iterator[None]:
    """BISSL.ACTIVATION_CHECKPOINTING: every trainable ResNet block of both levels."""
    restore = checkpoint_resnet_blocks(model)
    try:
        yield
    finally:
        restore()


# ---- Benchmarks ------------------------------------------------------------------------------


def bench_model(bench: Bench, args: argparse.Namespace, log: Callable[[str], None]) -> dict:
    dev, rep, warm = bench.device, args.repeats, args.warmup
    out: dict = {"timings": {}, "ratios": {}}
    t, r = out["timings"], out["ratios"]

    def run(name: str, fn: Callable[[], object], repeats: int = rep, warmup: int = warm) -> dict:
        t[name] = measure(fn, dev, repeats, warmup)
        log(f"  {name:<34} {t[name]['median_s']:8.3f} s  {t[name]['times_s']}")
        return t[name]

    if args.floor_only:
        out["floor"] = bench_floor(bench, args, t, r, log)
        return out

    # (a) one product vs one pretext forward+backward; one-time graph build.
    run("pretext_fwd_bwd", bench.pretext_forward_backward)
    run("plain_downstream_step", bench.plain_downstream_step)
    holder: list = []

    def build() -> None:
        if holder:
            holder.pop().release()
        holder.append(bench.build_hvp())

    run("hvp_build", build)
    hvp = holder.pop()
    v = bench.random_vector()
    run("hvp_retained", lambda: hvp.curvature.matvec(v))
    r["hvp_over_pretext_fwd_bwd"] = ratio(t["hvp_retained"], t["pretext_fwd_bwd"])
    r["hvp_build_over_pretext_fwd_bwd"] = ratio(t["hvp_build"], t["pretext_fwd_bwd"])

    # (b) upper step for K CG iterations, fast and reference.
    for k in CG_ITERATIONS:
        run(f"upper_step_K{k}", lambda k=k: bench.upper_step(hvp, k), args.step_repeats, 0)
        r[f"upper_K{k}_over_plain"] = ratio(t[f"upper_step_K{k}"], t["plain_downstream_step"])
    hvp.release()
    ref = bench.reference_system()
    run(
        f"upper_step_reference_K{REFERENCE_K}",
        lambda: bench.upper_step(ref, REFERENCE_K),
        args.step_repeats,
        0,
    )
    run("plain_downstream_step_again", bench.plain_downstream_step)
    fast, slow = t[f"upper_step_K{REFERENCE_K}"], t[f"upper_step_reference_K{REFERENCE_K}"]
    r[f"upper_reference_K{REFERENCE_K}_over_plain"] = ratio(slow, t["plain_downstream_step"])
    r["fast_over_reference_per_step"] = ratio(fast, slow)
    amortised = fast["median_s"] + t["hvp_build"]["median_s"] / AMORTISE_OVER
    r[f"fast_over_reference_amortised_NU{AMORTISE_OVER}"] = amortised / slow["median_s"]
    r[f"upper_K{REFERENCE_K}_over_plain_plus_K_hvp"] = fast["median_s"] / (
        t["plain_downstream_step"]["median_s"] + REFERENCE_K * t["hvp_retained"]["median_s"]
    )

    # (c) one whole stage vs the same number of plain steps.
    bench.set_cg_iterations(REFERENCE_K)
    run("plain_pretext_step", bench.plain_pretext_step)
    run("stage", bench.stage, repeats=args.stage_repeats, warmup=0)
    n_l, n_u = bench.cfg.BISSL.LOWER_STEPS, bench.cfg.BISSL.UPPER_STEPS
    plain = n_l * t["plain_pretext_step"]["median_s"] + n_u * t["plain_downstream_step"]["median_s"]
    r["stage_over_plain_steps"] = t["stage"]["median_s"] / plain
    out["stage_steps"] = {"N_L": n_l, "N_U": n_u, "cg_iterations": REFERENCE_K}

    # (e) double backward vs torch.func forward-over-reverse, BN on batch statistics for both.
    with batch_statistics_only(bench.model.lower):
        out["functional"] = bench_functional(bench, run)
    r["functional_over_retained_hvp"] = ratio(t["hvp_func"], t["hvp_retained_batchstat_bn"])
    r["functional_over_recomputing_hvp"] = ratio(t["hvp_func"], t["hvp_recomputing_batchstat_bn"])
    if not args.skip_options:
        out["option_notes"] = bench_options(bench, run, t, r)
    if not args.skip_floor:
        out["floor"] = bench_floor(bench, args, t, r, log)
    return out


def bench_functional(bench: Bench, run) -> dict:
    lower, pairs = bench.model.lower, bench.model.backbone_pairs
    names = {id(p): n for n, p in lower.named_parameters()}
    params = {names[id(p)]: p for p in pairs.lower}
    v = bench.random_vector()
    retained = HessianVectorProduct(lower(*bench.pretext), pairs.lower)
    run("hvp_retained_batchstat_bn", lambda: retained(v))
    recomputing = RecomputingHessianVectorProduct(lambda: lower(*bench.pretext), pairs.lower)
    run("hvp_recomputing_batchstat_bn", lambda: recomputing(v), warmup=0)

    def func() -> tuple[torch.Tensor, ...]:
        return functional_hvp(lower, lambda loss: loss, params, v, args=bench.pretext)

    run("hvp_func", func, warmup=1)
    a, b = retained(v), func()
    diff = tuple_norm(tuple(x - y for x, y in zip(a, b, strict=True))).item()
    retained.release()
    return {"relative_difference": diff / max(tuple_norm(a).item(), 1e-30)}


def bench_options(bench: Bench, run, t: dict, r: dict) -> dict:
    """bf16 autocast, channels_last, checkpointing: the same measurements, wrapped."""
    dev = bench.device
    notes: dict = {}
    measured = (
        "pretext_fwd_bwd",
        "plain_downstream_step",
        "hvp_build",
        "hvp_retained",
        f"upper_step_K{REFERENCE_K}",
    )

    def core(tag: str) -> None:
        run(f"pretext_fwd_bwd_{tag}", bench.pretext_forward_backward)
        run(f"plain_downstream_step_{tag}", bench.plain_downstream_step)
        holder: list = []
        run(f"hvp_build_{tag}", lambda: holder.append(bench.build_hvp()), repeats=1, warmup=0)
        hvp = holder.pop()
        v = bench.random_vector()
        run(f"hvp_retained_{tag}", lambda: hvp.curvature.matvec(v))
        run(
            f"upper_step_K{REFERENCE_K}_{tag}",
            lambda: bench.upper_step(hvp, REFERENCE_K),
            repeats=1,
            warmup=0,
        )
        hvp.release()

    # fp32 baselines again, right next to the options (a shared machine drifts).
    core("fp32")
    variants = {
        "bf16": lambda: bf16_first_order(bench.model, dev),
        "channels_last": lambda: channels_last(bench),
        "checkpoint": lambda: checkpointed_blocks(bench.model),
    }
    if dev.type == "cpu" and not cpu_has_bf16():
        notes["bf16"] = "CPU without avx512_bf16/amx_bf16: bf16 is emulated"
    for tag, make in variants.items():
        try:
            with make():
                core(tag)
        except Exception as e:  # a failing option is a result, not a crash of the benchmark
            notes[tag] = f"failed: {type(e).__name__}: {e}"[:300]
            continue
        for name in measured:
            r[f"option_{tag}/{name}"] = ratio(t[f"{name}_{tag}"], t[f"{name}_fp32"])
    return notes


# ---- (f) operator counts, and the whole stage against its floor --------------------------------

# BISSL.HYPERGRAD of the estimators whose whole stage is put against its floor. "default" is the
# config's estimator (Hessian, CG 5, truncate) without its diagnostics, which cost products
# (TRUE_RESIDUAL: one per upper step, EIGEN_STEPS: 8 per stage); "default+diagnostics" with them.
FLOOR_ESTIMATORS = {
    "default": {"CURVATURE": "hessian", "SOLVER": "cg", "MAX_ITER": 5,
                "ON_NEGATIVE_CURVATURE": "truncate", "TRUE_RESIDUAL": False, "EIGEN_STEPS": 0},
    "default+diagnostics": {"CURVATURE": "hessian", "SOLVER": "cg", "MAX_ITER": 5,
                            "ON_NEGATIVE_CURVATURE": "truncate", "TRUE_RESIDUAL": True,
                            "EIGEN_STEPS": 8},
    # Gauss-Newton products with J v by the double-backward trick (GGN_JV before it had a
    # choice: every committed "ggn+lanczos" figure) and by forward mode (the default since).
    **{f"ggn{tag}+lanczos{m}": {"CURVATURE": "ggn", "GGN_JV": jv, "SOLVER": "lanczos",
                                "BASIS_SIZE": m, "MAX_ITER": 0, "TRUE_RESIDUAL": False,
                                "EIGEN_STEPS": 0}
       for tag, jv in (("", "double_backward"), ("_fwd", "forward")) for m in (5, 4, 3)},
}  # fmt: skip
# (f)'s default rows; smaller Lanczos bases are there to be named (--estimators).
FLOOR_DEFAULT = ("default", "default+diagnostics", "ggn+lanczos5", "ggn_fwd+lanczos5")
FLOOR_GOAL = 1.15  # issue 18: a stage within 15 % of N_L P + 2 N_U D


@contextlib.contextmanager
def counting_ops() -> Iterator[dict]:
    """Operators run inside (views excluded, see :class:`OpCounter`), filled in when the block
    ends: ``total``; ``curvature_products`` (inside ``Curvature.matvec``); ``solver_vectors``
    (inside ``StageSystem.solve`` but not in a product: the Krylov/Lanczos vector work); and
    ``steps`` (the rest: passes, optimisers, the curvature graph's build)."""
    counts: dict = {}
    matvec, solve = Curvature.matvec, StageSystem.solve
    in_products, in_solves = OpCounter(), OpCounter()

    calls = {in_products: 0, in_solves: 0}

    def counted(counter: OpCounter, fn: Callable) -> Callable:
        def wrapped(*a, **kw):
            calls[counter] += 1
            with counter:  # nested: the enclosing counters see these operators too
                return fn(*a, **kw)

        return wrapped

    Curvature.matvec = counted(in_products, matvec)
    StageSystem.solve = counted(in_solves, solve)
    try:
        with OpCounter() as total:
            yield counts
    finally:
        Curvature.matvec, StageSystem.solve = matvec, solve
    counts.update(
        products=calls[in_products],
        solves=calls[in_solves],
        total=total.ops,
        curvature_products=in_products.ops,
        solver_vectors=in_solves.ops - in_products.ops,
        steps=total.ops - in_solves.ops,
        most_frequent=dict(total.by_name.most_common(8)),
    )


@contextlib.contextmanager
def timing_parts(bench: Bench, clock: Callable[[], float]) -> Iterator[dict]:
    """Wall time of the stage's parts (summed over its steps): lower steps, the curvature build
    (``stage_system``), upper steps and, inside them, the solves (products included)."""
    parts = dict.fromkeys(("lower_steps", "curvature_build", "upper_steps", "solves"), 0.0)
    trainer = bench.trainer

    def timed(name: str, fn: Callable) -> Callable:
        def wrapped(*a, **kw):
            synchronize(bench.device)
            start = clock()
            try:
                return fn(*a, **kw)
            finally:
                synchronize(bench.device)
                parts[name] += clock() - start

        return wrapped

    solve = StageSystem.solve
    trainer.lower_step = timed("lower_steps", trainer.lower_step)
    trainer.stage_system = timed("curvature_build", trainer.stage_system)
    trainer.upper_step = timed("upper_steps", trainer.upper_step)
    StageSystem.solve = timed("solves", solve)
    try:
        yield parts
    finally:
        del trainer.lower_step, trainer.stage_system, trainer.upper_step
        StageSystem.solve = solve


def configure_estimator(bench: Bench, settings: dict) -> dict:
    """Set BISSL.HYPERGRAD keys and rebuild the trainer's Hypergradient; returns the old values."""
    from bissl_det.engine.hypergrad import Hypergradient

    cfg = bench.trainer.cfg
    old = {key: cfg.BISSL.HYPERGRAD[key] for key in settings}
    cfg.defrost()
    for key, value in settings.items():
        cfg.BISSL.HYPERGRAD[key] = value
    cfg.freeze()
    bench.trainer.hypergrad = Hypergradient(cfg, bench.model)
    return old


def bench_floor(bench: Bench, args: argparse.Namespace, t: dict, r: dict, log) -> dict:
    """Each estimator's stage against ``N_L P + 2 N_U D`` (P, D measured next to it, on
    ``--clock``), its operator counts and where the time above the floor goes."""
    n_l, n_u = bench.cfg.BISSL.LOWER_STEPS, bench.cfg.BISSL.UPPER_STEPS
    clock = CLOCKS[args.clock]

    def run(name: str, fn: Callable[[], object], repeats: int, warmup: int) -> float:
        t[name] = measure(fn, bench.device, repeats, warmup, clock)
        log(f"  {name:<34} {t[name]['median_s']:8.3f} s  {t[name]['times_s']} ({args.clock})")
        return t[name]["median_s"]

    out = {}
    for name in args.estimators.split(","):
        settings = FLOOR_ESTIMATORS[name]
        old = configure_estimator(bench, settings)
        try:
            p = run(f"P_{name}", bench.plain_pretext_step, args.repeats, args.warmup)
            d = run(f"D_{name}", bench.plain_downstream_step, args.repeats, args.warmup)
            with timing_parts(bench, clock) as parts:
                stage = run(f"stage_{name}", bench.stage, args.stage_repeats, 0)
            # The parts are sums over the repeats: put them against the mean stage.
            parts = {k: v / args.stage_repeats for k, v in parts.items()}
            stage_mean = statistics.mean(t[f"stage_{name}"]["times_s"])
            with counting_ops() as ops:
                bench.stage()
        finally:
            configure_estimator(bench, old)
        floor, plain = n_l * p + 2 * n_u * d, n_l * p + n_u * d
        rest = {  # seconds per stage above the floor, by part
            "lower_steps_minus_N_L_P": parts["lower_steps"] - n_l * p,
            "curvature_build": parts["curvature_build"],
            "solves": parts["solves"],
            "upper_steps_minus_solves_minus_2_N_U_D": parts["upper_steps"]
            - parts["solves"]
            - 2 * n_u * d,
            "outside_the_steps": stage_mean - sum(parts[k] for k in ("lower_steps",
                                                                     "curvature_build",
                                                                     "upper_steps")),
        }  # fmt: skip
        out[name] = {
            "settings": settings,
            "P_s": p,
            "D_s": d,
            "clock": args.clock,
            "stage_s": stage,
            "floor_s": floor,
            "stage_over_floor": stage / floor,
            "stage_over_plain_steps": stage / plain,
            "floor_over_plain_steps": floor / plain,
            "within_goal": stage / floor <= FLOOR_GOAL,
            "stage_mean_s": stage_mean,
            "parts_s": parts,
            "above_floor_s": rest,
            "ops_per_stage": ops,
        }
        r[f"stage_{name}_over_floor"] = stage / floor
        log(
            f"  {name}: stage {stage:.3f} s / floor (N_L P + 2 N_U D = {n_l} x {p:.3f} + "
            f"2 x {n_u} x {d:.3f}) {floor:.3f} s = {stage / floor:.3f}; {ops['products']} "
            f"products; ops {ops['total']}, {ops['solver_vectors']} of them solver vector work"
        )
    return out


# ---- (d) peak memory -------------------------------------------------------------------------

MEMORY_THINGS = ("baseline", "plain", "upper", "upper_reference", "upper_checkpoint")


def run_memory_thing(bench: Bench, thing: str) -> None:
    """What one memory measurement runs (twice: optimiser state exists from the first run)."""
    if thing == "baseline":
        return
    if thing == "plain":
        for _ in range(2):
            bench.plain_downstream_step()
        return
    if thing == "upper_reference":
        for _ in range(2):
            bench.upper_step(bench.reference_system(), REFERENCE_K)
        return
    wrap = (
        checkpointed_blocks(bench.model)
        if thing == "upper_checkpoint"
        else contextlib.nullcontext()
    )
    with wrap:
        for _ in range(2):
            hvp = bench.build_hvp()
            bench.upper_step(hvp, REFERENCE_K)
            hvp.release()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process.

    Linux: VmHWM of /proc/self/status. ru_maxrss would do, except that Linux carries the parent's
    peak across fork+exec into the child's ru_maxrss, hiding the child's own peak.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def memory_child(args: argparse.Namespace) -> None:
    """Subprocess entry point: build, run one thing, print the peak RSS as JSON."""
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(build_cfg(args.model, args, tmp))
        with EventStorage(0) as bench.trainer.storage:
            run_memory_thing(bench, args.memory_child)
    print(json.dumps({"peak_rss_bytes": peak_rss_bytes()}))


def child_args(args: argparse.Namespace, kind: str, thing: str) -> list[str]:
    keep = ("device", "image_size", "crop_size", "pretext_batch", "det_batch", "cls_batch",
            "cls_image_size", "rois_per_image", "lower_steps", "upper_steps",
            "threads")  # fmt: skip
    argv = [sys.executable, "-m", "benchmarks.bench_bilevel", "--memory-child", thing]
    argv += ["--model", kind]
    for key in keep:
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return argv + (["--quick"] if args.quick else [])


def bench_memory_cpu(kind: str, args: argparse.Namespace, log) -> dict:
    """Peak RSS of fresh processes, minus that of one that only built the model and batches."""
    things = MEMORY_THINGS if args.memory_extras else MEMORY_THINGS[:3]
    peaks = {}
    for thing in things:
        done = subprocess.run(
            child_args(args, kind, thing), capture_output=True, text=True, cwd=REPO, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"memory child {kind}/{thing} failed:\n{done.stderr[-3000:]}")
        peaks[thing] = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
        log(f"  peak RSS {thing:<18} {peaks[thing] / 2**20:9.1f} MiB")
    return {"method": "cpu_peak_rss_subprocess", "peak_bytes": peaks}


def bench_memory_cuda(bench: Bench, args: argparse.Namespace, log) -> dict:
    """max_memory_allocated above what was allocated before the thing (model, batches, state)."""
    peaks = {}
    things = MEMORY_THINGS if args.memory_extras else MEMORY_THINGS[:3]
    for thing in things:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_memory_thing(bench, thing)
        torch.cuda.synchronize()
        peaks[thing] = torch.cuda.max_memory_allocated() - before
        log(f"  peak alloc {thing:<16} {peaks[thing] / 2**20:9.1f} MiB above start")
    return {"method": "cuda_max_memory_allocated_minus_start", "peak_bytes": peaks}


def memory_ratios(memory: dict) -> dict:
    peaks = memory["peak_bytes"]
    base = peaks["baseline"] if memory["method"].startswith("cpu") else 0
    plain = max(peaks["plain"] - base, 1)
    return {
        f"memory_{k}_over_plain": (v - base) / plain for k, v in peaks.items() if k != "baseline"
    }


# ---- Report ----------------------------------------------------------------------------------

GOALS = {
    "fast_over_reference_per_step": "<= 0.6",
    f"fast_over_reference_amortised_NU{AMORTISE_OVER}": "<= 0.6",
    f"upper_K{REFERENCE_K}_over_plain_plus_K_hvp": "<= 4",
}


def format_table(results: dict) -> str:
    lines = [f"{'model':<5} {'figure':<46} {'ratio':>8}  goal", "-" * 70]
    for kind, res in results["models"].items():
        for name, value in res["ratios"].items():
            goal = GOALS.get(name, "")
            if goal:
                ok = value <= float(goal.split()[-1])
                goal = f"{goal} {'met' if ok else 'MISSED'}"
            lines.append(f"{kind:<5} {name:<46} {value:8.3f}  {goal}")
        for name, note in res.get("option_notes", {}).items():
            lines.append(f"{kind:<5} option {name}: {note}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--image-size", type=int, default=128, help="detection image size (px)")
    p.add_argument("--crop-size", type=int, default=64, help="pretext crop size (px)")
    p.add_argument("--pretext-batch", type=int, default=8)
    p.add_argument("--det-batch", type=int, default=2)
    p.add_argument("--cls-batch", type=int, default=8)
    p.add_argument("--cls-image-size", type=int, default=64)
    p.add_argument("--rois-per-image", type=int, default=16, help="ROI_HEADS.BATCH_SIZE_PER_IMAGE")
    p.add_argument("--lower-steps", type=int, default=4, help="N_L of the measured stage")
    p.add_argument("--upper-steps", type=int, default=2, help="N_U of the measured stage")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--step-repeats", type=int, default=2, help="repeats of upper steps")
    p.add_argument("--stage-repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--clock", default="wall", choices=tuple(CLOCKS),
                   help="(f): cpu = process time (one thread, shared machine)")  # fmt: skip
    p.add_argument("--models", default="cls,det", help="comma-separated: cls, det")
    p.add_argument("--quick", action="store_true", help="narrow test ResNet: a smoke run")
    p.add_argument("--skip-options", action="store_true", help="no bf16/channels_last/checkpoint")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-floor", action="store_true", help="no (f)")
    p.add_argument("--estimators", default=",".join(FLOOR_DEFAULT),
                   help=f"(f), comma-separated: {', '.join(FLOOR_ESTIMATORS)}")  # fmt: skip
    p.add_argument("--floor-only", action="store_true",
                   help="only (f): stages against N_L P + 2 N_U D, op counts")  # fmt: skip
    p.add_argument("--memory-extras", action="store_true",
                   help="also the reference and checkpointed upper steps' memory")  # fmt: skip
    p.add_argument("--out", default="", help="JSON output file")
    p.add_argument(
        "--memory-child", default="", choices=("", *MEMORY_THINGS), help=argparse.SUPPRESS
    )
    p.add_argument("--model", default="cls", choices=tuple(CONFIGS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.estimators.split(",")) - set(FLOOR_ESTIMATORS)
    if unknown:
        p.error(f"--estimators: unknown {sorted(unknown)}; valid: {sorted(FLOOR_ESTIMATORS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.chdir(REPO)  # the quick configs name their data relative to the repository
    if args.memory_child:
        memory_child(args)
        return {}
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)

    results: dict = {
        "machine": machine_info(device),
        "load_average_start": os.getloadavg(),
        "args": vars(args),
        "models": {},
    }
    for kind in args.models.split(","):
        log(f"model {kind} ({'narrow' if args.quick else 'full-width'} ResNet-50)")
        with tempfile.TemporaryDirectory() as tmp:
            bench = Bench(build_cfg(kind, args, tmp))
            # The detector logs to an event storage in its forward.
            with EventStorage(0) as bench.trainer.storage:
                res = bench_model(bench, args, log)
                if not args.skip_memory and device.type == "cuda":
                    res["memory"] = bench_memory_cuda(bench, args, log)
            if not args.skip_memory:
                if device.type == "cpu":
                    del bench  # the children measure; this process's memory is not theirs
                    res["memory"] = bench_memory_cpu(kind, args, log)
                res["ratios"].update(memory_ratios(res["memory"]))
        results["models"][kind] = res
    results["load_average_end"] = os.getloadavg()
    results["total_s"] = time.perf_counter() - start
    table = format_table(results)
    print(table)
    print(f"load average start {results['load_average_start']} end {results['load_average_end']}; "
          f"total {results['total_s']:.0f} s")  # fmt: skip
    if args.out:
        write_json(args.out, results, device)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
