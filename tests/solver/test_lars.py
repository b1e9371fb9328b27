"""LARS against a hand-written NumPy update, and the parameter-group exclusions."""

from __future__ import annotations

from bissl_det.solver import LARS, is_norm_module, lars_param_groups

import numpy as np
import pytest
import torch
from torch import nn


def lars_numpy(w, g, buf, lr, momentum, wd, eta, exclude):
    """One reference LARS step (SimCLR/BYOL variant); returns (new w, new momentum buffer)."""
    u = g.copy()
    if not exclude:
        u = u + wd * w
        w_norm, u_norm = np.sqrt((w**2).sum()), np.sqrt((u**2).sum())
        if w_norm > 0 and u_norm > 0:
            u = u * (eta * w_norm / u_norm)
    buf = momentum * buf + u
    return w - lr * buf, buf


def test_lars_two_steps_match_numpy() -> None:
    rng = np.random.default_rng(0)
    shapes = [(4, 3), (5,), (2, 2, 3), (3,)]
    excluded = [False, True, False, False]
    ws = [rng.normal(size=s) for s in shapes]
    ws[3] = np.zeros(3)  # zero weight norm -> trust ratio 1
    params = [nn.Parameter(torch.from_numpy(w.copy())) for w in ws]
    groups = [
        {"params": [p for p, e in zip(params, excluded, strict=True) if not e]},
        {"params": [p for p, e in zip(params, excluded, strict=True) if e], "lars_exclude": True},
    ]
    lr, momentum, wd, eta = 0.7, 0.9, 0.05, 0.02
    opt = LARS(groups, lr=lr, momentum=momentum, weight_decay=wd, eta=eta)
    bufs = [np.zeros(s) for s in shapes]
    for _ in range(2):
        grads = [rng.normal(size=s) for s in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
        for i in range(len(ws)):
            ws[i], bufs[i] = lars_numpy(
                ws[i], grads[i], bufs[i], lr, momentum, wd, eta, excluded[i]
            )
        for p, w in zip(params, ws, strict=True):
            np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-12, atol=1e-14)
    # The trust ratio really acted: a trust-free SGD step would be far larger.
    assert not np.allclose(ws[0], params[0].detach().numpy() - lr * grads[0])


def test_lars_skips_params_without_grad_and_validates() -> None:
    p = nn.Parameter(torch.ones(3))
    opt = LARS([p], lr=0.1)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3))
    with pytest.raises(ValueError, match="momentum"):
        LARS([p], lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="eta"):
        LARS([p], lr=0.1, eta=0.0)


class ShortcutConv(nn.Conv2d):
    """Mimics detectron2's Conv2d: a conv that owns its norm as ``.norm``."""

    def __init__(self, *args, norm: nn.Module | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return self.norm(x) if self.norm is not None else x


class FrozenishNorm(nn.Module):
    """Not a torch norm subclass; excluded by its class name (like detectron2's norms)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.scale = nn.Parameter(torch.ones(c))


def test_lars_param_groups_exclusions() -> None:
    shortcut = ShortcutConv(3, 4, 1, bias=False, norm=nn.BatchNorm2d(4))
    conv_bias = nn.Conv2d(4, 4, 3)
    model = nn.Sequential(
        shortcut,
        conv_bias,
        nn.GroupNorm(2, 4),
        FrozenishNorm(4),
        nn.LayerNorm(4),
        nn.SyncBatchNorm(4),
        nn.Linear(4, 2),
    )
    frozen = nn.Linear(2, 2)
    frozen.weight.requires_grad_(False)
    model.append(frozen)
    model.append(model[6])  # shared module: its parameters must appear once

    groups = lars_param_groups(model, weight_decay=1e-6)
    decay, excluded = groups
    assert decay["weight_decay"] == 1e-6 and not decay["lars_exclude"]
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"]
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == ids([shortcut.weight, conv_bias.weight, model[6].weight])
    expected_excluded = [
        shortcut.norm.weight,
        shortcut.norm.bias,
        conv_bias.bias,
        *model[2].parameters(),
        *model[3].parameters(),
        *model[4].parameters(),
        *model[5].parameters(),
        model[6].bias,
        frozen.bias,
    ]
    assert ids(excluded["params"]) == ids(expected_excluded)
    all_params = decay["params"] + excluded["params"]
    assert len(all_params) == len(ids(all_params))
    assert is_norm_module(shortcut.norm) and not is_norm_module(shortcut)

    # Groups plug into LARS: excluded parameters take plain momentum-SGD steps.
    opt = LARS(groups, lr=0.5, momentum=0.9, weight_decay=1e-6)
    x = torch.randn(2, 3, 6, 6)
    model[0:2](x).sum().backward()
    bias_before, grad = conv_bias.bias.detach().clone(), conv_bias.bias.grad.clone()
    opt.step()
    torch.testing.assert_close(conv_bias.bias.detach(), bias_before - 0.5 * grad)
