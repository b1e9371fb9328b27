"""The pretext data pipeline: unlabeled images, two augmented views, an endless resumable sampler.

Loader workers crop, resize and flip each view with PIL and draw its colour/blur parameters;
the batch is augmented and normalised on the device (:mod:`.view_augment`,
``data.build.pretext_batch_to_device``). Images are read by :mod:`.images`; the same for
pretraining and BiSSL's lower level.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bissl_det.utils.distributed import rank as _rank
from bissl_det.utils.distributed import world_size as _world_size

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from .image_lists import compact_paths, path_at
from .images import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageReadError,
    ImageTooLargeError,
    read_rgb,
)
from .view_augment import PretextView, blur_kernel_size, draw, draw_view_params

__all__ = [
    "InfiniteSampler",
    "TwoViewAugmentation",
    "TwoViewTransform",
    "UnlabeledImages",
    "find_images",
    "random_crop_box",
    "PretextView",
    "blur_kernel_size",
    "normalise_pixels",
    "pixels_to_tensor",
]

logger = logging.getLogger(__name__)

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"TwoViewAugmentation.{name}: probability must be in [0, 1], got {p}")


@dataclass
class TwoViewAugmentation:
    """SimCLR/BYOL augmentation settings; pairs are (view 1, view 2).

    Attributes:
        crop_size: Output side length in pixels.
        crop_scale: Range of the crop's area as a fraction of the image (RandomResizedCrop scale).
        crop_ratio: Range of the crop's aspect ratio (kept at the standard 3/4..4/3).
        flip_p: Horizontal flip probability.
        jitter: Colour jitter strengths (brightness, contrast, saturation, hue).
        jitter_p: Probability of applying colour jitter (its four operations in a random order).
        gray_p: Probability of converting to grayscale.
        blur_p: Gaussian blur probability per view (kernel 10% of crop_size, sigma 0.1..2).
        solarize_p: Solarisation probability per view (threshold 128 of 255).
        mean: Normalisation mean (RGB, 0-1 scale), applied on the device.
        std: Normalisation std (RGB, 0-1 scale).
        interpolation: Resize interpolation of the crop, "bilinear" or "bicubic".
    """

    crop_size: int = 96
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: tuple[float, float] = (1.0, 0.1)
    solarize_p: tuple[float, float] = (0.0, 0.2)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.crop_size <= 0:
            raise ValueError(f"TwoViewAugmentation.crop_size must be > 0, got {self.crop_size}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(
                f"TwoViewAugmentation.crop_scale must satisfy 0 < lo <= hi <= 1, got "
                f"{self.crop_scale} (it is the area fraction, not the aspect ratio)"
            )
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"TwoViewAugmentation.crop_ratio invalid: {self.crop_ratio}")
        if len(self.jitter) != 4 or any(j < 0 for j in self.jitter):
            raise ValueError(f"TwoViewAugmentation.jitter needs 4 values >= 0, got {self.jitter}")
        if self.jitter[3] > 0.5:
            raise ValueError(
                f"TwoViewAugmentation.jitter: hue must be <= 0.5, got {self.jitter[3]}"
            )
        for name in ("flip_p", "jitter_p", "gray_p"):
            _check_prob(name, getattr(self, name))
        for name in ("blur_p", "solarize_p"):
            pair = getattr(self, name)
            if len(pair) != 2:
                raise ValueError(f"TwoViewAugmentation.{name} needs one value per view, got {pair}")
            for p in pair:
                _check_prob(name, p)
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"TwoViewAugmentation mean/std invalid: {self.mean}, {self.std}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(
                f"TwoViewAugmentation.interpolation must be one of {sorted(_RESAMPLE)}, "
                f"got {self.interpolation!r}"
            )


def pixels_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a ``(3, H, W)`` uint8 tensor (a copy: PIL's buffer is read-only).

    numpy's transposing copy: 0.09 ms at 224 px, where torch's ``permute().contiguous()`` of
    the same bytes took 0.16 ms."""
    return torch.from_numpy(
        np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
    )


