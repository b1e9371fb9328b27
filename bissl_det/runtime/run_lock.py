"""One run per OUTPUT_DIR: an advisory lock that a crashed or killed run cannot leave stuck.

Two runs writing one folder would interleave checkpoints, ``last_checkpoint`` and metrics.json.
The lock is ``flock`` on ``OUTPUT_DIR/.run.lock``: the kernel releases it when the holding
process ends, however it ends (SIGKILL, out-of-memory kill, power loss of a client on NFS), so
there is never a stale lock to delete by hand. The file holds the holder's host, pid, start time
and command, for the message that refuses a second run. It is never deleted (deleting a lock file
lets two processes lock two different files of the same name).

Only the process that writes the folder (rank 0) takes it; the ranks of one run never refuse each
other. A process that already holds the lock of a folder gets it again (runs one after another
in one process, as tests do).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"
# Temporary files of interrupted atomic writes: ``.NAME.RANDOM.tmp`` (checkpoint/io.py, the one
# writer now); ``.NAME.tmpPID`` and ``.last_checkpoint.tmp``, left by earlier versions.
TEMP_FILE = re.compile(r"^\..+\.tmp\w*$")


class OutputDirInUse(RuntimeError):
    """Another live process holds the OUTPUT_DIR lock; the message names the folder and holder."""


class RunLock:
    """The held lock of one OUTPUT_DIR (see :func:`lock_output_dir`)."""

    def __init__(self, output_dir: Path, file: IO[str]):
        self.output_dir = output_dir
        self._file = file

    def release(self) -> None:
        """Unlock now (a process that ends releases it anyway) and clear the holder's details."""
        if self._file.closed:
            return
        self._file.truncate(0)
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        _HELD.pop(_key(self.output_dir), None)


_HELD: dict[str, RunLock] = {}


def _key(output_dir: Path) -> str:
    return os.path.realpath(output_dir)


def lock_output_dir(output_dir: str | os.PathLike) -> RunLock | None:
    """Take OUTPUT_DIR's lock for the life of this process, or refuse if another run holds it.

    Returns:
        The lock, or None on a file system without ``flock`` support (warned: runs unguarded).

    Raises:
        OutputDirInUse: a live process holds it; the message names the folder and the holder.
    """
    output_dir = Path(output_dir)
    held = _HELD.get(_key(output_dir))
    if held is not None:
        return held
    path = output_dir / LOCK_NAME
    file = open(path, "a+")  # noqa: SIM115  (kept open: the open file holds the lock)
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        file.close()
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise OutputDirInUse(
                f"OUTPUT_DIR {output_dir} is in use by another run ({describe_holder(path)}). "
                "Wait for it to end, stop it, or give this run another OUTPUT_DIR."
            ) from None
        logger.warning(
            "OUTPUT_DIR %s: its file system does not support locks (%s): nothing stops a "
            "second run from writing the same folder",
            output_dir,
            e,
        )
        return None
    file.truncate(0)
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": shlex.join([sys.executable, *sys.argv]),
    }
    file.write(json.dumps(holder) + "\n")
    file.flush()
    lock = _HELD[_key(output_dir)] = RunLock(output_dir, file)
    return lock


def describe_holder(lock_file: Path) -> str:
    """'pid P on host H since T: COMMAND' from a lock file, as far as it can be read."""
    try:
        holder = json.loads(lock_file.read_text())
    except (OSError, ValueError):
        return f"holder unknown: {lock_file} is being written"
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')}: "
        f"{holder.get('command')}"
    )


def remove_stray_temp_files(output_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary files that interrupted atomic writes left in OUTPUT_DIR (logged).

    Only safe while holding the folder's lock: no live run is writing them then.
    """
    removed = []
    for path in sorted(Path(output_dir).iterdir()):
        if TEMP_FILE.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
            logger.warning("Removed %s: a temporary file of an interrupted write", path)
    return removed
