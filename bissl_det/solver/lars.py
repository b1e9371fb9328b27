"""LARS (layer-wise adaptive rate scaling) as used by SimCLR and BYOL, plus its parameter groups."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["LARS", "is_norm_module", "lars_param_groups"]

_NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)


class LARS(torch.optim.Optimizer):
    """SGD with momentum, weight decay and a per-tensor trust ratio.

    For each parameter ``w`` with gradient ``g`` (groups without ``lars_exclude``)::

        u = g + weight_decay * w
        u = u * (eta * ||w|| / ||u||)      # only if both norms are > 0, else unscaled
        v = momentum * v + u
        w = w - lr * v

    Groups with ``lars_exclude=True`` (biases, normalisation layers) skip weight decay and the
    trust ratio: plain SGD with momentum.

    Args:
        params: Parameters or parameter groups (see :func:`lars_param_groups`).
        lr: Learning rate.
        momentum: Momentum factor.
        weight_decay: L2 penalty added to the gradient before the trust ratio.
        eta: Trust coefficient.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ) -> None:
        if lr < 0:
            raise ValueError(f"LARS: lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS: momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"LARS: weight_decay must be >= 0, got {weight_decay}")
        if eta <= 0:
            raise ValueError(f"LARS: eta must be > 0, got {eta}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eta": eta,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one update; ``closure`` re-evaluates the loss (optional)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            exclude = group["lars_exclude"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                if w.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                u = w.grad
                if not exclude:
                    if group["weight_decay"] != 0:
                        u = u.add(w, alpha=group["weight_decay"])
                    w_norm = torch.linalg.vector_norm(w)
                    u_norm = torch.linalg.vector_norm(u)
                    # Tensor ops (no .item()): no host-device sync per parameter.
                    trust = torch.where(
                        (w_norm > 0) & (u_norm > 0),
                        group["eta"] * w_norm / u_norm,
                        torch.ones_like(w_norm),
                    )
                    u = u * trust
                state = self.state[w]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(w)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(u)
                w.add_(buf, alpha=-group["lr"])
        return loss


def is_norm_module(module: nn.Module) -> bool:
    """Normalisation layers: torch's norms, or any class whose name contains "Norm".

    The name rule catches detectron2's ``FrozenBatchNorm2d`` and ``NaiveSyncBatchNorm`` without
    importing detectron2.
    """
    return isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__


def lars_param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a LARS group and an excluded group.

    Excluded (no weight decay, no trust ratio): every ``bias`` and all parameters of
    normalisation layers (:func:`is_norm_module`). Module traversal also finds norms held as
    attributes of other modules, e.g. detectron2's ``Conv2d`` whose ``.norm`` is a BatchNorm.
    Frozen parameters (``requires_grad=False``) and duplicates (shared parameters) are skipped.

    Args:
        module: Model to optimise.
        weight_decay: Weight decay of the non-excluded group.

    Returns:
        Up to two groups; the excluded one has ``lars_exclude=True`` and ``weight_decay=0``.
    """
    decay: list[nn.Parameter] = []
    excluded: list[nn.Parameter] = []
    seen: set[int] = set()
    for mod in module.modules():
        norm = is_norm_module(mod)
        for name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (excluded if norm or name == "bias" else decay).append(p)
    groups: list[dict] = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "lars_exclude": False})
    if excluded:
        groups.append({"params": excluded, "weight_decay": 0.0, "lars_exclude": True})
    return groups