def normalise_pixels(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Pixels ``(..., 3, H, W)``, uint8 (0-255) or floating (0-1), -> float32 ``(x - mean) / std``
    on the 0-1 scale.

    Done on the device after the copy: a uint8 batch is a quarter of the float32 bytes through
    the workers' shared memory and the host-to-device copy.
    """
    if images.dtype == torch.uint8:
        images = images.to(torch.float32) / 255.0
    elif not images.is_floating_point():
        raise TypeError(f"normalise_pixels: expected uint8 or floating pixels, got {images.dtype}")
    shape = (3, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(shape)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(shape)
    return (images.to(torch.float32) - mean_t) / std_t


def random_crop_box(
    width: int, height: int, scale: Sequence[float], ratio: Sequence[float]
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box ``(top, left, height, width)``: area fraction uniform in
    ``scale``, log aspect ratio uniform in ``log(ratio)``, position uniform; up to 10 tries for
    a box inside the image, else the centred largest box with the aspect clamped to ``ratio``.

    The uniforms come from one ``torch.rand`` call (torch's RNG, seeded as the loader seeds it):
    torchvision's ``get_params`` makes a dozen torch calls per view (0.05 ms)."""
    draws = torch.rand(10, 4, dtype=torch.float64).tolist()
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for u_area, u_ratio, u_top, u_left in draws:
        area = width * height * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_low + (log_high - log_low) * u_ratio)
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TwoViewTransform:
    """PIL image -> (view 1, view 2), each a :class:`PretextView`: uint8 ``(3, crop, crop)``
    pixels and the view's random colour/blur parameters.

    The worker does what needs the whole image: crop and resize in one ``Image.resize(box=...)``
    (the box from :func:`random_crop_box`, RandomResizedCrop's distribution) and the flip;
    :meth:`read` also reads the file, a JPEG at reduced scale where both crops allow.
    Colour jitter, grayscale, Gaussian blur (sigma ~ U(0.1, 2.0) on the authors' kernel of 10 %
    of the crop) and solarisation are drawn here (:func:`~.view_augment.draw_view_params`) and
    applied to the batch on the device (:func:`~.view_augment.augment_views`, called by
    ``data.build.pretext_batch_to_device``), then normalised with ``aug.mean``/``aug.std``.
    Randomness comes from torch's RNG only (seed it, or the DataLoader worker seed, to
    reproduce).
    """

    def __init__(self, aug: TwoViewAugmentation | None = None) -> None:
        self.aug = aug if aug is not None else TwoViewAugmentation()
        self.resample = _RESAMPLE[self.aug.interpolation]

    def boxes(self, width: int, height: int) -> list[tuple[int, int, int, int]]:
        """The two views' crop boxes ``(top, left, height, width)`` in an image of this size."""
        aug = self.aug
        return [random_crop_box(width, height, aug.crop_scale, aug.crop_ratio) for _ in range(2)]

    def reduction(self, boxes: Sequence[tuple[int, int, int, int]]) -> int:
        """The largest k in 1, 2, 4, 8 with every box at least k crop sizes on each side: a
        JPEG decoded at 1/k still gives each view more pixels than it keeps (no upsampling)."""
        smallest = min(min(h, w) for _, _, h, w in boxes)
        return next((k for k in (8, 4, 2) if smallest >= k * self.aug.crop_size), 1)

    def views(
        self, image: Image.Image, boxes: Sequence[tuple[int, int, int, int]], scale: int = 1
    ) -> tuple[PretextView, PretextView]:
        """The two views from ``boxes`` drawn on an image ``scale`` times as large as ``image``:
        crop + resize in one ``Image.resize(box=...)`` (sub-pixel boxes when scaled), flip, and
        the draw of each view's colour/blur parameters."""
        aug, size = self.aug, self.aug.crop_size
        out = []
        for view, (top, left, h, w) in enumerate(boxes):
            box = tuple(v / scale for v in (left, top, left + w, top + h))
            pixels = image.resize((size, size), self.resample, box=box)
            if draw(aug.flip_p):
                pixels = pixels.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            out.append(PretextView(pixels_to_tensor(pixels), draw_view_params(aug, view)))
        return out[0], out[1]

    def __call__(self, image: Image.Image) -> tuple[PretextView, PretextView]:
        if image.mode != "RGB":
            image = image.convert("RGB")
        return self.views(image, self.boxes(*image.size))

    def read(self, path: str | os.PathLike) -> tuple[PretextView, PretextView]:
        """Read an image file (``read_rgb``) and make its two views. The boxes are drawn from
        the header's size before the decode, so a JPEG whose crops are both at least 2, 4 or 8
        times the crop size decodes at that fraction (:meth:`reduction`; at 96 px most crops of
        a 500x375 image: a faster decode and a quarter of the pixels to resize)."""
        drawn: dict = {}

        def reduction(size: tuple[int, int]) -> int:
            drawn["size"], drawn["boxes"] = size, self.boxes(*size)
            return self.reduction(drawn["boxes"])

        image = read_rgb(path, reduction)
        scale = max(1, round(drawn["size"][0] / image.width))  # 1/k scale decodes ceil(w / k)
        return self.views(image, drawn["boxes"], scale)

    def __repr__(self) -> str:
        return f"TwoViewTransform({self.aug})"


