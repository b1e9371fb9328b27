"""SimCLR: NT-Xent over two augmented views, negatives gathered from every process."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from bissl_det.utils.distributed import gather_with_grad, rank

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .projection import ProjectionMLP

__all__ = ["SimCLR", "nt_xent_loss"]


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float = 0.5, gather: bool = True) -> Tensor:
    """Normalised-temperature cross entropy (SimCLR).

    Anchors are this process's ``2n`` embeddings (both views); candidates are all ``2N``
    embeddings of the global batch (``N = n * world_size``), laid out as
    ``[view1 of every process, view2 of every process]``. Each anchor's positive is the other view
    of the same image, its own position is masked out, and the loss is the mean over local
    anchors. Averaging this loss over processes (and gradients via an all-reduce mean) gives the
    single-process loss on the global batch.

    Args:
        z1: Embeddings of view 1, shape ``(n, d)``.
        z2: Embeddings of view 2, shape ``(n, d)``.
        temperature: Softmax temperature (> 0).
        gather: Use the other processes' embeddings as candidates (no effect in one process).

    Returns:
        Scalar loss.
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"nt_xent_loss needs two (n, d) tensors of equal shape, got {tuple(z1.shape)} "
            f"and {tuple(z2.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"nt_xent_loss: temperature must be > 0, got {temperature}")
    n = z1.shape[0]
    z1 = F.normalize(z1, dim=1)
    z2 = F.normalize(z2, dim=1)
    if gather:
        # One collective for both views keeps the order of collectives trivially identical across
        # processes, also in the double backward.
        both = gather_with_grad(torch.cat([z1, z2], dim=1))
        c1, c2 = both.chunk(2, dim=1)
        offset = rank() * n
    else:
        c1, c2 = z1, z2
        offset = 0
    big_n = c1.shape[0]
    candidates = torch.cat([c1, c2], dim=0)  # (2N, d)
    anchors = torch.cat([z1, z2], dim=0)  # (2n, d)
    logits = anchors @ candidates.t() / temperature

    local = torch.arange(n, device=z1.device) + offset
    self_idx = torch.cat([local, local + big_n])
    pos_idx = torch.cat([local + big_n, local])
    rows = torch.arange(2 * n, device=z1.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, self_idx] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(logits, pos_idx)


class SimCLR(nn.Module):
    """Encoder + projector trained with :func:`nt_xent_loss`.

    Both views go through the encoder as one batch (as in the original SimCLR), so BatchNorm
    statistics are shared across views.

    Args:
        encoder: Maps images ``(N, 3, H, W)`` to pooled features ``(N, feat_dim)``.
        feat_dim: Encoder output width.
        projector_dims: Projector widths; the first must equal ``feat_dim``.
        temperature: NT-Xent temperature.
        gather: Gather embeddings across processes for negatives.
    """

    def __init__(
        self,
        encoder: nn.Module,
        feat_dim: int = 2048,
        projector_dims: Sequence[int] = (2048, 256, 256, 256),
        temperature: float = 0.5,
        gather: bool = True,
    ) -> None:
        super().__init__()
        if projector_dims[0] != feat_dim:
            raise ValueError(
                f"SimCLR: projector_dims[0] ({projector_dims[0]}) must equal feat_dim ({feat_dim})"
            )
        if not temperature > 0:
            raise ValueError(f"SimCLR: temperature must be > 0, got {temperature}")
        self.encoder = encoder
        self.projector = ProjectionMLP(projector_dims, last_bias=False)
        self.temperature = float(temperature)
        self.gather = gather

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """The pretext head (theta_p): the projector's parameters."""
        return self.projector.parameters()

    def forward(self, view1: Tensor, view2: Tensor) -> Tensor:
        """Return the NT-Xent loss of two batches of views (same shape)."""
        if view1.shape != view2.shape:
            raise ValueError(
                f"SimCLR: views must have equal shapes, got {tuple(view1.shape)} "
                f"and {tuple(view2.shape)}"
            )
        z = self.projector(self.encoder(torch.cat([view1, view2], dim=0)))
        z1, z2 = z.chunk(2, dim=0)
        return nt_xent_loss(z1, z2, self.temperature, gather=self.gather)
