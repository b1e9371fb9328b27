"""Reading image files: the one reader of every loader (detection, pretext, classification).

Every failure names the file. Besides undecodable and truncated files, two classes of files are
handled explicitly because PIL alone gives a wrong result or an anonymous error:

- 16-bit grayscale images (mode ``I;16*``, e.g. 16-bit PNGs): PIL's ``convert("RGB")`` clips
  every value above 255, so the image turns white. They are scaled by their bit depth
  (``round(v / 257)``, 65535 -> 255). 32-bit integer and float images (modes ``I``, ``F``; a
  PNG's ``I`` is 16-bit, as older Pillow opens them) have no defined 8-bit scale and are
  refused. (PIL already reduces 16-bit RGB to 8 bits itself.)
- Decompression bombs: images of more than :func:`max_image_pixels` pixels are refused with the
  limit and how to raise it (PIL would only warn below twice its limit).

EXIF orientation is applied, as detectron2's ``read_image`` does, so every loader sees the image
the annotations refer to.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from detectron2.data.detection_utils import convert_PIL_to_numpy
from PIL import Image, ImageOps
from torchvision.datasets.folder import IMG_EXTENSIONS

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS_ENV",
    "ImageReadError",
    "ImageTooLargeError",
    "check_image_file",
    "max_image_pixels",
    "read_image_array",
    "read_rgb",
]

# File name endings of images, lower case: torchvision's set, so that our folder scans and its
# ImageFolder agree.
IMAGE_EXTENSIONS = IMG_EXTENSIONS
# torchvision's ImageNet statistics on the 0-1 scale (MODEL.PIXEL_MEAN/STD are these x 255).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Environment variable raising (or, with 0, removing) the pixel limit in every process.
MAX_PIXELS_ENV = "BISSL_MAX_IMAGE_PIXELS"
# PIL's own default limit (about 89.5 megapixels).
DEFAULT_MAX_PIXELS = 89_478_485
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_UNSCALABLE_MODES = ("I", "F")
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


class ImageReadError(OSError):
    """An image file cannot be read correctly; the message names the file and why."""


class ImageTooLargeError(ImageReadError):
    """An image has more pixels than the limit (a decompression bomb, or a genuine huge image)."""


def max_image_pixels() -> int | None:
    """The pixel limit: ``$BISSL_MAX_IMAGE_PIXELS`` (0: none), else PIL's default."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(value)
    except ValueError:
        raise ValueError(f"${MAX_PIXELS_ENV}={value!r} must be an integer (0: no limit)") from None
    return limit if limit > 0 else None


def _too_large(path: str, detail: str, limit: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"image {path!r} is too large ({detail}; the limit is {limit} pixels): a decompression "
        "bomb? If the image is genuine, raise the limit in the environment of every process: "
        f"export {MAX_PIXELS_ENV}=<pixels> (0: no limit)"
    )


def _open(path: str) -> Image.Image:
    """Open lazily (header only); refuse images over the pixel limit or without an 8-bit scale."""
    limit = max_image_pixels()
    Image.MAX_IMAGE_PIXELS = limit  # PIL's own check (it raises past twice the limit) agrees
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as e:
        raise _too_large(path, str(e), limit) from None
    if limit is not None and image.width * image.height > limit:
        image.close()
        raise _too_large(path, f"{image.width}x{image.height} pixels", limit)
    if image.mode in _UNSCALABLE_MODES and not _is_16bit(image):
        image.close()
        raise ImageReadError(
            f"image {path!r} has mode {image.mode!r} (32-bit integer or float pixels), which has "
            "no defined 8-bit scale: convert it to an 8-bit (or 16-bit) image"
        )
    return image


def _is_16bit(image: Image.Image) -> bool:
    """16-bit grayscale: modes I;16*, or mode I from a PNG (older Pillow; PNG has no 32-bit)."""
    return image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG")


