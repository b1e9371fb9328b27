"""Errors that used to come at the first batch or deep in a run come at start-up, naming the key
or file; a disk that fills up mid-run names the file and leaves every earlier file intact."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys

from tests.helpers import REPO

import pytest

from .runs import ENV
from .test_safe_loading import TINY_FINETUNE, digests, survived

TIMEOUT = 240


def _finetune(out, *opts, cwd, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "finetune_det.py"), "--config-file"]
        + [str(TINY_FINETUNE), *opts, "OUTPUT_DIR", str(out)],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        preexec_fn=preexec_fn,
    )


@pytest.mark.e2e
@pytest.mark.parametrize(
    "opts, named",
    [
        (["SOLVER.STEPS", "(3,)"], "SOLVER.STEPS = (3,) must all be in (0, SOLVER.MAX_ITER = 3)"),
        (["SOLVER.STEPS", "(2, 1)"], "SOLVER.STEPS = (2, 1) must be increasing"),
        (["INPUT.MIN_SIZE_TRAIN", "(0,)"], "INPUT.MIN_SIZE_TRAIN = (0,) must be one or more sizes"),
        (["INPUT.MAX_SIZE_TRAIN", "-96"], "INPUT.MAX_SIZE_TRAIN = -96 must be > 0"),
        (["INPUT.MIN_SIZE_TEST", "-1"], "INPUT.MIN_SIZE_TEST = -1 must be >= 0"),
    ],
)
def test_values_that_failed_at_the_first_batch_fail_at_start_up(
    demo_workdir, tmp_path, opts, named
):
    out = tmp_path / "out"
    done = _finetune(out, *opts, cwd=demo_workdir)
    output = done.stdout + done.stderr
    assert done.returncode != 0 and named in output, output[-3000:]
    assert not out.exists() or not (out / "config.yaml").exists()


def _small_disk(limit: int):
    """A file-size limit as a stand-in for a full disk: writes past it fail with EFBIG."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.e2e
def test_a_full_disk_mid_run_names_the_file_and_keeps_earlier_files(demo_workdir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_0000000.pth").write_bytes(b"an earlier run's checkpoint")
    (out / "notes.txt").write_text("kept\n")
    before = digests(out)
    done = _finetune(
        out,
        "SOLVER.CHECKPOINT_PERIOD", "1", "DATASETS.TEST", "()",
        cwd=demo_workdir,
        preexec_fn=_small_disk(256 * 1024),
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert f"writing {out / 'model_0000000.pth'} failed" in output, output[-3000:]
    assert "MiB free on its disk" in output
    survived(before, out)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no partial file left
