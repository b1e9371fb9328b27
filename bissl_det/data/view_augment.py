"""The pretext views' colour and blur augmentations, drawn per view and applied per batch.

SimCLR/BYOL apply, after the crop and flip: colour jitter (brightness, contrast, saturation and
hue in a random order, with probability ``jitter_p``), grayscale, Gaussian blur and solarisation.
These per-pixel operations cost most of a loader worker's time on the CPU (PIL's hue step alone
2.4 ms per 224 px view), so they run here on the whole batch, on the device that holds it.

The randomness stays in the loader: a worker draws each view's parameters
(:func:`draw_view_params`, torch's RNG, so the DataLoader's worker seeds and, without workers,
the checkpointed RNG state decide them exactly as they decided PIL's augmentations) and sends
them with the uint8 view as a :class:`PretextView`. :func:`augment_views` applies them with
batched tensor operations: no loop over images and no random draw on the device, so a resumed
run gets the same views wherever they are computed, on the CPU or on CUDA. Which images take
which operation is read from the parameters on the host (the loader's copy: no device
synchronisation), and each operation runs on those images only (``index_select`` /
``index_copy_``): BYOL's second view blurs 10 % of the batch, not all of it.

Each operation is the one of ``torchvision.transforms.v2.functional`` on float images in [0, 1]
(tests compare them per image): blend-and-clamp brightness, contrast and saturation, hue by HSV,
luma weights (0.2989, 0.587, 0.114), the Gaussian kernel sampled on :func:`blur_kernel_size`
taps with reflect padding (the authors' kernel), and solarisation of the values >= 128/255 (PIL's
threshold 128 on the 0-255 scale).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

__all__ = [
    "NUM_PARAMS",
    "PretextView",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "augment_views",
    "blur_kernel_size",
    "colour_jitter",
    "draw",
    "draw_view_params",
    "gaussian_blur",
    "grayscale",
    "solarize",
]

# Columns of a view's parameter vector.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3  # jitter factors, one column per operation
ORDER = slice(4, 8)  # the operation applied at position 0..3; -1: none (no jitter, or strength 0)
GRAY, BLUR, SIGMA, SOLARIZE = 8, 9, 10, 11  # flags (0/1) and the blur's sigma
NUM_PARAMS = 12
IDENTITY_FACTORS = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation x 1; hue + 0
LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
SOLARIZE_THRESHOLD = 128 / 255
SIGMA_RANGE = (0.1, 2.0)  # SimCLR/BYOL


class PretextView(NamedTuple):
    """One view as a loader worker sends it (collated, a batch of them).

    Attributes:
        pixels: uint8 ``(3, H, W)`` pixels after crop, resize and flip (``(N, 3, H, W)`` batched).
        params: float32 ``(NUM_PARAMS,)`` colour and blur parameters (``(N, NUM_PARAMS)``).
    """

    pixels: torch.Tensor
    params: torch.Tensor


def draw(p: float) -> bool:
    """True with probability ``p`` (torch's RNG, as torchvision's Random* transforms)."""
    return p > 0 and bool(torch.rand(1) < p)


def blur_kernel_size(crop_size: int) -> int:
    """The authors' blur kernel: odd, about 10% of the crop, at least 3."""
    return max(3, int(0.1 * crop_size) // 2 * 2 + 1)


class ViewSettings(Protocol):
    """The settings :func:`draw_view_params` reads (``data/pretext.py``'s TwoViewAugmentation)."""

    jitter: tuple[float, float, float, float]
    jitter_p: float
    gray_p: float
    blur_p: tuple[float, float]
    solarize_p: tuple[float, float]


def draw_view_params(aug: ViewSettings, view: int) -> torch.Tensor:
    """The random colour/blur parameters of one view (0 or 1), with the distributions of
    torchvision's ``RandomApply(ColorJitter)``, ``RandomGrayscale``, ``GaussianBlur(sigma=(0.1,
    2))`` and ``RandomSolarize``: a uniformly random order of the four jitter operations and each
    factor uniform in ``[max(0, 1 - s), 1 + s]`` (hue: ``[-s, s]``).

    One ``torch.rand`` call per view (13 uniforms, whatever the settings): a few microseconds,
    where a torch call per draw cost 0.2 ms per view."""
    u = torch.rand(13, dtype=torch.float64).tolist()
    coins, factor_u, order_keys, sigma_u = u[0:4], u[4:8], u[8:12], u[12]
    params = [*IDENTITY_FACTORS, -1.0, -1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0]
    if coins[0] < aug.jitter_p:
        for op, strength in enumerate(aug.jitter):
            low = -strength if op == HUE else max(0.0, 1.0 - strength)
            high = strength if op == HUE else 1.0 + strength
            params[op] = low + (high - low) * factor_u[op]
        order = sorted(range(4), key=order_keys.__getitem__)  # a uniform random permutation
        params[ORDER] = [float(op) if aug.jitter[op] > 0 else -1.0 for op in order]
    params[GRAY] = float(coins[1] < aug.gray_p)
    if coins[2] < aug.blur_p[view]:
        params[BLUR] = 1.0
        params[SIGMA] = SIGMA_RANGE[0] + (SIGMA_RANGE[1] - SIGMA_RANGE[0]) * sigma_u
    params[SOLARIZE] = float(coins[3] < aug.solarize_p[view])
    return torch.tensor(params, dtype=torch.float32)


# ---- The operations, batched: images (N, 3, H, W) float in [0, 1], one parameter per image ----


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma ``(N, 1, H, W)``."""
    r, g, b = images.unbind(dim=1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor | float, factor: torch.Tensor) -> torch.Tensor:
    """``factor * images + (1 - factor) * other``, clamped to [0, 1]."""
    f = _per_image(factor)
    return (f * images).add_((1 - f) * other).clamp_(0.0, 1.0)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with black."""
    return (_per_image(factor) * images).clamp_(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma."""
    return _blend(images, grayscale(images).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's luma."""
    return _blend(images, grayscale(images), factor)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by ``shift`` (N,) turns, in HSV, as torchvision's ``adjust_hue``.

    Hue in sixths of a turn from the channel holding the maximum, then back with the closed form
    ``c_n = max - (max - min) * clamp(min(k, 4 - k), 0, 1)``, ``k = (n + hue) mod 6``, n = 5, 3, 1
    for red, green, blue. Where max = min the hue is irrelevant (0 / tiny = 0)."""
    r, g, b = images.unbind(dim=1)
    high, low = images.amax(dim=1), images.amin(dim=1)
    spread = high - low
    inverse = spread.clamp_min(torch.finfo(images.dtype).tiny).reciprocal_()
    hue = torch.where(
        high == r,
        g - b,
        torch.where(high == g, (b - r).add_(spread, alpha=2.0), (r - g).add_(spread, alpha=4.0)),
    )
    hue.mul_(inverse).add_(6.0 * shift.view(-1, 1, 1)).remainder_(6.0)
    n = torch.tensor([5.0, 3.0, 1.0], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    k = (hue.unsqueeze(1) + n).remainder_(6.0)
    weight = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return high.unsqueeze(1) - spread.unsqueeze(1) * weight


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # by column


def _on_rows(images: torch.Tensor, rows: torch.Tensor, op, *values: torch.Tensor) -> None:
    """``images[rows] = op(images[rows], *values[rows])`` in place; ``rows`` a host bool mask."""
    index = rows.nonzero().flatten()
    if index.numel() == 0:
        return
    device = images.device
    values = tuple(v[index].to(device, non_blocking=True) for v in values)
    if index.numel() == images.shape[0]:
        images.copy_(op(images, *values))
        return
    index = index.to(device, non_blocking=True)
    images.index_copy_(0, index, op(images.index_select(0, index), *values))


def colour_jitter(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation and hue, each image in its own order (in place).

    Args:
        images: ``(N, 3, H, W)`` float in [0, 1].
        factors: ``(N, 4)`` on the host: brightness, contrast, saturation factors, hue shift.
        order: ``(N, 4)`` integer on the host: the operation at each position, -1 for none.

    At each of the four positions, each operation runs once on the images that take it there.
    """
    for position in range(4):
        for op, fn in enumerate(JITTER_OPS):
            _on_rows(images, order[:, position] == op, fn, factors[:, op])
    return images


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma (> 0) per image.

    The kernel is the Gaussian sampled at the integer offsets of ``kernel_size`` taps and
    normalised, reflect padding, as torchvision's ``gaussian_blur``; one grouped convolution per
    direction blurs the whole batch."""
    n, c, h, w = images.shape
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma.to(images.dtype).view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
    x = images.reshape(1, n * c, h, w)
    x = F.pad(x, (half, half, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel.view(n * c, 1, 1, -1), groups=n * c)
    x = F.pad(x, (0, 0, half, half), mode="reflect")
    x = F.conv2d(x, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return x.view(n, c, h, w)


def solarize(images: torch.Tensor) -> torch.Tensor:
    """Invert the values >= 128/255."""
    return torch.where(images >= SOLARIZE_THRESHOLD, 1.0 - images, images)


def augment_views(pixels: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` views and their ``(N, NUM_PARAMS)`` parameters -> the augmented
    views as float32 in [0, 1], on the pixels' device: jitter, grayscale, blur, solarisation.

    ``params`` are read on the host (copied there if they are not: one synchronisation)."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"augment_views: expected uint8 pixels, got {pixels.dtype}")
    if params.shape != (pixels.shape[0], NUM_PARAMS):
        raise ValueError(
            f"augment_views: params of shape {tuple(params.shape)} for {pixels.shape[0]} views "
            f"(expected ({pixels.shape[0]}, {NUM_PARAMS}))"
        )
    params = params.detach().to("cpu", torch.float32)
    images = pixels.to(torch.float32).div_(255.0)
    colour_jitter(images, params[:, :4], params[:, ORDER].long())
    _on_rows(images, params[:, GRAY] > 0, lambda x: grayscale(x).expand_as(x).contiguous())
    kernel = blur_kernel_size(images.shape[-1])
    _on_rows(
        images, params[:, BLUR] > 0, lambda x, s: gaussian_blur(x, s, kernel), params[:, SIGMA]
    )
    _on_rows(images, params[:, SOLARIZE] > 0, solarize)
    return images
