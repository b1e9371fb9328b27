"""Light classification data sets for fine-tuning and evaluation (not the detection loader).

- :class:`ImageFolderDataset`: ``<root>/<class>/<image>`` folders, single-label.
- :class:`VOC07MultiLabelDataset`: Pascal VOC images with multi-label targets from the XML, as in
  the VOC2007 classification protocol.
- :func:`classification_transforms`: the standard train/test preprocessing.

Multi-label target convention (shared with :mod:`bissl_det.evaluation.classification`):
``1`` = class present (at least one non-difficult object), ``0`` = absent, ``-1`` = ignore (the
class occurs only as "difficult" objects). The VOC devkit writes these as 1 / -1 / 0; we use -1 for
"ignore" so that ``target.clamp(min=0)`` is the plain multi-hot vector and ``target >= 0`` is the
loss mask.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from .detection import DatasetValidationError, parse_voc_annotation, read_voc_split, resolve_path

__all__ = [
    "IGNORE_TARGET",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "VOC07MultiLabelDataset",
    "classification_transforms",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Multi-label target of a class that appears only as difficult objects.
IGNORE_TARGET = -1.0
# Test-time resize before the centre crop: the usual 224/256 ratio.
TEST_CROP_FRACTION = 0.875

Transform = Callable[[Image.Image], object]


def _load_rgb(path: str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


class ImageFolderDataset(Dataset):
    """Single-label images stored as ``<root>/<class>/<image>``.

    Args:
        root: Folder with one sub-folder per class.
        transform: Applied to the RGB PIL image; None returns the PIL image.
        classes: Class names in label order. None: the sorted sub-folder names. If given, the
            sub-folders must be exactly these classes (e.g. so train and test share the order).

    Raises:
        DatasetValidationError: Missing root, no class folder, a class folder mismatch (naming the
            missing and unexpected names), or a class folder with no image.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Transform | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.root = resolve_path(root, "image folder")
        if not os.path.isdir(self.root):
            raise DatasetValidationError(f"image folder {self.root!r} is not a directory")
        folders = sorted(
            e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith(".")
        )
        if not folders:
            raise DatasetValidationError(f"image folder {self.root!r} has no class sub-folders")
        if classes is None:
            classes = folders
        elif set(classes) != set(folders) or len(set(classes)) != len(classes):
            raise DatasetValidationError(
                f"image folder {self.root!r}: class sub-folders {folders} do not match the given "
                f"classes {list(classes)} (missing folders: {sorted(set(classes) - set(folders))}, "
                f"unexpected folders: {sorted(set(folders) - set(classes))})"
            )
        self.classes: list[str] = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.transform = transform
        self.samples: list[tuple[str, int]] = []
        for cls in self.classes:
            folder = os.path.join(self.root, cls)
            files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not files:
                raise DatasetValidationError(
                    f"class folder {folder!r} has no images (extensions {IMAGE_EXTENSIONS})"
                )
            self.samples += [(os.path.join(folder, f), self.class_to_idx[cls]) for f in files]
        self.targets: list[int] = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[object, int]:
        path, target = self.samples[index]
        image = _load_rgb(path)
        return (self.transform(image) if self.transform else image), target

    def class_counts(self) -> list[int]:
        """Number of images per class, in label order."""
        return torch.bincount(torch.tensor(self.targets), minlength=len(self.classes)).tolist()


class VOC07MultiLabelDataset(Dataset):
    """Pascal VOC images with multi-label targets, as in the VOC2007 classification protocol.

    Targets are float tensors of shape ``(len(class_names),)``: 1 present, 0 absent, -1 ignore
    (the class appears in the image only as difficult objects). See the module docstring.

    Args:
        voc_root: VOC folder (``Annotations``, ``JPEGImages``, ``ImageSets/Main``).
        split: Split file stem, e.g. "trainval" or "test".
        class_names: Classes in label order.
        transform: Applied to the RGB PIL image; None returns the PIL image.

    Raises:
        DatasetValidationError: Any problem :func:`~bissl_det.data.detection.validate_voc_folder`
            reports (the annotations are parsed eagerly).
    """

    def __init__(
        self,
        voc_root: str | os.PathLike,
        split: str,
        class_names: Sequence[str],
        transform: Transform | None = None,
    ) -> None:
        self.root = resolve_path(voc_root, "VOC folder")
        self.classes = list(class_names)
        self.transform = transform
        self.image_files: list[str] = []
        rows = []
        for image_id in read_voc_split(self.root, split):
            record = parse_voc_annotation(self.root, image_id, self.classes)
            row = torch.zeros(len(self.classes))
            for obj in record.objects:
                if not obj.difficult:
                    row[obj.category_id] = 1.0
            for obj in record.objects:
                if obj.difficult and row[obj.category_id] == 0:
                    row[obj.category_id] = IGNORE_TARGET
            rows.append(row)
            self.image_files.append(record.file_name)
        self.targets = torch.stack(rows)

    def __len__(self) -> int:
        return len(self.image_files)

    def __getitem__(self, index: int) -> tuple[object, torch.Tensor]:
        image = _load_rgb(self.image_files[index])
        return (self.transform(image) if self.transform else image), self.targets[index].clone()


def classification_transforms(
    train: bool,
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """Standard preprocessing to a normalised ``3 x size x size`` tensor.

    Train: RandomResizedCrop(size) + horizontal flip. Test: Resize(size / 0.875) + CenterCrop(size).
    """
    if int(size) != size or size <= 0:
        raise ValueError(f"classification_transforms: size={size!r} must be a positive integer")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(
            f"classification_transforms: mean={mean}, std={std} need 3 values, std > 0"
        )
    if train:
        geometry = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    else:
        geometry = [T.Resize(round(size / TEST_CROP_FRACTION)), T.CenterCrop(size)]
    return T.Compose([*geometry, T.ToTensor(), T.Normalize(list(mean), list(std))])
