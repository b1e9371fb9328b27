"""A run never resumes from, or writes over, a run that is not its own (real tool processes).

One finished tiny BiSSL run is made once; each case works on a copy of its folder and checks
that every file of it survives byte for byte."""

from __future__ import annotations

import json
import shutil
import sys

import bissl_det  # noqa: F401  (shims before detectron2)
from bissl_det.runtime.run_identity import (
    RunIdentityError,
    check_resume_checkpoint,
    run_identity,
)
from tests.helpers import REPO, TINY_C4

import pytest
import torch

from .runs import bissl_command, reference_run, run
from .test_safe_loading import TINY_FINETUNE, digests, survived

TIMEOUT = 240


@pytest.fixture(scope="module")
def finished_bissl(demo_workdir, tmp_path_factory):
    return reference_run(tmp_path_factory, demo_workdir)


@pytest.fixture
def bissl_dir(finished_bissl, tmp_path):
    """A private copy of the finished run, and the digests of its files."""
    out = tmp_path / "bissl"
    shutil.copytree(finished_bissl, out)
    # As if the run had been made here: a resume of the same config rewrites the same bytes.
    config = out / "config.yaml"
    config.write_text(config.read_text().replace(str(finished_bissl), str(out)))
    return out, digests(out)


def refused(done, *needles: str) -> str:
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    for needle in needles:
        assert needle in output, f"{needle!r} not in {output[-3000:]}"
    assert "Starting training" not in output  # refused before any work
    return output


@pytest.mark.e2e
def test_run_json_names_the_tool_kind_and_identity(finished_bissl):
    record = json.loads((finished_bissl / "run.json").read_text())
    assert (record["tool"], record["kind"]) == ("train_bissl", "bissl")
    saved = torch.load(finished_bissl / "model_final.pth", weights_only=True)["run_identity"]
    assert saved["identity"] == record["identity"]
    export = torch.load(finished_bissl / "lower_backbone.pth", weights_only=True)
    assert export["downstream_classes"] == ["circle", "square", "triangle", "cross"]


@pytest.mark.e2e
def test_finetuning_into_a_bissl_folder_is_refused(demo_workdir, bissl_dir):
    out, before = bissl_dir
    done = run(
        [sys.executable, str(REPO / "tools" / "finetune_det.py"), "--config-file"]
        + [str(TINY_FINETUNE), "MODEL.WEIGHTS", str(out / "lower_backbone.pth")]
        + ["OUTPUT_DIR", str(out)],
        demo_workdir,
        TIMEOUT,
    )
    refused(done, "holds a bissl run of tools/train_bissl.py", "this is a finetune run", str(out))
    survived(before, out)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "change, named",
    [
        (("BISSL.STAGES", "6"), "BISSL.STAGES: 4 there, 6 here"),
        (("MODEL.RESNETS.WIDTH_PER_GROUP", "4"), "MODEL.RESNETS.WIDTH_PER_GROUP: 8 there, 4 here"),
    ],
)
def test_resume_with_a_changed_config_is_refused(demo_workdir, bissl_dir, change, named):
    out, before = bissl_dir
    done = run(bissl_command(out, "--resume") + list(change), demo_workdir, TIMEOUT)
    refused(done, named, "resuming would continue another run")
    survived(before, out)


def test_resume_with_a_changed_logging_period_is_allowed():
    from bissl_det.runtime.setup import load_config

    base = load_config(str(TINY_C4))
    changed = load_config(str(TINY_C4), ["BISSL.LOG_PERIOD", "7", "DATALOADER.NUM_WORKERS", "3"])
    longer = load_config(str(TINY_C4), ["BISSL.STAGES", "9"])
    assert (
        run_identity(base, "train_bissl")["identity"]
        == run_identity(changed, "train_bissl")["identity"]
    )
    assert (
        run_identity(base, "train_bissl")["identity"]
        != run_identity(longer, "train_bissl")["identity"]
    )


@pytest.mark.e2e
@pytest.mark.parametrize("planted", ["pretraining", "foreign"])
def test_resume_refuses_a_checkpoint_of_another_kind(demo_workdir, bissl_dir, planted):
    out, _ = bissl_dir
    path = out / "model_final.pth"
    if planted == "pretraining":
        identity = {"tool": "pretrain_ssl", "kind": "pretrain", "identity": "0", "keys": {}}
        torch.save({"model": {"encoder.w": torch.zeros(2)}, "run_identity": identity}, path)
        needles = ("checkpoint of a pretrain run of tools/pretrain_ssl.py", "this is a bissl run")
    else:  # no identity (an older version's file) and not one tensor of this model
        torch.save({"model": {"backbone.w": torch.zeros(2)}, "iteration": 3}, path)
        needles = ("it is not a checkpoint of this model",)
    before = digests(out)
    done = run(bissl_command(out, "--resume"), demo_workdir, TIMEOUT)
    refused(done, str(path), *needles)
    survived(before, out)


@pytest.mark.e2e
def test_outputs_without_run_json_are_not_overwritten(demo_workdir, bissl_dir):
    out, _ = bissl_dir
    (out / "run.json").unlink()  # a folder written by an earlier version
    before = digests(out)
    done = run(bissl_command(out), demo_workdir, TIMEOUT)
    refused(done, "outputs of an earlier run", "results.json", "--overwrite")
    survived(before, out)


@pytest.mark.e2e
def test_overwrite_is_explicit_and_recorded(demo_workdir, bissl_dir):
    out, _ = bissl_dir
    done = run(
        [sys.executable, str(REPO / "tools" / "finetune_det.py"), "--overwrite", "--config-file"]
        + [str(TINY_FINETUNE), "MODEL.WEIGHTS", str(out / "lower_backbone.pth")]
        + ["DATASETS.TEST", "()", "OUTPUT_DIR", str(out)],
        demo_workdir,
        TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--overwrite: OUTPUT_DIR" in done.stdout + done.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["kind"] == "finetune" and record["replaced"]["kind"] == "bissl"


# ---- The checkpoint check itself -----------------------------------------------------------------


def test_checkpoint_check_names_shapes_and_both_identities():
    model = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    ours = {"tool": "t", "kind": "bissl", "identity": "1", "keys": {"X": 1}}
    theirs = {**ours, "identity": "2", "keys": {"X": 2}}
    check_resume_checkpoint("f.pth", {"model": model, "run_identity": ours}, ours, model)
    with pytest.raises(RunIdentityError, match="X: 2 there, 1 here"):
        check_resume_checkpoint("f.pth", {"model": model, "run_identity": theirs}, ours, model)
    narrow = {"a": torch.zeros(2, 2), "b": torch.zeros(4)}
    with pytest.raises(RunIdentityError, match=r"a: \(2, 2\) in the file, \(2, 3\) in the model"):
        check_resume_checkpoint("f.pth", {"model": narrow}, None, model)
    # A newer code version's extra config key is not a change of the run.
    newer = {**ours, "identity": "3", "keys": {"X": 1, "NEW.KEY": True}}
    check_resume_checkpoint("f.pth", {"model": model, "run_identity": ours}, newer, model)
    # --overwrite replaced exactly that identity: resumed deliberately.
    check_resume_checkpoint(
        "f.pth", {"model": model, "run_identity": theirs}, {**ours, "replaced": theirs}, model
    )
