"""Every process trains the same model, and a fault on one process stops all of them.

Real gloo processes started by the tools' launcher, each seeded as the tools seed it (SEED +
rank, in ``setup``): random initialisations, augmentations and BN statistics differ per rank
unless the trainers make them equal. After head warm-up + 2 stages (or steps), every
floating-point tensor of every rank's model must be bit-identical to rank 0's.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from tests.engine import replicas
from tests.engine.replicas import CONFIGS
from tests.helpers import NARROW_RESNET

import pytest
import torch

pytestmark = [pytest.mark.dist, pytest.mark.usefixtures("in_demo_workdir")]

WORLD = 2
# Short stages: one lower and one upper step; the replica guard after every stage.
FAST = [
    "SEED", "3",
    "DATASETS.TEST", "()",
    "BISSL.STAGES", "2",
    "BISSL.LOWER_STEPS", "1",
    "BISSL.UPPER_STEPS", "1",
    "BISSL.HEAD_WARMUP.ITERS", "1",
    "BISSL.CHECKPOINT_PERIOD", "0",
    "REPLICA_CHECK_PERIOD", "1",
]  # fmt: skip
TINY_C4 = CONFIGS / "quick" / "test_tiny_C4.yaml"
TINY_CLS = [*NARROW_RESNET, "BISSL.UPPER.IMS_PER_BATCH", "4", "BISSL.LOWER.IMS_PER_BATCH", "8"]
TINY_CLS += ["CLS.IMAGE_SIZE", "32"]
TINY_CLS += ["MODEL.SIMCLR.PROJECTOR_DIMS", "[32, 16]", "BISSL.PRETEXT_DATA.AUG.CROP_SIZE", "32"]


def assert_identical_replicas(output_dir: Path, world: int = WORLD) -> None:
    differ, total = replicas.floating_differences(output_dir, world)
    assert total > 100
    assert not differ, (
        f"{len(differ)} of {total} floating tensors differ across ranks: {differ[:5]}"
    )


@pytest.fixture(scope="module")
def pretext_weights(tmp_path_factory) -> Path:
    """A SimCLR pretext checkpoint of the tiny C4 ResNet (random weights: only keys matter)."""
    from bissl_det.checkpoint import export_backbone
    from bissl_det.engine.pretrain import build_pretrain_model
    from bissl_det.runtime.setup import load_config

    torch.manual_seed(0)
    model = build_pretrain_model(load_config(str(TINY_C4)))
    out = tmp_path_factory.mktemp("pretext")
    return export_backbone(model, out, "simclr", "pretext_backbone")["detectron2"]


def test_bissl_c4_empty_weights_then_resume(tmp_path):
    """Empty MODEL.WEIGHTS: theta, phi and the heads are all random per rank before the fix."""
    out = tmp_path / "run"
    replicas.run(WORLD, "train_bissl", TINY_C4, out, *FAST, "MODEL.WEIGHTS", "")
    assert_identical_replicas(out)
    replicas.run(
        WORLD, "train_bissl", TINY_C4, out, *FAST, "MODEL.WEIGHTS", "", "BISSL.STAGES", "3",
        resume=True,
    )  # fmt: skip
    assert "Resuming at stage 2" in (out / "log.txt").read_text()
    assert_identical_replicas(out)


@pytest.mark.parametrize(
    ("config", "opts"),
    [
        ("test_tiny_FPN.yaml", []),
        ("test_tiny_mask_C4.yaml", []),
        ("bissl_simclr_cls_demo.yaml", TINY_CLS),
    ],
    ids=["FPN", "mask_rcnn", "classification"],
)
def test_bissl_from_pretext_weights(tmp_path, pretext_weights, config, opts):
    """MODEL.WEIGHTS loads the lower level only: the detector/classifier heads are per-rank."""
    out = tmp_path / "run"
    weights = ["MODEL.WEIGHTS", str(pretext_weights)]
    replicas.run(WORLD, "train_bissl", CONFIGS / "quick" / config, out, *FAST, *opts, *weights)
    assert_identical_replicas(out)


def test_three_processes_classification(tmp_path, pretext_weights):
    """An odd world size: 3 ranks, batches split in thirds, still one model."""
    out = tmp_path / "run"
    opts = [*TINY_CLS, "BISSL.UPPER.IMS_PER_BATCH", "6", "BISSL.LOWER.IMS_PER_BATCH", "12"]
    config = CONFIGS / "quick" / "bissl_simclr_cls_demo.yaml"
    replicas.run(3, "train_bissl", config, out, *FAST, *opts, "MODEL.WEIGHTS", str(pretext_weights))
    assert_identical_replicas(out, world=3)


def test_pretraining_byol_then_resume(tmp_path):
    """BYOL: per-rank BN statistics of the online and target networks, EMA target."""
    out = tmp_path / "run"
    config = CONFIGS / "quick" / "pretrain_byol_demo.yaml"
    opts = [
        *NARROW_RESNET,
        *["MODEL.BYOL.PROJECTOR_DIMS", "[32, 16]", "MODEL.BYOL.PREDICTOR_DIMS", "[32, 16]"],
        *["BISSL.PRETEXT_DATA.AUG.CROP_SIZE", "32", "PRETRAIN.IMS_PER_BATCH", "8"],
        *["PRETRAIN.WARMUP_STEPS", "1", "SEED", "3", "REPLICA_CHECK_PERIOD", "1"],
        *["PRETRAIN.CHECKPOINT_PERIOD", "0"],
    ]
    replicas.run(WORLD, "pretrain_ssl", config, out, *opts, "PRETRAIN.ITERS", "2")
    assert_identical_replicas(out)
    replicas.run(WORLD, "pretrain_ssl", config, out, *opts, "PRETRAIN.ITERS", "3", resume=True)
    assert_identical_replicas(out)


def _failed_run(tmp_path, fault, monkeypatch) -> tuple[list[str], float]:
    """A 3-stage BiSSL run with ``fault`` on rank 1: (each rank's error message, seconds from the
    fault to the end of the launch)."""
    # A short collective timeout: no process may wait long for a dead peer.
    monkeypatch.setenv("BISSL_DIST_TIMEOUT", "30")
    out = tmp_path / "run"
    with pytest.raises(Exception, match="terminated with"):
        replicas.run(WORLD, "train_bissl", TINY_C4, out, *FAST, "BISSL.STAGES", "3", fault=fault)
    elapsed = time.time() - float(replicas.fault_time_file(out).read_text())
    messages = []
    for rank in range(WORLD):
        path = replicas.error_file(out, rank)
        assert path.is_file(), f"rank {rank} did not stop with an exception"
        messages.append(path.read_text().splitlines()[1])
    return messages, elapsed


def _named_file(message: str) -> Path:
    found = re.search(r"diagnostic checkpoint: (\S+\.pth)", message)
    assert found, message
    return Path(found.group(1))


def test_nan_on_one_rank_stops_every_rank(tmp_path, monkeypatch):
    # Pretext losses: warm-up none, one lower step per stage: call 2 is stage 1's.
    messages, elapsed = _failed_run(tmp_path, ("nan", 1, 2), monkeypatch)
    assert elapsed < 60
    for message in messages:
        assert re.match(
            r"DivergenceError: non-finite pretext loss( \(nan\))? on rank 1 at the lower level, "
            r"stage 1, step 0; diagnostic checkpoint:",
            message,
        ), message
        diagnostic = torch.load(_named_file(message), weights_only=True)
        assert diagnostic["diagnostic"]["level"] == "lower"
    assert "(nan)" in messages[1] and "(nan)" not in messages[0]  # the value is rank 1's


def test_exception_on_one_rank_stops_every_rank(tmp_path, monkeypatch):
    # Downstream batches: warm-up 1, one upper step per stage: call 3 is stage 1's.
    messages, elapsed = _failed_run(tmp_path, ("error", 1, 3), monkeypatch)
    assert elapsed < 60
    assert messages[1].startswith(
        "StepFailedError: OSError on rank 1 at the upper level, stage 1, step 0: injected data "
        "error"
    ), messages[1]
    # Rank 0 was waiting for rank 1 in a collective of that stage.
    assert re.match(r"StepFailedError: \w+ on rank 0 at the \w+ level, stage 1, ", messages[0])
    for rank, message in enumerate(messages):
        path = _named_file(message)
        assert path.name == f"model_fault_stage0000001_rank{rank}.pth"
        assert torch.load(path, weights_only=True)["diagnostic"]["rank"] == rank
