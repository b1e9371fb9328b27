"""A deterministic linear probe: L2-regularised logistic regression solved by L-BFGS in float64.

The loss is convex, the start is fixed (zeros) and the solver has no randomness, so the same
features give the same classifier and the same accuracy on every rerun: the probe adds no noise
of its own to a comparison of backbones (a linear layer trained by SGD on augmented crops does).

    loss(W, b) = mean_i CE(x_i W + b, y_i) + l2 / 2 * ||W||^2          (single-label, softmax)
    loss(W, b) = mean over known (i, c) of BCE(x_i W_c + b_c, y_ic) + l2 / 2 * ||W||^2
                                                          (multi-label; targets -1 are ignored)

Features are standardised with the training features' mean and std (the scale of a backbone's
features varies by orders of magnitude, the L2 grid should not have to follow it); the bias is not
penalised. :func:`select_l2` picks the strength on a validation split by its score.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["LogisticProbe", "fit_logistic_probe", "select_l2"]


@dataclass
class LogisticProbe:
    """A fitted probe: standardisation, weights and the solver's diagnostics."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # (D, C) float64
    bias: torch.Tensor  # (C,)
    l2: float
    loss: float
    grad_norm: float  # max |gradient| at the returned point
    iterations: int
    converged: bool

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.to(torch.float64) - self.mean) / self.std
        return x @ self.weight + self.bias


def _check(features: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> None:
    if features.ndim != 2 or len(features) != len(targets) or len(features) == 0:
        raise ValueError(
            f"linear probe: expected features (N, D) and N targets with N > 0, got "
            f"{tuple(features.shape)} and {tuple(targets.shape)}"
        )
    if not torch.isfinite(features).all():
        raise ValueError("linear probe: the features contain NaN or infinity")
    if multi_label and targets.ndim != 2:
        raise ValueError(f"linear probe: multi-label targets must be (N, C), got {targets.shape}")
    if not multi_label and (targets.ndim != 1 or targets.dtype.is_floating_point):
        raise ValueError("linear probe: single-label targets must be (N,) class indices")


def fit_logistic_probe(
    features: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    l2: float,
    multi_label: bool = False,
    max_iter: int = 1000,
    tol: float = 1e-8,
) -> LogisticProbe:
    """Minimise the probe's loss from W = 0, b = 0 by L-BFGS (strong Wolfe line search).

    Args:
        features: (N, D) frozen features (any float dtype; computed in float64).
        targets: (N,) class indices, or (N, C) in {1, 0, -1} for ``multi_label``.
        num_classes: C.
        l2: Strength of the L2 penalty on W (> 0 makes the problem strictly convex).
        max_iter: L-BFGS iterations at most.
        tol: Stop once max |gradient| <= tol (``converged``).
    """
    _check(features, targets, multi_label)
    if not l2 >= 0:
        raise ValueError(f"linear probe: l2 = {l2} must be >= 0")
    x = features.detach().to(torch.float64).cpu()
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))  # constant features stay 0
    x = (x - mean) / std
    targets = targets.detach().cpu()
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    data_loss = _data_loss(targets, multi_label)

    def objective() -> torch.Tensor:
        return data_loss(x @ weight + bias) + 0.5 * l2 * weight.pow(2).sum()

    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        max_eval=4 * max_iter,  # the line search evaluates a few times per iteration
        tolerance_grad=tol,
        tolerance_change=0.0,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)
    iterations = optimizer.state[weight].get("n_iter", 0)
    loss = closure()  # gradient at the returned point
    grad_norm = max(weight.grad.abs().max().item(), bias.grad.abs().max().item())
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"linear probe (l2 {l2:g}): the loss became {loss.item()}")
    return LogisticProbe(
        mean=mean,
        std=std,
        weight=weight.detach(),
        bias=bias.detach(),
        l2=float(l2),
        loss=loss.item(),
        grad_norm=grad_norm,
        iterations=int(iterations),
        converged=grad_norm <= tol,
    )


def _data_loss(targets: torch.Tensor, multi_label: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    if not multi_label:
        return lambda logits: F.cross_entropy(logits, targets)
    known = targets >= 0
    labels = targets.clamp(min=0).to(torch.float64)
    return lambda logits: F.binary_cross_entropy_with_logits(logits[known], labels[known])


def select_l2(
    fit: Callable[[float], LogisticProbe],
    score: Callable[[LogisticProbe], float],
    grid: Sequence[float],
) -> tuple[float, dict[float, float]]:
    """The strength in ``grid`` whose probe (``fit(l2)``) scores highest (``score``, e.g. the
    validation accuracy), and every strength's score. Ties go to the stronger penalty (the
    simpler classifier), so the choice does not hinge on the grid's order."""
    if not grid:
        raise ValueError("linear probe: the L2 grid is empty")
    scores = {float(l2): float(score(fit(float(l2)))) for l2 in grid}
    best = max(scores, key=lambda l2: (scores[l2], l2))
    return best, scores
