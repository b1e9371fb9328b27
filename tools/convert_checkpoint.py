#!/usr/bin/env python
"""Convert a ResNet checkpoint (torchvision, timm, MoCo, solo-learn, lightly, BiSSL) for Detectron2.

Usage::

    python tools/convert_checkpoint.py INPUT OUTPUT.pth [--format auto|torchvision|timm|moco|
        solo-learn|lightly|bissl|detectron2] [--depth 50] [--prefix module.encoder_q.]
        [--trust-pickle]

It prints the detected source format, how many tensors were converted, which heads were dropped
and which keys were left unconverted, and writes ``{"model": ..., "__author__": ...,
"matching_heuristics": True}`` (loadable as ``MODEL.WEIGHTS``). It refuses, with exit code 2 and
nothing written, when a backbone key is missing (or unexpected for ``--depth``).

A converted torchvision-style checkpoint needs these config values, as MoCo's detection configs
set them; Detectron2's defaults describe Caffe2 MSRA weights instead::

    MODEL:
      PIXEL_MEAN: [123.675, 116.280, 103.530]   # torchvision's ImageNet mean, in 0-255 RGB
      PIXEL_STD: [58.395, 57.120, 57.375]       # torchvision's ImageNet std, in 0-255 RGB
      RESNETS:
        STRIDE_IN_1X1: False   # torchvision's Bottleneck strides in the 3x3 conv, not the 1x1
    INPUT:
      FORMAT: "RGB"            # torchvision models were trained on RGB, not BGR
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterable, Sequence

from bissl_det.checkpoint import (
    FORMATS,
    UntrustedCheckpointError,
    check_complete,
    convert_to_detectron2,
    is_head_key,
    load_checkpoint_file,
    resnet_detectron2_keys,
    save_backbone_checkpoint,
)
from bissl_det.utils.cli import describe

EXIT_REFUSED = 2


def _head_groups(keys: Iterable[str]) -> Counter[str]:
    """Count dropped keys per module (the key up to its first head component)."""
    groups: Counter[str] = Counter()
    for key in keys:
        parts = key.split(".")
        end = next((i for i, part in enumerate(parts) if is_head_key(part)), len(parts) - 1)
        groups[".".join(parts[: end + 1])] += 1
    return groups


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the converter."""
    parser = describe(argparse.ArgumentParser(), __doc__)
    parser.add_argument("input", help="source checkpoint (.pth/.pt/.ckpt/.tar, or Detectron2 .pkl)")
    parser.add_argument("output", help="destination Detectron2 backbone checkpoint (.pth)")
    parser.add_argument("--format", default="auto", choices=("auto", *FORMATS))
    parser.add_argument("--depth", type=int, default=50, choices=(18, 34, 50, 101, 152))
    parser.add_argument(
        "--prefix", default=None, help="prefix of the backbone keys, when several are present"
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="fully unpickle files that hold Python objects (runs code: trusted files only)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the conversion; returns the process exit code (0 written, 2 refused)."""
    args = build_parser().parse_args(argv)
    try:
        checkpoint = load_checkpoint_file(args.input, trust_pickle=args.trust_pickle)
        result = convert_to_detectron2(checkpoint, fmt=args.format, backbone_prefix=args.prefix)
    except (FileNotFoundError, UntrustedCheckpointError, ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED

    prefix = f" (backbone prefix '{result.backbone_prefix}')" if result.backbone_prefix else ""
    print(f"source format: {result.source_format}{prefix}")
    print(f"converted tensors: {len(result.model)}")
    print(f"dropped head tensors: {len(result.dropped_heads)}")
    for group, count in sorted(_head_groups(result.dropped_heads).items()):
        print(f"  {group}: {count}")
    print(f"unconverted keys: {len(result.unconverted)}")
    for key in result.unconverted:
        print(f"  {key}")

    try:
        check_complete(result.model, resnet_detectron2_keys(args.depth))
        save_backbone_checkpoint(
            args.output,
            result.model,
            extra={"source_format": result.source_format, "depth": args.depth},
        )
    except ValueError as err:
        print(
            f"error: refusing to write {args.output}: {args.input}: {err} (check --depth, or "
            "choose the backbone with --format/--prefix)",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
