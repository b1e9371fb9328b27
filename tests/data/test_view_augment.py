"""The batched view augmentations against torchvision.transforms.v2.functional, image by image."""

from __future__ import annotations

from bissl_det.data.pretext import TwoViewAugmentation
from bissl_det.data.view_augment import (
    BLUR,
    GRAY,
    HUE,
    NUM_PARAMS,
    ORDER,
    SIGMA,
    SOLARIZE,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    augment_views,
    blur_kernel_size,
    colour_jitter,
    draw_view_params,
    gaussian_blur,
    grayscale,
    solarize,
)

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

N = 8
ATOL = 1e-5  # float32 on [0, 1]: different but equivalent formulas round differently
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return torch.device(name)


def _images(n: int = N, size: int = 24, seed: int = 0) -> torch.Tensor:
    """Random colours with smooth structure, and a gray and a saturated image among them."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 4, size // 4, generator=g)
    images = torch.nn.functional.interpolate(low, size=size, mode="bilinear").clamp(0, 1)
    images[1] = images[1].mean(dim=0, keepdim=True)  # gray: hue undefined, saturation 0
    images[2, 0], images[2, 1:] = 1.0, 0.0  # pure red
    return images


def _reference(fn, images, values, **kw) -> torch.Tensor:
    return torch.stack([fn(img, float(v), **kw) for img, v in zip(images, values, strict=True)])


@pytest.mark.parametrize("device", DEVICES)
def test_jitter_operations_equal_torchvision_per_image(device) -> None:
    images = _images().to(_device(device))
    factors = torch.linspace(0.0, 1.8, N, device=images.device)
    shifts = torch.linspace(-0.5, 0.5, N, device=images.device)
    for ours, theirs, values in (
        (adjust_brightness, TF.adjust_brightness, factors),
        (adjust_contrast, TF.adjust_contrast, factors),
        (adjust_saturation, TF.adjust_saturation, factors),
        (adjust_hue, TF.adjust_hue, shifts),
    ):
        expected = _reference(theirs, images, values)
        torch.testing.assert_close(ours(images, values), expected, atol=ATOL, rtol=0)
    luma = TF.rgb_to_grayscale(images, num_output_channels=1)
    torch.testing.assert_close(grayscale(images), luma, atol=ATOL, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_random_order_is_honoured_per_image(device) -> None:
    """Every image of one batch in its own order (some operations off): the reference applies
    torchvision's functions in that order; the reversed order gives other images."""
    images = _images(seed=1).to(_device(device))
    g = torch.Generator().manual_seed(3)
    factors = torch.stack(
        [
            torch.empty(N).uniform_(0.6, 1.4, generator=g),
            torch.empty(N).uniform_(0.6, 1.4, generator=g),
            torch.empty(N).uniform_(0.2, 1.8, generator=g),
            torch.empty(N).uniform_(-0.1, 0.1, generator=g),
        ],
        dim=1,
    )
    order = torch.stack([torch.randperm(4, generator=g) for _ in range(N)])
    order[0, 2] = -1  # an operation switched off (strength 0)
    order[1] = -1  # no jitter at all: the image unchanged
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    expected = []
    for img, f, o in zip(images, factors, order, strict=True):
        for op in o.tolist():
            if op >= 0:
                img = fns[op](img, float(f[op]))
        expected.append(img)
    expected = torch.stack(expected)
    got = colour_jitter(images.clone(), factors, order)  # parameters on the host
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert torch.equal(got[1], images[1])
    reversed_order = colour_jitter(images.clone(), factors, order.flip(1))
    assert (reversed_order - expected).abs().amax(dim=(1, 2, 3))[2:].min() > 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [16, 96, 224])
def test_blur_equals_torchvision_with_a_sigma_per_image(device, size: int) -> None:
    images = _images(n=4, size=size, seed=2).to(_device(device))
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0], device=images.device)
    kernel = blur_kernel_size(size)
    got = gaussian_blur(images, sigma, kernel)
    expected = [
        TF.gaussian_blur(img, [kernel, kernel], [float(s)])
        for img, s in zip(images, sigma, strict=True)
    ]
    torch.testing.assert_close(got, torch.stack(expected), atol=ATOL, rtol=0)
    assert (got[3] - images[3]).abs().max() > 0.01  # it blurs


@pytest.mark.parametrize("device", DEVICES)
def test_solarize_at_128_of_255_as_pil(device) -> None:
    values = torch.arange(256, dtype=torch.float32).view(1, 1, 16, 16).expand(2, 3, 16, 16) / 255
    values = values.to(_device(device))
    got = solarize(values)
    torch.testing.assert_close(got[0], TF.solarize(values[0], threshold=128 / 255))
    pixels = (values[0] * 255).round()
    inverted = torch.where(pixels >= 128, 255 - pixels, pixels)  # PIL's ImageOps.solarize(128)
    torch.testing.assert_close(got[0] * 255, inverted, atol=1e-4, rtol=0)


