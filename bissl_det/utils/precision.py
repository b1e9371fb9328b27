"""TF32 decided per computation, not inherited from torch's global switches.

On Ampere and newer GPUs cuDNN convolutions run in TF32 by default (10-bit mantissa, about 1e-3
relative error per product), and so do matmuls when ``torch.backends.cuda.matmul.allow_tf32`` or
``torch.set_float32_matmul_precision("high")`` says so. The curvature products and the solvers of
the implicit gradient need float32: their residuals are logged to 1e-6 and Krylov recurrences
amplify product errors. :func:`tf32` sets both switches for a block and restores them after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["tf32"]


@contextlib.contextmanager
def tf32(allowed: bool) -> Iterator[None]:
    """Allow (or forbid) TF32 in cuBLAS matmuls and cuDNN convolutions inside the block; the
    previous settings come back on exit, also after an exception. No effect without CUDA."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
