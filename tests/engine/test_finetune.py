"""BiSSL -> finetune_det hand-off: the exported lower backbone fully initialises the detector."""

import json
import subprocess
import sys

from bissl_det.checkpoint import save_backbone_checkpoint
from bissl_det.checkpoint.verify import verify_backbone_loaded
from bissl_det.engine import BilevelTrainer
from bissl_det.engine.finetune import FinetuneTrainer
from tests.helpers import CONFIGS, REPO, TINY_C4, tiny_config

import pytest
import torch

TINY_FINETUNE = CONFIGS / "quick" / "test_tiny_finetune_C4.yaml"


@pytest.fixture(scope="module")
def bissl_export(demo_workdir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bissl")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(demo_workdir)
        cfg = tiny_config(TINY_C4, out, "BISSL.STAGES", "1")
        trainer = BilevelTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
    return out / "lower_backbone.pth"


@pytest.mark.slow
def test_finetune_from_bissl_export_reports_ap(in_demo_workdir, tmp_path, bissl_export):
    out = tmp_path / "ft"
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "finetune_det.py"), "--config-file",
         str(TINY_FINETUNE), "MODEL.WEIGHTS", str(bissl_export), "OUTPUT_DIR", str(out)],
        check=True, cwd=in_demo_workdir, capture_output=True,
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert set(results["demo_voc_test"]) == {"AP", "AP50", "AP75"}
    assert "backbone tensors of" in (out / "log.txt").read_text()  # the zero-missing check ran


def test_every_backbone_tensor_is_loaded(in_demo_workdir, tmp_path, bissl_export):
    cfg = tiny_config(TINY_FINETUNE, tmp_path, "MODEL.WEIGHTS", str(bissl_export))
    trainer = FinetuneTrainer(cfg)
    trainer.resume_or_load(resume=False)
    # stem..res4 in the backbone and res5 in the box head, all from the export:
    # ResNet-50's 53 convolutions + 53 BNs x (weight, bias, running mean, running var).
    assert verify_backbone_loaded(trainer.model, str(bissl_export)) == 53 + 53 * 4
    exported = torch.load(bissl_export, weights_only=True)["model"]
    torch.testing.assert_close(
        trainer.model.roi_heads.res5[0].conv1.weight, exported["res5.0.conv1.weight"]
    )


def test_incomplete_backbone_is_refused(in_demo_workdir, tmp_path, bissl_export):
    backbone = torch.load(bissl_export, weights_only=True)["model"]
    del backbone["res4.2.conv2.weight"]
    broken = tmp_path / "broken.pth"
    save_backbone_checkpoint(broken, backbone)
    cfg = tiny_config(TINY_FINETUNE, tmp_path / "out", "MODEL.WEIGHTS", str(broken))
    trainer = FinetuneTrainer(cfg)
    with pytest.raises(ValueError, match="res4.2.conv2.weight"):
        trainer.resume_or_load(resume=False)


def test_aggregate_seeds(tmp_path):
    from tools.aggregate_seeds import main

    files = []
    for i, ap in enumerate([50.0, 52.0, 54.0]):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps({"voc": {"AP": ap, "AP50": 2 * ap}}))
    summary = main([*map(str, files), "--out", str(tmp_path / "s.json")])
    assert summary["voc/AP"] == {"mean": 52.0, "std": 2.0, "n": 3}
    assert summary["voc/AP50"]["std"] == 4.0


def _finetune(output_dir, weights, *opts):
    cfg = tiny_config(
        TINY_FINETUNE, output_dir, "MODEL.WEIGHTS", str(weights), "SOLVER.CHECKPOINT_PERIOD", "1",
        "DATALOADER.ASPECT_RATIO_GROUPING", "False", *opts,
    )  # fmt: skip
    return FinetuneTrainer(cfg)


def test_finetune_resume_falls_back_from_a_truncated_checkpoint(
    in_demo_workdir, tmp_path, bissl_export, caplog
):
    import logging

    trainer = _finetune(tmp_path, bissl_export)
    trainer.resume_or_load(resume=False)
    trainer.train()
    final = tmp_path / "model_final.pth"
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    final.write_bytes(final.read_bytes()[:1000])  # a copy or write cut short

    resumed = _finetune(tmp_path, bissl_export)
    with caplog.at_level(logging.WARNING):
        resumed.resume_or_load(resume=True)
    previous = tmp_path / "model_0000002.pth"
    assert resumed.start_iter == 3
    saved = torch.load(previous, weights_only=True)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in resumed.model.state_dict().items())
    assert f"not resuming from {final} is not a readable torch checkpoint" in caplog.text
    assert f"resuming from {previous}, the newest usable checkpoint" in caplog.text


def test_finetune_divergence_writes_a_diagnostic_checkpoint(
    in_demo_workdir, tmp_path, bissl_export
):
    trainer = _finetune(tmp_path, bissl_export)
    trainer.resume_or_load(resume=False)
    model, calls = trainer._trainer.model, {"n": 0}
    forward = model.forward

    def diverging(batch):
        calls["n"] += 1
        losses = forward(batch)
        return {k: v * float("nan") for k, v in losses.items()} if calls["n"] == 2 else losses

    model.forward = diverging
    with pytest.raises(FloatingPointError) as err:
        trainer.train()
    message = str(err.value)
    assert message.startswith("Detectron2: Loss became infinite or NaN at iteration=1")
    diagnostic = tmp_path / "model_nonfinite_iteration0000001.pth"
    assert f"diagnostic checkpoint: {tmp_path}/{diagnostic.name}" in message
    state = torch.load(diagnostic, weights_only=True)
    assert state["diagnostic"]["level"] == "fine-tuning" and state["iteration"] == 1
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    assert torch.load(tmp_path / "model_0000000.pth", weights_only=True)["iteration"] == 0
