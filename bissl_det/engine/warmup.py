"""Downstream head warm-up before BiSSL: phi_d trained on the frozen upper backbone.

The authors train the head for a few epochs (detection 5, classification 20) with a constant lr,
the backbone's weights frozen and its BN in training mode (batch statistics): the head is then
fitted to the feature statistics BiSSL's upper steps use. ``BN_MODE: frozen`` is the
alternative (BN in eval mode).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator

import torch
from detectron2.utils import comm
from torch import nn

from ..data.build import downstream_train_size
from ..utils.distributed import all_reduce_grads_

logger = logging.getLogger(__name__)


def warmup_iterations(cfg) -> int:
    """BISSL.HEAD_WARMUP.ITERS, or EPOCHS over the downstream training set."""
    warm = cfg.BISSL.HEAD_WARMUP
    if warm.ITERS > 0:
        return warm.ITERS
    if warm.EPOCHS <= 0:
        return 0
    return math.ceil(warm.EPOCHS * downstream_train_size(cfg) / cfg.BISSL.UPPER.IMS_PER_BATCH)


@contextlib.contextmanager
def frozen_upper_backbone(model: nn.Module, bn_mode: str) -> Iterator[None]:
    """phi without gradients (BN in eval mode for ``bn_mode == "frozen"``); restored after."""
    if bn_mode not in ("train", "frozen"):
        raise ValueError(f"BISSL.HEAD_WARMUP.BN_MODE = {bn_mode!r}: use 'train' or 'frozen'")
    backbone = model.backbone_pairs.upper
    frozen = {id(p) for p in backbone}
    for p in backbone:
        p.requires_grad_(False)
    model.train()
    if bn_mode == "frozen":
        for module in model.upper.modules():
            own = list(module.parameters(recurse=False))
            is_norm = isinstance(module, nn.modules.batchnorm._NormBase)
            if is_norm and own and all(id(p) in frozen for p in own):
                module.eval()
    try:
        yield
    finally:
        for p in backbone:
            p.requires_grad_(True)
        model.train()


def train_head(trainer, iters: int) -> None:
    """``iters`` SGD steps on phi_d (lr / wd default to the upper level's), with ETA lines."""
    warm, upper = trainer.cfg.BISSL.HEAD_WARMUP, trainer.cfg.BISSL.UPPER
    model = trainer.model
    head = list(model.upper_head_parameters())
    optimizer = torch.optim.SGD(
        head,
        lr=upper.BASE_LR if warm.BASE_LR is None else warm.BASE_LR,
        momentum=warm.MOMENTUM,
        weight_decay=upper.WEIGHT_DECAY if warm.WEIGHT_DECAY is None else warm.WEIGHT_DECAY,
    )
    level = "upper (warm-up)"
    start = time.perf_counter()
    with frozen_upper_backbone(model, warm.BN_MODE):
        for it in range(iters):
            trainer.where = (level, it)
            with trainer.divergence_guard(level, it):
                losses = model.downstream_losses(trainer.next_downstream_batch())
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # A NaN on any process stops every process here (flags ride on the all-reduce).
            flags = trainer.fault_flags(loss)
            all_reduce_grads_(head, flags)
            trainer.stop_on_flagged(flags, loss, "head warm-up loss", level, it)
            optimizer.step()
            if comm.is_main_process() and (it % 20 == 0 or it == iters - 1):
                eta = (time.perf_counter() - start) / (it + 1) * (iters - it - 1)
                logger.info(
                    "head warm-up iter %d/%d  loss %.4f  eta %s",
                    it + 1,
                    iters,
                    loss.item(),
                    time.strftime("%H:%M:%S", time.gmtime(eta)),
                )