def find_images(root: str | Path) -> list[Path]:
    """All images under ``root`` (recursive; extensions in IMAGE_EXTENSIONS, any case), sorted.

    One directory read per folder, no stat per file where the file system reports entry types
    (symbolic links to folders are not followed, as ``Path.rglob``).

    Raises:
        FileNotFoundError: ``root`` is not an existing folder.
        ValueError: no image was found.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    paths, folders = [], [os.fspath(root)]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                elif (
                    os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file()
                ):
                    paths.append(Path(entry.path))
    if not paths:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return sorted(paths)


class UnlabeledImages(Dataset):
    """Images without labels, decoded as RGB and passed through ``transform``.

    Corrupt-file policy: a file that fails to open or decode is logged once (with its path),
    remembered, and replaced by the next index (wrapping around), so one bad file never stops a
    long run. Once more than ``max(1, floor(max_bad_fraction * len(self)))`` distinct files have
    failed, a RuntimeError names the last bad files: that many failures means a broken dataset,
    not a stray file. With DataLoader workers each worker holds its own copy, so the limit applies
    per worker (each worker still sees every failure it hits). An image over the pixel limit is
    an error, not skipped (see :mod:`bissl_det.data.images`); 16-bit images are scaled to 8 bit.

    Args:
        paths: Image files (e.g. from :func:`find_images`).
        transform: Applied to the RGB PIL image; None returns the image itself. A transform
            with a ``read(path)`` method reads the file itself (:meth:`TwoViewTransform.read`:
            JPEGs at reduced scale where the crops allow), with the same corrupt-file policy.
        max_bad_fraction: Tolerated fraction of undecodable files.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        transform: Callable | None = None,
        max_bad_fraction: float = 0.01,
    ) -> None:
        if len(paths) == 0:
            raise ValueError("UnlabeledImages: empty list of image paths")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(
                f"UnlabeledImages: max_bad_fraction must be in [0, 1], got {max_bad_fraction}"
            )
        self.paths = compact_paths(paths)  # one buffer: workers do not copy 1M objects
        self.transform = transform
        self.max_bad_fraction = float(max_bad_fraction)
        self.max_bad = max(1, int(self.max_bad_fraction * len(self.paths)))
        self._bad: dict[int, str] = {}  # index -> error message, in order of discovery

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def bad_files(self) -> list[Path]:
        """Files that failed to decode so far (in this process)."""
        return [path_at(self.paths, i) for i in self._bad]

    @property
    def num_bad(self) -> int:
        """Number of distinct files that failed to decode so far (in this process)."""
        return len(self._bad)

    def _load(self, index: int):
        """The sample at ``index``, or None for an unreadable file (counted, logged)."""
        path = path_at(self.paths, index)
        read_views = getattr(self.transform, "read", None)
        try:
            if read_views is not None:
                return read_views(path)  # the transform reads the file (TwoViewTransform.read)
            image = read_rgb(path)
        except ImageTooLargeError:
            raise  # not a corrupt file: a limit to raise, or a file to remove (never skipped)
        except ImageReadError as e:
            self._bad[index] = str(e)
            logger.warning("skipping unreadable image %s (%s)", path, self._bad[index])
            if len(self._bad) > self.max_bad:
                last = ", ".join(str(p) for p in self.bad_files[-5:])
                raise RuntimeError(
                    f"UnlabeledImages: {len(self._bad)} of {len(self)} images failed to decode, "
                    f"more than the {self.max_bad} allowed (max_bad_fraction="
                    f"{self.max_bad_fraction}); last bad files: {last}"
                ) from e
            return None
        return self.transform(image) if self.transform is not None else image

    def __getitem__(self, index: int):
        n = len(self)
        for k in range(n):
            i = (index + k) % n
            if i in self._bad:
                continue
            sample = self._load(i)
            if sample is not None:
                return sample
        raise RuntimeError(f"UnlabeledImages: no decodable image among {n} files")


class InfiniteSampler(Sampler[int]):
    """Endless stream of dataset indices, sharded across processes and resumable.

    The global stream is the concatenation of epochs; epoch ``e`` is a permutation drawn from
    ``numpy.random.default_rng([seed, e])`` (or ``range(size)`` without shuffling), so it is the
    same on every process and in every run. Process ``rank`` takes global positions
    ``rank, rank + world_size, ...``; ranks therefore partition the stream.

    Args:
        size: Dataset length.
        seed: Shuffling seed (must be the same on every process).
        shuffle: Permute each epoch.
        rank: This process's rank (default: from the process group).
        world_size: Number of processes (default: from the process group).
        start: Number of indices THIS rank has already consumed (iterations done x per-process
            batch size) - iteration continues exactly where a previous run stopped.
    """

    def __init__(
        self,
        size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        start: int = 0,
    ) -> None:
        if size <= 0:
            raise ValueError(f"InfiniteSampler: size must be > 0, got {size}")
        self.size = int(size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.world_size = _world_size() if world_size is None else int(world_size)
        self.rank = _rank() if rank is None else int(rank)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"InfiniteSampler: rank {self.rank} not in [0, world_size={self.world_size})"
            )
        if start < 0:
            raise ValueError(f"InfiniteSampler: start must be >= 0, got {start}")
        self.start = int(start)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global order of indices in ``epoch`` (same on every process)."""
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def __iter__(self) -> Iterator[int]:
        pos = self.start * self.world_size + self.rank  # global position of the next index
        epoch, order = -1, np.empty(0, dtype=np.int64)
        while True:
            e = pos // self.size
            if e != epoch:
                epoch, order = e, self.epoch_order(e)
            yield int(order[pos % self.size])
            pos += self.world_size
