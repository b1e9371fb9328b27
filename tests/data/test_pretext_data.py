"""Pretext data: two-view transform, image discovery, corrupt files, the resumable sampler."""

from __future__ import annotations

import io
import logging
from pathlib import Path

from bissl_det.data.pretext import (
    InfiniteSampler,
    TwoViewAugmentation,
    TwoViewTransform,
    UnlabeledImages,
    find_images,
    normalise_pixels,
    random_crop_box,
)
from bissl_det.data.view_augment import BLUR, NUM_PARAMS, PretextView, augment_views

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader


def random_image(w: int = 64, h: int = 48, seed: int = 0, mode: str = "RGB") -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def test_two_view_shapes_and_normalisation() -> None:
    aug = TwoViewAugmentation(crop_size=32)
    v1, v2 = TwoViewTransform(aug)(random_image(mode="L"))  # grayscale input -> RGB views
    assert isinstance(v1, PretextView) and isinstance(v2, PretextView)
    assert v1.pixels.shape == v2.pixels.shape == (3, 32, 32) and v1.pixels.dtype == torch.uint8
    assert v1.params.shape == (NUM_PARAMS,) and v1.params.dtype == torch.float32
    assert not torch.equal(v1.pixels, v2.pixels)
    # Identity-like augmentation: the view is exactly the normalised resized image.
    plain = TwoViewAugmentation(
        crop_size=16,
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        flip_p=0.0,
        jitter_p=0.0,
        gray_p=0.0,
        blur_p=(0.0, 0.0),
        solarize_p=(0.0, 0.0),
    )
    img = random_image(16, 16)
    v1, _ = TwoViewTransform(plain)(img)
    np.testing.assert_array_equal(v1.pixels.permute(1, 2, 0).numpy(), np.asarray(img))
    # Normalised on the device: the uint8 batch becomes (x / 255 - mean) / std, as does the
    # augmented float batch (0-1 scale).
    expected = (np.asarray(img, dtype=np.float32) / 255.0 - np.array(plain.mean)) / np.array(
        plain.std
    )
    batch = torch.stack([v1.pixels, v1.pixels])
    normalised = normalise_pixels(batch, plain.mean, plain.std)
    assert normalised.dtype == torch.float32 and normalised.shape == (2, 3, 16, 16)
    np.testing.assert_allclose(normalised[1].permute(1, 2, 0).numpy(), expected, atol=1e-5)
    augmented = augment_views(batch, torch.stack([v1.params, v1.params]))
    torch.testing.assert_close(normalise_pixels(augmented, plain.mean, plain.std), normalised)
    with pytest.raises(TypeError, match="uint8 or floating"):
        normalise_pixels(batch.int(), plain.mean, plain.std)


def test_two_view_deterministic_under_seed() -> None:
    transform, img = TwoViewTransform(), random_image(seed=3)
    torch.manual_seed(7)
    a = transform(img)
    torch.manual_seed(7)
    b = transform(img)
    torch.manual_seed(8)
    c = transform(img)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.pixels, y.pixels) and torch.equal(x.params, y.params)
    assert not torch.equal(a[0].pixels, c[0].pixels)
    assert not torch.equal(a[0].params, c[0].params)


PLAIN = {
    "crop_scale": (1.0, 1.0),
    "crop_ratio": (1.0, 1.0),
    "flip_p": 0.0,
    "jitter_p": 0.0,
    "gray_p": 0.0,
    "blur_p": (0.0, 0.0),
    "solarize_p": (0.0, 0.0),
    "mean": (0.0, 0.0, 0.0),
    "std": (1.0, 1.0, 1.0),
}


def pixels(view: PretextView) -> np.ndarray:
    """A worker's view, augmented as on the device, as HxWx3 float values on the 0-255 scale."""
    augmented = augment_views(view.pixels[None], view.params[None])[0]
    return 255 * augmented.permute(1, 2, 0).numpy()


