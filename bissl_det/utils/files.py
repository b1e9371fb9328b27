"""Writing files atomically: a failed or interrupted write never leaves half a file.

A leaf: checkpoints (:mod:`bissl_det.checkpoint.io`), run records and results all write through
:func:`atomic_write_text` or the writer beneath it.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile

__all__ = ["atomic_write_text"]


def _atomic_write(path: str | os.PathLike[str], write) -> None:
    """``write(file)`` into a temporary file next to ``path``, fsync, then rename over ``path``.

    A failed or interrupted write never leaves a partial file at ``path``, and an existing file
    there survives unchanged. Temporary files are named ``.<name>.<random>.tmp``.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(
        dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as err:
        # A full disk or quota: torch.save says only "enforce fail ... file write failed".
        _remove(tmp_path)
        free = shutil.disk_usage(directory).free
        raise OSError(
            getattr(err, "errno", None) or errno.EIO,
            f"writing {path} failed ({type(err).__name__}: {str(err).splitlines()[0]}); "
            f"{free / 2**20:.0f} MiB free on its disk now. The files already there are "
            "unchanged; free space (or move OUTPUT_DIR) and rerun with --resume",
        ) from err
    except BaseException:
        # Also on KeyboardInterrupt: never leave the temporary file behind.
        _remove(tmp_path)
        raise


def _remove(tmp_path: str) -> None:
    if os.path.exists(tmp_path):
        os.remove(tmp_path)


def atomic_write_text(text: str, path: str | os.PathLike[str]) -> None:
    """Write a small text file (e.g. the ``last_checkpoint`` tag) atomically."""
    _atomic_write(path, lambda f: f.write(text.encode()))
