"""Real tools/train_bissl.py runs on the tiny C4 config in subprocesses, and their weights."""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.helpers import TINY_C4, TRAIN_BISSL

import torch

# One thread per run: two runs share the CI machine, and the result must not depend on it.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STAGES = 4
# Every stage checkpointed; no evaluation at the end (it does not change the weights).
OPTS = [
    "BISSL.STAGES", str(STAGES),
    "BISSL.CHECKPOINT_PERIOD", "1",
    "SEED", "0",
    "DATASETS.TEST", "()",
]  # fmt: skip


def bissl_command(output_dir: Path, *extra: str) -> list[str]:
    """train_bissl.py on the tiny config with :data:`OPTS`; ``extra`` flags go before the opts."""
    return [
        sys.executable,
        str(TRAIN_BISSL),
        "--config-file",
        str(TINY_C4),
        *extra,
        *OPTS,
        "OUTPUT_DIR",
        str(output_dir),
    ]


def start(command: list[str], cwd: Path, new_session: bool = False) -> subprocess.Popen:
    """Start ``command`` in the background; its stdout and stderr together in ``communicate()``.

    ``new_session``: in a process group of its own (its pid is the group's id), as a job step.
    """
    return subprocess.Popen(
        command, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=new_session,
    )  # fmt: skip


def run(command: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run ``command`` to its end, capturing its output as text."""
    return subprocess.run(
        command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def reference_run(
    tmp_path_factory, cwd: Path, flags: Sequence[str] = (), opts: Sequence[str] = ()
) -> Path:
    """The finished, uninterrupted run of ``bissl_command(out, *flags) + opts``, made once per
    test session and shared by every test that compares against it (pytest-xdist workers too:
    a file lock in their common folder). Its folder is read-only to the tests."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent  # the folder every worker's basetemp is in
    key = hashlib.sha1("\0".join([*flags, "--", *opts]).encode()).hexdigest()[:12]
    out = root / "reference_runs" / key
    out.parent.mkdir(exist_ok=True)
    with open(out.parent / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second test waits for the first one's run
        if not (out / "DONE").exists():
            done = run(bissl_command(out, *flags) + list(opts), cwd, timeout=600)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            (out / "DONE").touch()
    return out


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The ``"model"`` state dict of a checkpoint or exported backbone."""
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    """The two files hold the same tensor names and bit-identical tensors."""
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys(), f"{a.name}: the tensor names differ"
    differ = [k for k in second if not torch.equal(first[k], second[k])]
    assert not differ, f"{a.name}: {len(differ)} of {len(second)} tensors differ, e.g. {differ[:5]}"
