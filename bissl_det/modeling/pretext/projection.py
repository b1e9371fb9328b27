"""The MLP shared by SimCLR's projector and BYOL's projector and predictor."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["ProjectionMLP"]


class ProjectionMLP(nn.Sequential):
    """``Linear -> BN1d -> ReLU -> ... -> Linear`` (no norm or activation after the last layer).

    Hidden linear layers have no bias: the BatchNorm that follows would cancel it, and a dead
    parameter only costs memory and optimiser state.

    Args:
        dims: Layer widths ``(in, hidden..., out)``; at least two entries.
        last_bias: Whether the last linear layer has a bias.
        last_norm: Append a BatchNorm1d after the last layer (as in SimCLR v2's projector).
    """

    def __init__(
        self, dims: Sequence[int], last_bias: bool = False, last_norm: bool = False
    ) -> None:
        dims = [int(d) for d in dims]
        if len(dims) < 2 or any(d <= 0 for d in dims):
            raise ValueError(f"ProjectionMLP dims must be >= 2 positive widths, got {list(dims)}")
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            last = i == len(dims) - 2
            layers.append(nn.Linear(d_in, d_out, bias=last_bias if last else False))
            if not last:
                layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
            elif last_norm:
                layers.append(nn.BatchNorm1d(d_out))
        super().__init__(*layers)
        self.dims = tuple(dims)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.dims[0]:
            raise ValueError(
                f"ProjectionMLP expects input (N, {self.dims[0]}), got {tuple(x.shape)}"
            )
        return super().forward(x)