def test_flip_probability_measured_over_many_draws() -> None:
    img = random_image(16, 16, seed=1)
    transform = TwoViewTransform(TwoViewAugmentation(crop_size=16, **{**PLAIN, "flip_p": 0.3}))
    plain = np.asarray(img, dtype=np.float32)
    torch.manual_seed(0)
    flips = 0
    for _ in range(400):
        for v in (pixels(v) for v in transform(img)):
            is_plain = np.allclose(v, plain, atol=1e-3)
            is_flipped = np.allclose(v, plain[:, ::-1], atol=1e-3)
            assert is_plain != is_flipped  # every view is exactly one of the two
            flips += is_flipped
    # 800 draws of p = 0.3: mean 240, std 13; p = 0.5 (or 0.7) would lie 12 (or 25) std away.
    assert 200 < flips < 280


def _coordinate_image(size: int = 256) -> Image.Image:
    """Red = x, green = y (0..255): a crop's content says where it came from."""
    ramp = np.arange(size, dtype=np.uint8)
    zeros = np.zeros((size, size), dtype=np.uint8)
    return Image.fromarray(
        np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), zeros], axis=-1)
    )


def _crop_extent(view: PretextView, crop_size: int) -> tuple[float, float]:
    """Width and height of the source crop, from the ramps at the view's edges (pixel units)."""
    v = pixels(view)
    span_x = v[:, -1, 0].mean() - v[:, 0, 0].mean()  # centres of the first and last columns
    span_y = v[-1, :, 1].mean() - v[0, :, 1].mean()
    return span_x * crop_size / (crop_size - 1), span_y * crop_size / (crop_size - 1)


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.25, 0.25)])
def test_crop_area_and_aspect_measured_from_the_crops(scale) -> None:
    """The crop's area fraction spans crop_scale and its aspect ratio stays in 3/4..4/3, measured
    from the crops' content. (Passing the scale bounds as the aspect ratio, a bug of the BiSSL
    authors' code, would give aspect ratios down to 0.08.)"""
    img, size = _coordinate_image(), 24
    plain = {**PLAIN, "crop_scale": scale, "crop_ratio": (3 / 4, 4 / 3)}
    transform = TwoViewTransform(TwoViewAugmentation(crop_size=size, **plain))
    torch.manual_seed(0)
    areas, aspects = [], []
    for _ in range(100):
        for view in transform(img):
            w, h = _crop_extent(view, size)
            areas.append(w * h / 256**2)
            aspects.append(w / h)
    areas, aspects = np.array(areas), np.array(aspects)
    # Edge sampling blurs a crop's measured extent by about a pixel of the 256 px source.
    assert areas.min() > scale[0] - 0.02 and areas.max() < scale[1] + 0.02
    assert aspects.min() > 3 / 4 - 0.03 and aspects.max() < 4 / 3 + 0.05
    if scale[0] < scale[1]:
        assert areas.min() < 0.15 and areas.max() > 0.85  # both ends of the range are reached
        assert aspects.min() < 0.8 and aspects.max() > 1.25


def _total_variation(v: np.ndarray) -> float:
    return float(np.abs(np.diff(v, axis=0)).sum() + np.abs(np.diff(v, axis=1)).sum())


def test_blur_p1_on_view1_smooths_and_view2_is_untouched() -> None:
    img = random_image(32, 32, seed=2)
    plain = np.asarray(img, dtype=np.float32)
    transform = TwoViewTransform(TwoViewAugmentation(crop_size=32, **{**PLAIN, "blur_p": (1, 0)}))
    torch.manual_seed(0)
    ratios = []
    for _ in range(60):
        v1, v2 = (pixels(v) for v in transform(img))
        ratios.append(_total_variation(v1) / _total_variation(plain))
        np.testing.assert_allclose(v2, plain, atol=1e-3)
    ratios = np.array(ratios)
    # sigma ~ U(0.1, 2): below ~0.3 a 3x3 kernel rounds back to the image (about 10% of draws).
    assert (ratios < 0.99).mean() > 0.75 and ratios.max() <= 1.0 and ratios.min() < 0.6


