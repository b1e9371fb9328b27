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
from functools import partial

import torch
from detectron2.data.datasets.pascal_voc import load_voc_instances
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from .images import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, read_rgb
from .validation import DatasetValidationError, resolve_path
from .voc import check_voc_objects, check_voc_root

__all__ = [
    "IGNORE_TARGET",
    "ImageFolderDataset",
    "VOC07MultiLabelDataset",
    "classification_transforms",
]

# Multi-label target of a class that appears only as difficult objects.
IGNORE_TARGET = -1.0
# Test-time resize before the centre crop: the usual 224/256 ratio.
TEST_CROP_FRACTION = 0.875

Transform = Callable[[Image.Image], object]


class ImageFolderDataset(ImageFolder):
    """torchvision's ImageFolder (``<root>/<class>/<image>``) read by the project's image reader,
    with a given class order and errors that name the folder.

    Args:
        root: Folder with one sub-folder per class (hidden folders are ignored).
        transform: Applied to the RGB PIL image; None returns the PIL image.
        classes: Class names in label order. None: the sorted sub-folder names. If given, the
            sub-folders must be exactly these classes (e.g. so train and test share the order).
            Samples are ordered by label, then by file name.

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
        root = resolve_path(root, "image folder")
        if not os.path.isdir(root):
            raise DatasetValidationError(f"image folder {root!r} is not a directory")
        self._given_classes = None if classes is None else list(classes)
        super().__init__(root, transform, loader=read_rgb, allow_empty=True)
        empty = sorted(set(self.classes) - {self.classes[t] for t in self.targets})
        if empty:
            folders = [os.path.join(root, c) for c in empty]
            raise DatasetValidationError(
                f"class folder(s) {folders} have no images (extensions {IMAGE_EXTENSIONS})"
            )

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        folders = sorted(
            e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith(".")
        )
        if not folders:
            raise DatasetValidationError(f"image folder {directory!r} has no class sub-folders")
        classes = self._given_classes or folders
        if set(classes) != set(folders) or len(set(classes)) != len(classes):
            raise DatasetValidationError(
                f"image folder {directory!r}: class sub-folders {folders} do not match the given "
                f"classes {list(classes)} (missing folders: {sorted(set(classes) - set(folders))}, "
                f"unexpected folders: {sorted(set(folders) - set(classes))})"
            )
        return list(classes), {c: i for i, c in enumerate(classes)}

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, **kwargs):
        samples = ImageFolder.make_dataset(
            directory, class_to_idx, extensions, is_valid_file, **kwargs
        )
        # Label order (a stable sort: files stay sorted within a class), as the classes are given.
        return sorted(samples, key=lambda s: s[1])

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
        DatasetValidationError: Any problem :func:`~bissl_det.data.voc.check_voc_dataset`
            reports (the annotations are checked eagerly, as for detection).
    """

    def __init__(
        self,
        voc_root: str | os.PathLike,
        split: str,
        class_names: Sequence[str],
        transform: Transform | None = None,
    ) -> None:
        self.root = check_voc_root(voc_root, class_names)
        self.classes = list(class_names)
        self.transform = transform
        load = partial(load_voc_instances, self.root, split, self.classes)
        records, objects = check_voc_objects(
            f"{self.root}:{split}", self.root, split, self.classes, load
        )
        self.image_files: list[str] = [r["file_name"] for r in records]
        rows = []
        for record in records:
            row = torch.zeros(len(self.classes))
            flags = objects[record["image_id"]]
            for obj in flags:
                if not obj.difficult:
                    row[self.classes.index(obj.name)] = 1.0
            for obj in flags:
                if obj.difficult and row[self.classes.index(obj.name)] == 0:
                    row[self.classes.index(obj.name)] = IGNORE_TARGET
            rows.append(row)
        self.targets = torch.stack(rows)

    def __len__(self) -> int:
        return len(self.image_files)

    def __getitem__(self, index: int) -> tuple[object, torch.Tensor]:
        image = read_rgb(self.image_files[index])
        return (self.transform(image) if self.transform else image), self.targets[index].clone()


def classification_transforms(
    train: bool,
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_scale: Sequence[float] = (0.08, 1.0),
) -> T.Compose:
    """Standard preprocessing to a normalised ``3 x size x size`` tensor.

    Train: RandomResizedCrop(size, scale=crop_scale) + horizontal flip. Test:
    Resize(size / 0.875) + CenterCrop(size).
    """
    if int(size) != size or size <= 0:
        raise ValueError(f"classification_transforms: size={size!r} must be a positive integer")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(
            f"classification_transforms: mean={mean}, std={std} need 3 values, std > 0"
        )
    lo, hi = crop_scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(
            f"classification_transforms: crop_scale={tuple(crop_scale)} needs 0 < lo <= hi <= 1"
        )
    if train:
        geometry = [T.RandomResizedCrop(size, scale=(lo, hi)), T.RandomHorizontalFlip()]
    else:
        geometry = [T.Resize(round(size / TEST_CROP_FRACTION)), T.CenterCrop(size)]
    return T.Compose([*geometry, T.ToTensor(), T.Normalize(list(mean), list(std))])
