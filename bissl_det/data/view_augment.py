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
run gets the same views wherever they are computed, on the CPU or on CUDA.

Each operation is the one of ``torchvision.transforms.v2.functional`` on float images in [0, 1]
(tests compare them per image): blend-and-clamp brightness, contrast and saturation, hue by HSV,
luma weights (0.2989, 0.587, 0.114), the Gaussian kernel sampled on :func:`blur_kernel_size`
taps with reflect padding (the authors' kernel), and solarisation of the values >= 128/255 (PIL's
threshold 128 on the 0-255 scale).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .pretext import TwoViewAugmentation

__all__ = [
    "NUM_PARAMS",
    "PretextView",
    "adjust_hue",
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


def draw_view_params(aug: TwoViewAugmentation, view: int) -> torch.Tensor:
    """The random colour/blur parameters of one view (0 or 1), drawn as torchvision's
    ``RandomApply(ColorJitter)``, ``RandomGrayscale``, ``GaussianBlur(sigma=(0.1, 2))`` and
    ``RandomSolarize`` draw them: a random order of the four jitter operations (``randperm``)
    and each factor uniform in ``[max(0, 1 - s), 1 + s]`` (hue: ``[-s, s]``)."""
    params = torch.zeros(NUM_PARAMS)
    params[:4] = torch.tensor(IDENTITY_FACTORS)
    params[ORDER] = -1.0
    if draw(aug.jitter_p):
        order = torch.randperm(4)
        for op, strength in enumerate(aug.jitter):
            if strength > 0:
                low, high = (
                    (-strength, strength) if op == HUE else (max(0, 1 - strength), 1 + strength)
                )
                params[op] = float(torch.empty(1).uniform_(low, high))
        active = torch.tensor([s > 0 for s in aug.jitter])[order]
        params[ORDER] = torch.where(active, order, -1).float()
    params[GRAY] = float(draw(aug.gray_p))
    if draw(aug.blur_p[view]):
        params[BLUR] = 1.0
        params[SIGMA] = float(torch.empty(1).uniform_(*SIGMA_RANGE))
    params[SOLARIZE] = float(draw(aug.solarize_p[view]))
    return params


# ---- The operations, batched: images (N, 3, H, W) float in [0, 1], one parameter per image ----


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma ``(N, 1, H, W)``."""
    r, g, b = images.unbind(dim=1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``factor * images + (1 - factor) * other`` clamped to [0, 1] (factor 1: exactly images)."""
    f = _per_image(factor)
    return (f * images + (1 - f) * other).clamp_(0.0, 1.0)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by ``shift`` (N,) turns, in HSV, as torchvision's ``adjust_hue``.

    Hue in sixths of a turn: from the channel holding the maximum, then back with the closed
    form ``c_n = v - (v - min) * clamp(min(k, 4 - k), 0, 1)``, ``k = (n + hue) mod 6``, n = 5, 3,
    1 for red, green, blue."""
    r, g, b = images.unbind(dim=1)
    high, _ = images.max(dim=1)
    low, _ = images.min(dim=1)
    spread = high - low
    safe = torch.where(spread > 0, spread, torch.ones_like(spread))
    hue = torch.where(
        high == r,
        ((g - b) / safe).remainder(6.0),
        torch.where(high == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    hue = (hue + 6.0 * shift.view(-1, 1, 1)).remainder(6.0)
    n = torch.tensor([5.0, 3.0, 1.0], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    k = (n + hue.unsqueeze(1)).remainder(6.0)
    return high.unsqueeze(1) - spread.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def colour_jitter(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation and hue, each image in its own order.

    Args:
        images: ``(N, 3, H, W)`` float in [0, 1].
        factors: ``(N, 4)``: brightness, contrast, saturation factors and the hue shift.
        order: ``(N, 4)`` integer: the operation at each position, -1 for none.

    At each of the four positions every image takes one blend (brightness: with black, contrast:
    with its mean luma, saturation: with its luma; factor 1 for the images whose operation there
    is hue or none) and the images whose operation is hue take the hue rotation instead.
    """
    for position in range(4):
        op = order[:, position]
        ref_op = op.clamp(min=0, max=SATURATION).view(-1, 1)
        factor = torch.where(op.view(-1, 1) <= SATURATION, factors.gather(1, ref_op), 1.0)
        factor = torch.where(op.view(-1, 1) >= 0, factor, 1.0).view(-1)
        luma = grayscale(images)
        other = torch.where(
            _per_image(op == BRIGHTNESS),
            0.0,
            torch.where(_per_image(op == CONTRAST), luma.mean(dim=(1, 2, 3), keepdim=True), luma),
        )
        blended = _blend(images, other, factor)
        is_hue = op == HUE
        images = torch.where(
            _per_image(is_hue), adjust_hue(images, factors[:, HUE] * is_hue), blended
        )
    return images


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image (sigma <= 0: the image unchanged).

    The kernel is the Gaussian sampled at the integer offsets of ``kernel_size`` taps and
    normalised, reflect padding, as torchvision's ``gaussian_blur``; one grouped convolution per
    direction blurs the whole batch."""
    n, c, h, w = images.shape
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, dtype=images.dtype, device=images.device)
    blurred = sigma > 0
    safe = torch.where(blurred, sigma, torch.ones_like(sigma)).to(images.dtype)
    kernel = torch.exp(-0.5 * (offsets / safe.view(-1, 1)) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    delta = (offsets == 0).to(images.dtype).expand(n, -1)  # exactly the identity
    kernel = torch.where(blurred.view(-1, 1), kernel, delta).repeat_interleave(c, dim=0)
    x = images.reshape(1, n * c, h, w)
    x = F.conv2d(
        F.pad(x, (half, half, 0, 0), mode="reflect"), kernel.view(n * c, 1, 1, -1), groups=n * c
    )
    x = F.conv2d(
        F.pad(x, (0, 0, half, half), mode="reflect"), kernel.view(n * c, 1, -1, 1), groups=n * c
    )
    return x.view(n, c, h, w)


def solarize(images: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Invert the values >= 128/255 of the flagged images."""
    hit = _per_image(flags) & (images >= SOLARIZE_THRESHOLD)
    return torch.where(hit, 1.0 - images, images)


def augment_views(pixels: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` views and their ``(N, NUM_PARAMS)`` parameters -> the augmented
    views as float32 in [0, 1], on the pixels' device: jitter, grayscale, blur, solarisation."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"augment_views: expected uint8 pixels, got {pixels.dtype}")
    if params.shape != (pixels.shape[0], NUM_PARAMS):
        raise ValueError(
            f"augment_views: params of shape {tuple(params.shape)} for {pixels.shape[0]} views "
            f"(expected ({pixels.shape[0]}, {NUM_PARAMS}))"
        )
    params = params.to(pixels.device, torch.float32)
    images = pixels.to(torch.float32) / 255.0
    images = colour_jitter(images, params[:, :4], params[:, ORDER].long())
    gray = _per_image(params[:, GRAY] > 0)
    images = torch.where(gray, grayscale(images).expand_as(images), images)
    sigma = torch.where(params[:, BLUR] > 0, params[:, SIGMA], 0.0)
    images = gaussian_blur(images, sigma, blur_kernel_size(images.shape[-1]))
    return solarize(images, params[:, SOLARIZE] > 0)