def test_solarize_inverts_exactly_the_pixels_at_or_above_128() -> None:
    values = np.array(
        [[0, 127, 128, 200], [255, 64, 129, 10], [1, 2, 254, 130], [126, 140, 90, 250]],
        dtype=np.uint8,
    )
    img = Image.fromarray(np.repeat(values[..., None], 3, axis=2))
    aug = TwoViewAugmentation(crop_size=4, **{**PLAIN, "solarize_p": (0.0, 1.0)})
    v1, v2 = (pixels(v) for v in TwoViewTransform(aug)(img))
    expected = np.where(values >= 128, 255 - values, values).astype(np.float32)
    np.testing.assert_allclose(v1[..., 0], values, atol=1e-3)  # p = 0 on view 1
    np.testing.assert_allclose(v2[..., 0], expected, atol=1e-3)


def test_grayscale_p1_gives_equal_channels_of_the_luma() -> None:
    img = random_image(8, 8, seed=4)
    v1, _ = TwoViewTransform(TwoViewAugmentation(crop_size=8, **{**PLAIN, "gray_p": 1.0}))(img)
    v = pixels(v1)
    luma = np.asarray(img, dtype=np.float32) @ np.array([0.299, 0.587, 0.114])
    assert np.allclose(v[..., 0], v[..., 1]) and np.allclose(v[..., 1], v[..., 2])
    np.testing.assert_allclose(v[..., 0], luma, atol=0.05)  # torchvision's weights: 0.2989 red


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"crop_scale": (0.08, 4 / 3)}, "crop_scale"),
        ({"flip_p": 1.5}, "flip_p"),
        ({"blur_p": (1.0,)}, "blur_p"),
        ({"interpolation": "nearest"}, "interpolation"),
    ],
)
def test_augmentation_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TwoViewAugmentation(**kwargs)


def make_folder(root: Path) -> list[Path]:
    (root / "sub" / "deeper").mkdir(parents=True)
    paths = [root / "b.png", root / "sub" / "a.JPG", root / "sub" / "deeper" / "c.webp"]
    for i, (p, fmt) in enumerate(zip(paths, ["PNG", "JPEG", "WEBP"], strict=True)):
        random_image(seed=i).save(p, format=fmt)
    (root / "notes.txt").write_text("not an image")
    return paths


def test_find_images(tmp_path: Path) -> None:
    paths = make_folder(tmp_path)
    assert find_images(tmp_path) == sorted(paths)
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        find_images(tmp_path / "missing_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no images \(\.jpg"):
        find_images(tmp_path / "empty")


def write_good(folder: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        p = folder / f"good{i}.png"
        random_image(16, 16, seed=i).save(p)
        paths.append(p)
    return paths


def truncated_png(path: Path) -> None:
    buf = io.BytesIO()
    random_image(32, 32).save(buf, format="PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_unlabeled_images_skips_and_counts_corrupt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = write_good(tmp_path, 3)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    ds = UnlabeledImages([good[0], bad, *good[1:]], transform=None)
    with caplog.at_level(logging.WARNING):
        img = ds[1]  # bad -> replaced by the next index
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(good[1]).convert("RGB")))
    assert ds.num_bad == 1 and ds.bad_files == [bad]
    assert str(bad) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ds[1]
    assert caplog.text == ""  # warned once per file
    assert ds.num_bad == 1
    # The transform runs on good images.
    ds_t = UnlabeledImages(good, transform=lambda im: im.size)
    assert ds_t[0] == (16, 16)


def test_unlabeled_images_raises_past_limit(tmp_path: Path) -> None:
    good = write_good(tmp_path, 2)
    bad1, bad2 = tmp_path / "bad1.jpg", tmp_path / "bad2.png"
    bad1.write_bytes(b"")
    truncated_png(bad2)
    ds = UnlabeledImages([bad1, good[0], bad2, good[1]], max_bad_fraction=0.01)
    assert ds.max_bad == 1  # at least one failure is always tolerated
    ds[0]
    with pytest.raises(RuntimeError, match=r"2 of 4 images failed.*bad1\.jpg, .*bad2\.png"):
        ds[2]
    # A larger fraction tolerates both.
    ds = UnlabeledImages([bad1, good[0], bad2, good[1]], max_bad_fraction=0.5)
    ds[0], ds[2]
    assert ds.num_bad == 2
    with pytest.raises(ValueError, match="max_bad_fraction"):
        UnlabeledImages(good, max_bad_fraction=2.0)


