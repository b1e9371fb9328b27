"""Memory option of the ResNet for large runs (BISSL.ACTIVATION_CHECKPOINTING)."""

from __future__ import annotations

from collections.abc import Callable

from detectron2.layers import CNNBlockBase
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint


class _CheckpointedForward:
    """A block's forward that keeps no activations and recomputes them in backward.

    Two things a plain ``checkpoint(block.forward, x)`` gets wrong here: (1) the recomputation
    happens after ``functional_call`` (the upper loss on theta, the Hessian batch) has put the
    module's own tensors back, so it would differentiate the wrong weights: the tensors of the
    forward are passed explicitly; (2) it would update BatchNorm running statistics twice: the
    recomputation writes to copies.
    """

    def __init__(self, block: nn.Module):
        self.block = block
        self.inside = False

    def __call__(self, x: Tensor) -> Tensor:
        if self.inside:  # functional_call below calls the block again
            return type(self.block).forward(self.block, x)
        runs = 0

        def run(x, params, buffers):
            nonlocal runs
            if runs:
                buffers = {name: b.clone() for name, b in buffers.items()}
            runs += 1
            self.inside = True
            try:
                return functional_call(self.block, {**params, **buffers}, (x,))
            finally:
                self.inside = False

        params, buffers = dict(self.block.named_parameters()), dict(self.block.named_buffers())
        # Non-reentrant: the double backward of the Hessian-vector products works through it.
        return checkpoint(run, x, params, buffers, use_reentrant=False)


def checkpoint_resnet_blocks(model: nn.Module) -> Callable[[], None]:
    """Recompute the activations of every trainable ResNet block (stem included) in backward.

    Costs one more forward per block and backward; saves the blocks' activations. Frozen blocks
    (BYOL's target, frozen stages) are left alone: they run without a graph anyway.

    Returns:
        A function that restores the plain forwards.
    """
    blocks = [
        m
        for m in model.modules()
        if isinstance(m, CNNBlockBase) and any(p.requires_grad for p in m.parameters())
    ]
    for block in blocks:
        block.forward = _CheckpointedForward(block)

    def restore() -> None:
        for block in blocks:
            del block.forward

    return restore
