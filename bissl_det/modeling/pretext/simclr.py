"""SimCLR: NT-Xent over two augmented views, negatives gathered from every process."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from bissl_det.utils.distributed import gather_with_grad, rank

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .projection import ProjectionMLP

__all__ = ["SimCLR", "nt_xent_logits", "nt_xent_loss"]


def nt_xent_logits(
    z1: Tensor, z2: Tensor, temperature: float = 0.5, gather: bool = True
) -> tuple[Tensor, Tensor]:
    """Similarity logits of NT-Xent and each anchor's positive: the loss is their cross entropy.

    Anchors are this process's ``2n`` embeddings (both views); candidates are all ``2N``
    embeddings of the global batch (``N = n * world_size``), laid out as
    ``[view1 of every process, view2 of every process]``. Each anchor's positive is the other view
    of the same image; its own position is masked out with ``-inf``.

    Split from :func:`nt_xent_loss` because the cross entropy is convex in these logits, which is
    what the Gauss-Newton curvature (:mod:`bissl_det.bilevel.curvature`) needs.

    Args:
        z1: Embeddings of view 1, shape ``(n, d)``.
        z2: Embeddings of view 2, shape ``(n, d)``.
        temperature: Softmax temperature (> 0).
        gather: Use the other processes' embeddings as candidates (no effect in one process).

    Returns:
        ``logits`` of shape ``(2n, 2N)`` (cosine similarities / temperature, self entries
        ``-inf``) and ``positives`` of shape ``(2n,)``, the column of each row's positive.
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
    positives = torch.cat([local + big_n, local])
    rows = torch.arange(2 * n, device=z1.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, self_idx] = True
    return logits.masked_fill(self_mask, float("-inf")), positives


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float = 0.5, gather: bool = True) -> Tensor:
    """Normalised-temperature cross entropy (SimCLR), the mean over this process's anchors.

    Averaging this loss over processes (and gradients via an all-reduce mean) gives the
    single-process loss on the global batch. Arguments as in :func:`nt_xent_logits`.

    Returns:
        Scalar loss.
    """
    return F.cross_entropy(*nt_xent_logits(z1, z2, temperature, gather))


class SimCLR(nn.Module):
    """Encoder + projector trained with :func:`nt_xent_loss`.

    By default both views go through the encoder as one batch (as in the original SimCLR), so
    BatchNorm statistics are shared across views; ``separate_views`` encodes them one after the
    other (per-view statistics, as the BiSSL authors' code does).

    Args:
        encoder: Maps images ``(N, 3, H, W)`` to pooled features ``(N, feat_dim)``.
        feat_dim: Encoder output width.
        projector_dims: Projector widths; the first must equal ``feat_dim``.
        temperature: NT-Xent temperature.
        gather: Gather embeddings across processes for negatives.
        separate_views: Encode the two views as two batches instead of one.
    """

    def __init__(
        self,
        encoder: nn.Module,
        feat_dim: int = 2048,
        projector_dims: Sequence[int] = (2048, 256, 256, 256),
        temperature: float = 0.5,
        gather: bool = True,
        separate_views: bool = False,
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
        self.separate_views = separate_views

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """The pretext head (theta_p): the projector's parameters."""
        return self.projector.parameters()

    def embed(self, view1: Tensor, view2: Tensor) -> tuple[Tensor, Tensor]:
        """Projector embeddings ``(z1, z2)`` of two batches of views (same shape)."""
        if view1.shape != view2.shape:
            raise ValueError(
                f"SimCLR: views must have equal shapes, got {tuple(view1.shape)} "
                f"and {tuple(view2.shape)}"
            )
        if self.separate_views:
            return self.projector(self.encoder(view1)), self.projector(self.encoder(view2))
        z = self.projector(self.encoder(torch.cat([view1, view2], dim=0)))
        return z.chunk(2, dim=0)

    def ggn_outputs(
        self, view1: Tensor, view2: Tensor
    ) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """The loss split as ``loss_of_outputs(outputs)`` with a loss convex in the outputs.

        Outputs are the NT-Xent similarity logits (self entries ``-inf``); the convex part is
        their cross entropy against the positives (Hessian ``diag(p) - p p^T`` per row, PSD).
        ``loss_of_outputs(outputs)`` is exactly :meth:`forward`'s loss.
        """
        logits, positives = nt_xent_logits(
            *self.embed(view1, view2), self.temperature, gather=self.gather
        )

        def loss_of_outputs(outputs: Tensor) -> Tensor:
            return F.cross_entropy(outputs, positives)

        return logits, loss_of_outputs

    def forward(self, view1: Tensor, view2: Tensor) -> Tensor:
        """Return the NT-Xent loss of two batches of views (same shape)."""
        outputs, loss_of_outputs = self.ggn_outputs(view1, view2)
        return loss_of_outputs(outputs)