def take(sampler: InfiniteSampler, n: int) -> list[int]:
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_infinite_sampler_epochs_are_permutations_and_deterministic() -> None:
    s = InfiniteSampler(10, seed=3, rank=0, world_size=1)
    stream = take(s, 30)
    for e in range(3):
        assert sorted(stream[10 * e : 10 * (e + 1)]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a new order every epoch
    assert take(InfiniteSampler(10, seed=3, rank=0, world_size=1), 30) == stream
    assert take(InfiniteSampler(10, seed=4, rank=0, world_size=1), 30) != stream
    assert take(InfiniteSampler(4, shuffle=False, rank=0, world_size=1), 6) == [0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("k", [0, 1, 7, 13])
def test_infinite_sampler_resume(world: int, k: int) -> None:
    for r in range(world):
        full = take(InfiniteSampler(10, seed=1, rank=r, world_size=world), k + 20)
        resumed = take(InfiniteSampler(10, seed=1, rank=r, world_size=world, start=k), 20)
        assert resumed == full[k:]


def test_infinite_sampler_ranks_partition_the_stream() -> None:
    world, size = 3, 12
    global_stream = take(InfiniteSampler(size, seed=5, rank=0, world_size=1), 2 * size)
    per_rank = [take(InfiniteSampler(size, seed=5, rank=r, world_size=world), 8) for r in range(3)]
    interleaved = [per_rank[r][i] for i in range(8) for r in range(world)]
    assert interleaved == global_stream
    assert sorted(per_rank[0][:4] + per_rank[1][:4] + per_rank[2][:4]) == list(range(size))
    with pytest.raises(ValueError, match="rank 3"):
        InfiniteSampler(size, rank=3, world_size=3)


def test_loader_batches_are_augmented_and_normalised_on_the_device(tmp_path: Path) -> None:
    """Collated views keep their parameters; pretext_batch_to_device augments each batch as
    one and normalises it with MODEL.PIXEL_MEAN/STD."""
    from bissl_det.data.build import pretext_batch_to_device
    from bissl_det.data.common import normalisation

    from detectron2.config import get_cfg

    aug = TwoViewAugmentation(crop_size=8, blur_p=(1.0, 0.0), solarize_p=(0.0, 1.0))
    loader = DataLoader(UnlabeledImages(write_good(tmp_path, 6), TwoViewTransform(aug)), 3)
    torch.manual_seed(0)
    v1, v2 = next(iter(loader))
    assert isinstance(v1, PretextView) and v1.pixels.shape == (3, 3, 8, 8)
    assert v1.pixels.dtype == torch.uint8 and v1.params.shape == (3, NUM_PARAMS)
    assert (v1.params[:, BLUR] == 1).all() and (v2.params[:, BLUR] == 0).all()
    cfg = get_cfg()
    cfg.INPUT.FORMAT = "RGB"
    mean, std = normalisation(cfg)
    x1, x2 = pretext_batch_to_device(cfg, (v1, v2), torch.device("cpu"))
    for x, v in ((x1, v1), (x2, v2)):
        assert x.dtype == torch.float32 and x.shape == (3, 3, 8, 8)
        one_by_one = [augment_views(p[None], q[None])[0] for p, q in zip(*v, strict=True)]
        torch.testing.assert_close(x, normalise_pixels(torch.stack(one_by_one), mean, std))
    assert not torch.allclose(x2, normalise_pixels(v2.pixels, mean, std))  # solarised


@pytest.mark.parametrize("size", [(500, 375), (60, 400)])
def test_crop_box_has_torchvision_distribution(size: tuple[int, int]) -> None:
    """random_crop_box against torchvision's RandomResizedCrop.get_params, 4000 boxes each: mean
    and spread of the area fraction, the log aspect ratio and the box centre agree within 0.015
    (their sampling error is <= 0.005; a uniform instead of log-uniform aspect moves the mean
    log aspect by 0.028, a position drawn over the whole image the centres' spread by 0.1)."""
    from torchvision.transforms import RandomResizedCrop

    width, height = size
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    image = Image.new("RGB", size)
    torch.manual_seed(0)
    ours = np.array([random_crop_box(width, height, scale, ratio) for _ in range(4000)])
    theirs = np.array([RandomResizedCrop.get_params(image, scale, ratio) for _ in range(4000)])

    def features(boxes: np.ndarray) -> np.ndarray:
        top, left, h, w = boxes.T
        return np.stack(
            [
                w * h / (width * height),
                np.log(w / h),
                (left + w / 2) / width,
                (top + h / 2) / height,
            ]
        )

    for a, b in zip(features(ours), features(theirs), strict=True):
        assert abs(a.mean() - b.mean()) < 0.015 and abs(a.std() - b.std()) < 0.015
    assert (ours[:, 2] <= height).all() and (ours[:, 3] <= width).all() and (ours >= 0).all()
    # No box fits (too flat for the aspect range): both take the same centred box.
    flat = Image.new("RGB", (1000, 10))
    assert random_crop_box(1000, 10, scale, ratio) == RandomResizedCrop.get_params(
        flat, scale, ratio
    )


def _jpeg(path: Path, orientation: int = 1) -> Path:
    """A 500x375 JPEG of smooth colour fields and fine texture, optionally EXIF-rotated."""
    rng = np.random.default_rng(0)
    low = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((500, 375), Image.Resampling.BICUBIC))
    pixels = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, quality=90, exif=exif)
    return path