def _scale_16bit(image: Image.Image) -> Image.Image:
    """16-bit values -> 8 bit by the bit depth: round(v / 257), so 65535 -> 255."""
    values = np.asarray(image).astype(np.uint32)
    return Image.fromarray(((values + 128) // 257).astype(np.uint8), mode="L")


def _draft(image: Image.Image, reduction: Callable[[tuple[int, int]], int]) -> None:
    """Let a JPEG decode at 1/k of its size (libjpeg's scaled IDCT, k in 2, 4, 8), with
    ``k = reduction((width, height))`` of the EXIF-oriented image; other formats decode whole.

    Only unrotated JPEGs: the reduced image's last row and column cover a partial block, which
    a flip or rotation moves to the start of an axis (a shift of up to k - 1 source pixels)."""
    orientation = image.getexif().get(0x0112, 1)
    size = image.size[::-1] if orientation in _SWAPPING_ORIENTATIONS else image.size
    k = reduction(size)
    if k > 1 and image.format == "JPEG" and orientation == 1:
        image.draft(image.mode, (image.width // k, image.height // k))


def _decode(path: str, reduction: Callable[[tuple[int, int]], int] | None = None) -> Image.Image:
    """The fully decoded, EXIF-oriented, 8-bit image; every failure names ``path``."""
    try:
        with _open(path) as image:
            if reduction is not None:
                _draft(image, reduction)
            image.load()  # the full decode happens here, inside the try
            sixteen_bit = _is_16bit(image)
            image = ImageOps.exif_transpose(image)
    except ImageReadError:
        raise
    except _DECODE_ERRORS as e:
        raise ImageReadError(
            f"image {path!r} cannot be decoded ({type(e).__name__}: {e}): the file is corrupt or "
            "truncated; replace it or remove it from the data set"
        ) from e
    return _scale_16bit(image) if sixteen_bit else image


def read_rgb(
    path: str | os.PathLike, reduction: Callable[[tuple[int, int]], int] | None = None
) -> Image.Image:
    """An image file as an 8-bit RGB PIL image (pretext and classification loaders).

    Args:
        path: The image file.
        reduction: Called once with the EXIF-oriented ``(width, height)`` from the header,
            before the decode; a JPEG without EXIF rotation is then decoded at about 1/k of
            that size for a returned k of 2, 4 or 8 (JPEG draft mode: the pretext views when
            their crops are large).

    Raises:
        ImageReadError: Undecodable, truncated, too large or unscalable; names the file.
    """
    return _decode(os.fspath(path), reduction).convert("RGB")


def read_image_array(path: str | os.PathLike, image_format: str = "RGB") -> np.ndarray:
    """An image file as detectron2's ``read_image`` returns it (HxWxC uint8 in ``image_format``),
    with 16-bit images scaled instead of clipped.

    Raises:
        ImageReadError: As :func:`read_rgb`.
    """
    return convert_PIL_to_numpy(_decode(os.fspath(path)), image_format)


def check_image_file(path: str | os.PathLike, decode: bool = False) -> tuple[int, int]:
    """Check an image file without keeping it; return its (EXIF-oriented) ``(width, height)``.

    Args:
        path: The image file.
        decode: Also decode every pixel (finds truncated files; the header alone is fast).

    Raises:
        ImageReadError: Missing, not an image, too large, an unsupported mode, or (``decode``)
            undecodable; the message names the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageReadError(f"image {path!r} is missing")
    if decode:
        image = _decode(path)
        return image.width, image.height
    try:
        with _open(path) as image:
            orientation = image.getexif().get(0x0112, 1)
            size = image.size
    except ImageReadError:
        raise
    except _DECODE_ERRORS as e:
        raise ImageReadError(
            f"image {path!r} is not a readable image ({type(e).__name__}: {e})"
        ) from e
    return size[::-1] if orientation in _SWAPPING_ORIENTATIONS else size