def _reference_view(pixels: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """One view augmented by torchvision's functions in the order the parameters say."""
    img = pixels.float() / 255
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for op in params[ORDER].long().tolist():
        if op >= 0:
            img = fns[op](img, float(params[op]))
    if params[GRAY] > 0:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    if params[BLUR] > 0:
        k = blur_kernel_size(img.shape[-1])
        img = TF.gaussian_blur(img, [k, k], [float(params[SIGMA])])
    if params[SOLARIZE] > 0:
        img = TF.solarize(img, threshold=128 / 255)
    return img


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("view", [0, 1])
def test_augment_views_equals_the_reference_chain(device, view: int) -> None:
    """The whole batch, parameters drawn as the workers draw them (BYOL's settings, every
    operation likely), against torchvision per image."""
    aug = TwoViewAugmentation(crop_size=32, gray_p=0.3, blur_p=(1.0, 0.5), solarize_p=(0.5, 0.5))
    torch.manual_seed(view)
    params = torch.stack([draw_view_params(aug, view) for _ in range(12)])
    off = TwoViewAugmentation(jitter_p=0.0, gray_p=0.0, blur_p=(0.0, 0.0), solarize_p=(0.0, 0.0))
    params[-2:] = draw_view_params(off, view)  # two views left as they are
    pixels = (_images(n=12, size=32, seed=4) * 255).round().to(torch.uint8)
    expected = torch.stack([_reference_view(p, q) for p, q in zip(pixels, params, strict=True)])
    dev = _device(device)
    for on_device in (params, params.to(dev)):  # the loader's host copy, or one on the device
        got = augment_views(pixels.to(dev), on_device)
        assert got.dtype == torch.float32 and got.device.type == dev.type
        torch.testing.assert_close(got.cpu(), expected, atol=ATOL, rtol=0)
    untouched = (params[:, ORDER] < 0).all(dim=1) & (params[:, [GRAY, BLUR, SOLARIZE]] == 0).all(1)
    assert untouched.any() and not untouched.all()
    assert torch.equal(got.cpu()[untouched] * 255, pixels[untouched].float())


def test_augment_views_rejects_wrong_inputs() -> None:
    pixels = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(TypeError, match="uint8"):
        augment_views(pixels.float(), torch.zeros(2, NUM_PARAMS))
    with pytest.raises(ValueError, match=r"params of shape \(3, 12\) for 2 views"):
        augment_views(pixels, torch.zeros(3, NUM_PARAMS))


def test_draws_follow_the_augmentation_settings() -> None:
    """Rates and ranges of the drawn parameters, BYOL's asymmetric views: jitter 0.8, grayscale
    0.2, blur (1.0, 0.1), solarisation (0.0, 0.2); factors in their ranges; every order a
    permutation. 2000 draws per view: a rate's standard deviation is <= 0.011."""
    aug = TwoViewAugmentation()
    torch.manual_seed(0)
    for view, blur_p, solarize_p in ((0, 1.0, 0.0), (1, 0.1, 0.2)):
        p = torch.stack([draw_view_params(aug, view) for _ in range(2000)])
        jittered = (p[:, ORDER] >= 0).any(dim=1)
        assert abs(jittered.float().mean() - 0.8) < 0.04
        assert abs((p[:, GRAY] > 0).float().mean() - 0.2) < 0.04
        assert abs((p[:, BLUR] > 0).float().mean() - blur_p) < 0.04
        assert abs((p[:, SOLARIZE] > 0).float().mean() - solarize_p) < 0.04
        assert torch.equal(p[jittered][:, ORDER].sort(dim=1).values[0], torch.arange(4.0))
        assert (p[~jittered][:, ORDER] == -1).all() and (
            p[~jittered][:, :4] == torch.tensor([1.0, 1, 1, 0])
        ).all()
        for op, (low, high) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
            f = p[jittered, op]
            assert (
                f.min() >= low
                and f.max() <= high
                and f.min() < low + 0.02
                and f.max() > high - 0.02
            )
        sigma = p[p[:, BLUR] > 0, SIGMA]
        assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and abs(sigma.mean() - 1.05) < 0.05
        first = p[jittered][:, ORDER.start].long()
        assert (
            torch.bincount(first, minlength=4).float() / jittered.sum() - 0.25
        ).abs().max() < 0.05
    # A zero strength switches its operation off; the others keep their random order.
    off = TwoViewAugmentation(jitter=(0.4, 0.0, 0.2, 0.0), jitter_p=1.0)
    p = torch.stack([draw_view_params(off, 0) for _ in range(50)])
    assert ((p[:, ORDER] == 1) | (p[:, ORDER] == HUE)).sum() == 0
    assert ((p[:, ORDER] >= 0).sum(dim=1) == 2).all()


def test_no_work_per_image_on_the_device_path() -> None:
    """The operators augment_views dispatches do not grow with the batch: the same count for 8
    and 64 views with every operation at every position of the order (a loop over images would
    multiply it by 8)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    def params(n: int) -> torch.Tensor:
        p = torch.zeros(n, NUM_PARAMS)
        p[:, :4] = torch.tensor([1.2, 0.8, 1.5, 0.05])
        p[:, ORDER] = torch.stack([torch.arange(4).roll(k) for k in range(n)]).float()  # cyclic
        p[::2, GRAY] = p[::2, BLUR] = p[1::2, SOLARIZE] = 1.0
        p[:, SIGMA] = 1.0
        return p

    counts = []
    for n in (8, 64):
        pixels, p = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8), params(n)
        with CountOps() as mode:
            augment_views(pixels, p)
        counts.append(mode.count)
    assert counts[0] == counts[1] and counts[0] > 50
