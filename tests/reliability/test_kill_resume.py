"""A BiSSL run killed mid-run and resumed ends exactly where an uninterrupted run ends.

Also: a checkpoint write that dies midway leaves the previous checkpoint and its tag intact.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from tests.helpers import TINY_C4, tiny_config

import pytest
import torch

from .runs import ENV, assert_same_weights, bissl_command, reference_run, run

KILL_AFTER = "model_0000001.pth"  # written after stage index 1 of 0..3: two stages remain


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(demo_workdir, tmp_path, tmp_path_factory):
    out_a = tmp_path / "killed"
    victim = subprocess.Popen(
        bissl_command(out_a),
        cwd=demo_workdir,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (out_a / KILL_AFTER).exists():
        assert victim.poll() is None, "the run to be killed ended before writing its checkpoint"
        assert time.monotonic() < deadline, f"{KILL_AFTER} never appeared"
        time.sleep(0.005)
    still_running = victim.poll() is None
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert still_running, "the run finished before it was killed: make it longer"
    assert victim.returncode == -signal.SIGKILL
    assert not (out_a / "model_final.pth").exists(), "killed too late: training had finished"
    # The kill can land between the checkpoint's rename and the tag's: either is a good state.
    tag = (out_a / "last_checkpoint").read_text().strip()
    assert tag in {KILL_AFTER, "model_0000000.pth"}, tag
    resume_at = int(tag.removeprefix("model_").removesuffix(".pth")) + 1

    resumed = run(bissl_command(out_a, "--resume"), demo_workdir, timeout=120)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    out_b = reference_run(tmp_path_factory, demo_workdir)  # uninterrupted
    assert f"Starting training from iteration {resume_at}" in (out_a / "log.txt").read_text()

    assert_same_weights(out_a / "model_final.pth", out_b / "model_final.pth")
    # The exported result (theta) is the same file content too.
    assert_same_weights(out_a / "lower_backbone.pth", out_b / "lower_backbone.pth")


@pytest.mark.usefixtures("one_thread")
def test_failed_checkpoint_write_keeps_the_last_good_one(in_demo_workdir, tmp_path, monkeypatch):
    from bissl_det.engine import BilevelTrainer
    from bissl_det.engine import checkpointer as ckpt

    cfg = tiny_config(TINY_C4, tmp_path / "out", "SEED", "0")
    trainer = BilevelTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.checkpointer.save("model_0000000", iteration=0)
    good = tmp_path / "out" / "model_0000000.pth"
    good_bytes = good.read_bytes()

    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        # Write part of the payload to the temporary file, then die as a full disk would.
        real_save({"partial": torch.zeros(3)}, f, *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with torch.no_grad():
        next(trainer.model.parameters()).add_(1.0)
    with pytest.raises(OSError, match="No space left"):
        trainer.checkpointer.save("model_0000001", iteration=1)
    with pytest.raises(OSError, match="No space left"):
        trainer.checkpointer.save("model_0000000", iteration=1)  # overwriting the good one
    monkeypatch.setattr(ckpt.torch, "save", real_save)

    out = tmp_path / "out"
    assert (out / "last_checkpoint").read_text() == "model_0000000.pth"
    assert good.read_bytes() == good_bytes
    assert not (out / "model_0000001.pth").exists()
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name], "temporary files left behind"
    # The tag still resolves to a loadable checkpoint of the state before the failed writes.
    assert trainer.checkpointer.get_checkpoint_file() == str(good)
    state = torch.load(good, map_location="cpu", weights_only=True)
    assert state["iteration"] == 0
