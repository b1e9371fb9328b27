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
)

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T


def random_image(w: int = 64, h: int = 48, seed: int = 0, mode: str = "RGB") -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def test_two_view_shapes_and_normalisation() -> None:
    aug = TwoViewAugmentation(crop_size=32)
    v1, v2 = TwoViewTransform(aug)(random_image(mode="L"))  # grayscale input -> RGB views
    assert v1.shape == v2.shape == (3, 32, 32) and v1.dtype == torch.float32
    assert not torch.equal(v1, v2)
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
    expected = (np.asarray(img, dtype=np.float32) / 255.0 - np.array(plain.mean)) / np.array(
        plain.std
    )
    np.testing.assert_allclose(v1.permute(1, 2, 0).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_two_view_deterministic_under_seed() -> None:
    transform, img = TwoViewTransform(), random_image(seed=3)
    torch.manual_seed(7)
    a = transform(img)
    torch.manual_seed(7)
    b = transform(img)
    torch.manual_seed(8)
    c = transform(img)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_view_specific_probabilities_are_wired() -> None:
    transform = TwoViewTransform(TwoViewAugmentation(blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2)))
    blur1, blur2 = transform.view1.transforms[4], transform.view2.transforms[4]
    assert isinstance(blur1.transforms[0], T.GaussianBlur)
    assert (blur1.p, blur2.p) == (1.0, 0.1)
    assert (transform.view1.transforms[5].p, transform.view2.transforms[5].p) == (0.0, 0.2)
    crop = transform.view1.transforms[0]
    assert crop.scale == (0.08, 1.0)
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))


def test_crop_scale_reaches_the_area_range(monkeypatch: pytest.MonkeyPatch) -> None:
    """Record every crop box: areas span crop_scale (not the aspect-ratio range)."""
    boxes: list[tuple[int, int, int, int]] = []
    original = T.RandomResizedCrop.get_params

    def recording(img, scale, ratio):
        box = original(img, scale, ratio)
        boxes.append(box)
        return box

    monkeypatch.setattr(T.RandomResizedCrop, "get_params", staticmethod(recording))
    transform = TwoViewTransform(TwoViewAugmentation(crop_size=8))
    img = random_image(100, 100)
    torch.manual_seed(0)
    for _ in range(60):
        transform(img)
    areas = np.array([h * w / (100 * 100) for _, _, h, w in boxes])
    aspect = np.array([w / h for _, _, h, w in boxes])
    assert len(areas) == 120
    assert areas.min() >= 0.08 - 0.02 and areas.max() <= 1.0
    assert areas.min() < 0.15 and areas.max() > 0.85  # reaches both ends of (0.08, 1)
    assert aspect.min() > 0.7 and aspect.max() < 1.4


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
