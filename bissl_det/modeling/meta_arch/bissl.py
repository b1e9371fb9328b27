"""The BiSSL meta-architecture: a lower pretext model and an upper downstream model on one ResNet.

Both levels own a copy of the same Detectron2 ResNet (stem, res2..res5): theta in the lower
pretext model, phi in the upper model. For an R50-C4 Faster R-CNN the upper copy is split between
``backbone`` (stem..res4) and ``roi_heads.res5``; for FPN it is ``backbone.bottom_up``; for the
classifier it is ``backbone``. :class:`BackbonePairs` lines the two copies up by name, so the
proximity term, the implicit gradient and the export all see the same tensors. Everything else
(RPN, box head, FPN, extra norms, linear layer; projector, predictor) is a level's own head.

Nothing here knows how the levels alternate: that is :mod:`bissl_det.engine`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn
from torch.func import functional_call

from ...checkpoint.pairing import BackbonePairs, pair_by_suffix
from ..backbone import PooledEncoder, build_resnet_trunk
from ..pretext_tasks import build_pretext_model
from ..sync_bn import use_float32_sync_bn_statistics


@META_ARCH_REGISTRY.register()
class BiSSL(nn.Module):
    """A BiSSL model: ``lower`` (pretext task on theta) and ``upper`` (downstream model on phi).

    ``forward`` is the upper model's, so Detectron2's evaluators and ``inference_on_dataset``
    evaluate the upper level unchanged.
    """

    @configurable
    def __init__(self, *, lower: nn.Module, upper: nn.Module):
        super().__init__()
        self.lower = lower
        self.upper = upper
        params = pair_by_suffix(
            dict(self.lower_backbone.named_parameters()),
            dict(upper.named_parameters()),
            "parameter",
        )
        self._params, self._buffers_pairs = params, self._pair_buffers()
        upper_backbone = {id(t) for t in params.upper}
        self._upper_head = tuple(p for p in upper.parameters() if id(p) not in upper_backbone)

    def _pair_buffers(self) -> BackbonePairs:
        return pair_by_suffix(
            dict(self.lower_backbone.named_buffers()), dict(self.upper.named_buffers()), "buffer"
        )

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .double() replace every buffer by a new tensor (parameters keep their
        # identity): pair the new ones, or BN statistics would be read from stale copies.
        module = super()._apply(fn, *args, **kwargs)
        self._buffers_pairs = self._pair_buffers()
        return module

    @classmethod
    def from_config(cls, cfg):
        upper_arch = cfg.MODEL.BISSL.UPPER_META_ARCHITECTURE
        if upper_arch == "BiSSL":
            raise ValueError("MODEL.BISSL.UPPER_META_ARCHITECTURE cannot be BiSSL itself")
        # Plain BN on the lower level: Hessian-vector products need double backward.
        encoder = PooledEncoder(build_resnet_trunk(cfg, norm="BN"))
        upper = META_ARCH_REGISTRY.get(upper_arch)(cfg)
        use_float32_sync_bn_statistics(upper)  # bf16 autocast (BISSL.AMP) keeps fp32 statistics
        return {"lower": build_pretext_model(cfg, encoder), "upper": upper}

    @property
    def lower_backbone(self) -> nn.Module:
        """theta: the lower level's Detectron2 ResNet (what BiSSL exports)."""
        return self.lower.encoder.resnet

    @property
    def backbone_pairs(self) -> BackbonePairs:
        """theta and phi parameters, aligned (the proximity term and the implicit gradient)."""
        return self._params

    @property
    def backbone_buffer_pairs(self) -> BackbonePairs:
        """theta and phi BN statistics, aligned (copied at initialisation, never regularised)."""
        return self._buffers_pairs

    def upper_head_parameters(self) -> tuple[nn.Parameter, ...]:
        """phi_d: every upper parameter that is not a backbone parameter."""
        return self._upper_head

    def lower_head_parameters(self) -> Iterator[nn.Parameter]:
        """theta_p: the pretext head (projector, predictor)."""
        return self.lower.head_parameters()

    @torch.no_grad()
    def copy_lower_backbone_to_upper(self) -> None:
        """phi <- theta, parameters and BN statistics (both levels start from the same weights)."""
        for pairs in (self._params, self._buffers_pairs):
            if pairs.upper:  # a norm-free backbone has no buffers
                torch._foreach_copy_(list(pairs.upper), list(pairs.lower))

    def pretext_loss(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        """L_P(theta, theta_p) on a batch of view pairs."""
        return self.lower(view1, view2)

    def downstream_losses(self, batch, with_lower_backbone: bool = False) -> dict:
        """The upper model's loss dict, on phi or (``with_lower_backbone``) on theta.

        With theta, the upper model runs with theta's tensors substituted for phi's, and every
        buffer (theta's BN statistics, and the upper head's own norms: the extra res5 norm, FPN
        or box-head norms) is a throw-away copy: the theta-view pass moves no running statistics,
        so each upper step updates the head's statistics once, through phi's own pass.
        """
        if not with_lower_backbone:
            return self.upper(batch)
        substitute = {name: b.clone() for name, b in self.upper.named_buffers()}
        substitute.update(zip(self._params.upper_names, self._params.lower, strict=True))
        for name, buffer in zip(
            self._buffers_pairs.upper_names, self._buffers_pairs.lower, strict=True
        ):
            substitute[name] = buffer.clone()
        return functional_call(self.upper, substitute, (batch,), strict=False)

    def forward(self, batched_inputs):
        return self.upper(batched_inputs)
