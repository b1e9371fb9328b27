"""Multi-process runs of the real trainers, launched as the tools launch them, and their replicas.

Every worker goes through the tools' ``setup`` (so rank r is seeded SEED + r, as in a real run),
builds the trainer, trains, and saves its own model state as ``OUTPUT_DIR/replica_rank<r>.pt``:
the tests compare those files across ranks (and against a one-process run).
"""

from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


def replica_file(output_dir: Path | str, rank: int) -> Path:
    return Path(output_dir) / f"replica_rank{rank}.pt"


def build_trainer(tool: str, cfg):
    if tool == "train_bissl":
        from bissl_det.engine import BilevelTrainer

        return BilevelTrainer(cfg)
    if tool == "pretrain_ssl":
        from bissl_det.engine.pretrain import PretrainTrainer

        return PretrainTrainer(cfg)
    raise ValueError(tool)


def error_file(output_dir: Path | str, rank: int) -> Path:
    return Path(output_dir) / f"error_rank{rank}.txt"


def fault_time_file(output_dir: Path | str) -> Path:
    return Path(output_dir) / "fault_time.txt"


def inject(trainer, fault: tuple[str, int, int]) -> None:
    """``fault = (kind, rank, call)``: on ``rank`` only, the ``call``-th (1-based) pretext loss
    becomes NaN (kind "nan") or the ``call``-th downstream batch raises (kind "error")."""
    from detectron2.utils import comm

    kind, rank, call = fault
    if comm.get_rank() != rank:
        return
    name = {"nan": "pretext_loss", "error": "next_downstream_batch"}[kind]
    owner = trainer.model if kind == "nan" else trainer
    original, count = getattr(owner, name), [0]

    def faulty(*args, **kwargs):
        count[0] += 1
        out = original(*args, **kwargs)
        if count[0] == call:
            fault_time_file(trainer.cfg.OUTPUT_DIR).write_text(str(time.time()))
            if kind == "error":
                raise OSError("injected data error: image file truncated")
            return out * float("nan")
        return out

    setattr(owner, name, faulty)


def train_and_dump(
    tool: str, config_file: str, opts: list[str], resume: bool, fault: tuple | None = None
) -> None:
    """The ``main`` of a training tool, plus a dump of this rank's model state.

    An exception is written to ``error_rank<r>.txt`` (with the time) and raised again: the
    process exits non-zero."""
    from bissl_det.runtime.setup import setup

    from detectron2.utils import comm

    torch.set_num_threads(1)
    args = argparse.Namespace(
        config_file=config_file, opts=list(opts), resume=resume, eval_only=False
    )
    cfg = setup(args, tool)
    trainer = build_trainer(tool, cfg)
    trainer.resume_or_load(resume=resume)
    if fault is not None:
        inject(trainer, fault)
    try:
        trainer.train()
    except Exception as err:
        text = f"{time.time()}\n{type(err).__name__}: {err}\n{traceback.format_exc()}"
        error_file(cfg.OUTPUT_DIR, comm.get_rank()).write_text(text)
        raise
    state = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
    torch.save(state, replica_file(cfg.OUTPUT_DIR, comm.get_rank()))


def run(
    world: int,
    tool: str,
    config_file: Path,
    output_dir: Path,
    *opts: str,
    resume: bool = False,
    fault: tuple | None = None,
):
    """``tool``'s training in ``world`` gloo processes (or in this process for 1)."""
    from bissl_det.runtime.launch import launch

    args = (tool, str(config_file), ["OUTPUT_DIR", str(output_dir), *opts], resume, fault)
    if world == 1:
        threads = torch.get_num_threads()
        try:
            train_and_dump(*args)
        finally:
            torch.set_num_threads(threads)
        return
    launch(train_and_dump, world, dist_url="auto", args=args)


def floating_differences(output_dir: Path, world: int) -> tuple[list[str], int]:
    """Names of the floating-point tensors in which any rank differs from rank 0, and the count
    of floating-point tensors."""
    states = [torch.load(replica_file(output_dir, r), weights_only=True) for r in range(world)]
    names = [k for k, v in states[0].items() if v.is_floating_point()]
    differ = [k for k in names if any(not torch.equal(s[k], states[0][k]) for s in states[1:])]
    return differ, len(names)
