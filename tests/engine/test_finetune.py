"""BiSSL -> finetune_det hand-off: the exported lower backbone fully initialises the detector."""

import json
import subprocess
import sys

from bissl_det.checkpoint import save_backbone_checkpoint
from bissl_det.checkpoint.verify import verify_backbone_loaded
from bissl_det.engine import BilevelTrainer
from bissl_det.engine.finetune import FinetuneTrainer
from tests.conftest import CONFIGS, REPO, TINY_C4, tiny_config

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
