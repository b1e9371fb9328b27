#!/usr/bin/env python
"""Fashion-MNIST as PNG folders for the reference study (configs/study/fashion_mnist.yaml).

    apt-get install dataset-fashion-mnist          # Debian/Ubuntu: the IDX files, ~30 MB
    python datasets/get_fashion_mnist.py           # -> datasets/fashion_mnist/

Reads the four IDX files of /usr/share/datasets/fashion-mnist (``--source``; the files of
https://github.com/zalandoresearch/fashion-mnist have the same names) and writes, every image
padded from 28 to 32 px and stored as RGB PNG:

    <out>/cls/train/<class>/  LABELLED per class, drawn (seeded) from the training split
    <out>/cls/test/<class>/   TEST per class from the test split
    <out>/unlabelled/         UNLABELLED training images disjoint from cls/train (pretext task)

Class folders are prefixed with their label (``0_t_shirt_top`` ...) so that sorted names keep
the official label order. Nothing here is committed: rerun the script (``make study``).
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("t_shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
           "bag", "ankle_boot")  # fmt: skip
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
DEBIAN_SOURCE = "/usr/share/datasets/fashion-mnist"


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip): magic 0x00 0x00 <type 0x08 = uint8> <ndim>, big-endian sizes, data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (header {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {array.size} bytes of data for shape {shape}")
    return array.reshape(shape)


def load_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = (read_idx(source / name) for name in FILES[split])
    if images.shape[1:] != (28, 28) or len(images) != len(labels) or labels.max() >= 10:
        raise ValueError(f"{source}: unexpected {split} data {images.shape} / {labels.shape}")
    return images, labels


def save(image: np.ndarray, path: Path) -> None:
    padded = np.pad(image, 2)  # 28 -> 32 px, black border as the background
    Image.fromarray(padded).convert("RGB").save(path)


def per_class(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:count] for c in range(len(CLASSES))]
    if min(len(c) for c in chosen) < count:
        raise ValueError(f"fewer than {count} images in some class")
    return np.concatenate(chosen)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=Path(DEBIAN_SOURCE))
    parser.add_argument("--out", type=Path, default=Path("datasets/fashion_mnist"))
    parser.add_argument("--labelled", type=int, default=50, help="training images per class")
    parser.add_argument("--test", type=int, default=200, help="test images per class")
    parser.add_argument("--unlabelled", type=int, default=10000, help="pretext images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    missing = [n for split in FILES.values() for n in split if not (args.source / n).is_file()]
    if missing:
        raise SystemExit(
            f"{args.source}: missing {missing}. On Debian/Ubuntu: apt-get install "
            "dataset-fashion-mnist; or download them from "
            "https://github.com/zalandoresearch/fashion-mnist and pass --source"
        )
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} is not empty: remove it first (it is generated)")
    rng = np.random.default_rng(args.seed)
    train_x, train_y = load_split(args.source, "train")
    test_x, test_y = load_split(args.source, "test")
    labelled = per_class(train_y, args.labelled, rng)
    rest = np.setdiff1d(np.arange(len(train_y)), labelled)
    unlabelled = rng.permutation(rest)[: args.unlabelled]
    test = per_class(test_y, args.test, rng)
    for split, x, y, indices in (
        ("train", train_x, train_y, labelled),
        ("test", test_x, test_y, test),
    ):
        for c, name in enumerate(CLASSES):
            (args.out / "cls" / split / f"{c}_{name}").mkdir(parents=True)
        for i in indices:
            save(x[i], args.out / "cls" / split / f"{y[i]}_{CLASSES[y[i]]}" / f"{i:05d}.png")
    (args.out / "unlabelled").mkdir(parents=True)
    for i in unlabelled:
        save(train_x[i], args.out / "unlabelled" / f"{i:05d}.png")
    print(
        f"wrote {args.out}: {len(labelled)} labelled, {len(test)} test, {len(unlabelled)} "
        "unlabelled images (32 px RGB PNG)"
    )
    return args.out


if __name__ == "__main__":
    main()