@pytest.mark.parametrize("orientation", [1, 6])
def test_read_decodes_jpegs_at_reduced_scale_with_the_same_views(tmp_path, orientation) -> None:
    """TwoViewTransform.read (boxes drawn from the header, JPEG draft mode) against the views of
    the fully decoded image with the same draws: the same boxes (EXIF rotation included), flips
    and parameters; pixels within 2 levels on average (libjpeg's scaled decode filters
    differently), exactly equal where nothing is drafted (EXIF-rotated JPEG, PNG)."""
    from bissl_det.data.images import read_rgb

    path = _jpeg(tmp_path / "image.jpg", orientation)
    transform = TwoViewTransform(TwoViewAugmentation(crop_size=96))
    reduced, diffs = 0, []
    for seed in range(12):
        torch.manual_seed(seed)
        fast = transform.read(path)
        torch.manual_seed(seed)
        image = read_rgb(path)
        boxes = transform.boxes(*image.size)
        reduced += transform.reduction(boxes) > 1
        full = transform.views(image, boxes)
        for a, b in zip(fast, full, strict=True):
            assert torch.equal(a.params, b.params)
            diffs.append((a.pixels.float() - b.pixels.float()).abs().mean().item())
    assert image.size == ((375, 500) if orientation == 6 else (500, 375))
    assert 3 <= reduced < 12  # both kinds of draws happen
    if orientation == 6:  # rotated: decoded whole, the same views
        assert max(diffs) == 0.0
    else:  # measured 0.6-1.1; a box one source pixel off (the rotated case drafted) gives 5
        assert max(diffs) < 2.0 and np.mean(diffs) > 0.1, diffs
    # A PNG is decoded whole: read gives exactly the views of the decoded image.
    png = tmp_path / "image.png"
    Image.open(path).save(png)
    torch.manual_seed(0)
    fast = transform.read(png)
    torch.manual_seed(0)
    full = transform(read_rgb(png))
    assert all(torch.equal(a.pixels, b.pixels) for a, b in zip(fast, full, strict=True))
    # The data set reads through the transform.
    torch.manual_seed(0)
    from_dataset = UnlabeledImages([path], transform)[0]
    torch.manual_seed(0)
    assert torch.equal(from_dataset[0].pixels, transform.read(path)[0].pixels)
