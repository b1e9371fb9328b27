"""Checkpoint faults: MODEL.WEIGHTS that would not initialise the backbone, broken files, and
``--resume`` that must never resume garbage (diagnostic, non-finite or truncated checkpoints).

Every refusal names the file; nothing already written is lost (earlier files stay loadable).
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO, TINY_C4, tiny_config

import pytest
import torch
import torchvision

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_FINETUNE = REPO / "configs" / "quick" / "test_tiny_finetune_C4.yaml"
TINY_PRETRAIN = REPO / "configs" / "quick" / "pretrain_simclr_demo.yaml"
CONVERTER = "python tools/convert_checkpoint.py"
NAN = float("nan")


def _bissl_trainer(output_dir: Path, *opts: str):
    from bissl_det.engine import BilevelTrainer

    cfg = tiny_config(TINY_C4, output_dir, "DATASETS.TEST", "()", "SEED", "0", *opts)
    trainer = BilevelTrainer(cfg)
    return trainer


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_refusal(message: str, path: Path, *keys: str) -> None:
    assert str(path) in message, message
    assert CONVERTER in message, message
    for key in keys:
        assert key in message, (key, message)


@pytest.fixture(scope="module")
def torchvision_r50(tmp_path_factory) -> Path:
    """An unconverted torchvision ResNet-50 state dict, as downloaded from torchvision."""
    path = tmp_path_factory.mktemp("tv") / "resnet50-torchvision.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def bissl_run(demo_workdir, tmp_path_factory) -> Path:
    """OUTPUT_DIR of a finished one-stage BiSSL run (model_final.pth, lower_backbone.pth)."""
    out = tmp_path_factory.mktemp("bissl_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(demo_workdir)
        torch.set_num_threads(1)
        trainer = _bissl_trainer(out, "BISSL.STAGES", "1")
        trainer.resume_or_load(resume=False)
        trainer.train()
    return out


# ---- MODEL.WEIGHTS that would leave backbone tensors uninitialised ------------------------------


def _tool(name: str, config: Path, cwd: Path, out: Path, *opts: str):
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / name), "--config-file", str(config),
         *opts, "OUTPUT_DIR", str(out)],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["torchvision", "model_final"])
def test_finetune_det_refuses_weights_detectron2_would_not_load(
    in_demo_workdir, tmp_path, torchvision_r50, bissl_run, weights
):
    path = torchvision_r50 if weights == "torchvision" else bissl_run / "model_final.pth"
    proc = _tool("finetune_det.py", TINY_FINETUNE, in_demo_workdir, tmp_path / "ft",
                 "MODEL.WEIGHTS", str(path))  # fmt: skip
    assert proc.returncode != 0
    err = proc.stderr
    _assert_refusal(err, path, "BackboneWeightsError", "missing keys ['backbone.res2.0.conv1")
    assert "uninitialised" in err
    assert not (tmp_path / "ft" / "model_final.pth").exists(), "it trained anyway"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tool", "config", "opts"),
    [
        ("train_bissl.py", None, []),
        ("pretrain_ssl.py", TINY_PRETRAIN, ["PRETRAIN.IMS_PER_BATCH", "8", "PRETRAIN.ITERS", "2"]),
    ],
)
def test_training_tools_refuse_a_backbone_of_another_shape(
    in_demo_workdir, tmp_path, torchvision_r50, tool, config, opts
):
    """The tests' ResNet-50 is 8x narrower: a real torchvision R50 cannot initialise it."""
    from tests.helpers import NARROW_RESNET, TINY_C4

    proc = _tool(tool, config or TINY_C4, in_demo_workdir, tmp_path / "run", *NARROW_RESNET,
                 *opts, "MODEL.WEIGHTS", str(torchvision_r50), "DATASETS.TEST", "()")  # fmt: skip
    assert proc.returncode != 0
    _assert_refusal(proc.stderr, torchvision_r50, "backbone shapes do not match MODEL.RESNETS")
    assert re.search(r"stem\.conv1\.weight: \(64, 3, 7, 7\) in the file", proc.stderr)


def test_finetune_trainer_refuses_in_process_and_names_every_category(
    in_demo_workdir, tmp_path, torchvision_r50, bissl_run
):
    from bissl_det.checkpoint import BackboneWeightsError
    from bissl_det.engine.finetune import FinetuneTrainer
    from tests.helpers import tiny_config

    kinds = {
        torchvision_r50: "it reads as a 'torchvision' checkpoint",
        bissl_run / "model_final.pth": "training checkpoint of a pretraining or BiSSL run",
    }
    for path, kind in kinds.items():
        cfg = tiny_config(TINY_FINETUNE, tmp_path / path.stem, "MODEL.WEIGHTS", str(path))
        trainer = FinetuneTrainer(cfg)
        with pytest.raises(BackboneWeightsError) as err:
            trainer.resume_or_load(resume=False)
        message = str(err.value)
        _assert_refusal(message, path, "missing keys", "unexpected keys", kind)
        # Every ResNet tensor of the detector is missing: 53 convs + 53 norms x 4.
        assert "Detectron2 would leave 265 of 265 tensors uninitialised" in message
    # The converter itself reads this project's run checkpoints: theta of the BiSSL run.
    from tools.convert_checkpoint import main as convert

    converted = tmp_path / "theta.pth"
    assert convert([str(bissl_run / "model_final.pth"), str(converted)]) == 0
    exported = _load(bissl_run / "lower_backbone.pth")["model"]
    theta = _load(converted)["model"]
    assert theta.keys() == exported.keys()
    assert all(torch.equal(theta[k], exported[k]) for k in exported)


def test_eval_only_refuses_a_backbone_checkpoint(in_demo_workdir, tmp_path, bissl_run):
    from bissl_det.checkpoint import BackboneWeightsError, check_detector_weights
    from bissl_det.engine.finetune import FinetuneTrainer
    from tests.helpers import tiny_config

    export = bissl_run / "lower_backbone.pth"
    model = FinetuneTrainer.build_model(tiny_config(TINY_FINETUNE, tmp_path))
    assert check_detector_weights(model, str(export)) == "backbone"
    with pytest.raises(BackboneWeightsError, match="evaluation needs a trained detector"):
        check_detector_weights(model, str(export), whole_model=True)


def test_classifier_loader_refuses_shapes_and_reads_run_checkpoints(
    in_demo_workdir, tmp_path, torchvision_r50, bissl_run, caplog
):
    """The function tools/eval_cls.py loads MODEL.WEIGHTS with."""
    from bissl_det.checkpoint import BackboneWeightsError, load_backbone_weights
    from bissl_det.modeling.backbone import build_resnet_trunk

    resnet = build_resnet_trunk(tiny_config(TINY_C4, tmp_path / "o"), norm="BN")
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    with pytest.raises(BackboneWeightsError) as err:
        load_backbone_weights(resnet, str(torchvision_r50))
    _assert_refusal(str(err.value), torchvision_r50, "backbone shapes do not match")
    assert all(torch.equal(v, before[k]) for k, v in resnet.state_dict().items())

    # A torchvision-layout file of the right ResNet initialises every tensor, converted on the fly.
    from bissl_det.checkpoint import detectron2_to_torchvision

    theta = _load(bissl_run / "lower_backbone.pth")["model"]
    tv_file = tmp_path / "narrow_torchvision.pth"
    torch.save(detectron2_to_torchvision(theta)[0], tv_file)
    assert load_backbone_weights(resnet, str(tv_file)) == len(resnet.state_dict())
    assert all(torch.equal(v, theta[k]) for k, v in resnet.state_dict().items())

    # A backbone with a block missing: the keys are listed, nothing is loaded.
    partial = {k: v for k, v in theta.items() if not k.startswith("res5.2.")}
    with pytest.raises(BackboneWeightsError) as err:
        load_backbone_weights(resnet, partial, source="partial.pth")
    assert "missing keys ['res5.2.conv1.norm.bias'" in str(err.value)
    assert "and 5 more" in str(err.value)

    with caplog.at_level(logging.WARNING, logger="bissl_det.checkpoint.backbone"):
        assert load_backbone_weights(resnet, "") == 0
    assert "MODEL.WEIGHTS is empty" in caplog.text


def test_empty_weights_warn_in_finetune(in_demo_workdir, tmp_path, caplog):
    from bissl_det.engine.finetune import FinetuneTrainer
    from tests.helpers import tiny_config

    trainer = FinetuneTrainer(tiny_config(TINY_FINETUNE, tmp_path, "MODEL.WEIGHTS", ""))
    with caplog.at_level(logging.WARNING, logger="bissl_det.engine.finetune"):
        trainer.resume_or_load(resume=False)
    assert "MODEL.WEIGHTS is empty: the detector starts from random weights" in caplog.text


# ---- Files that are not checkpoints ------------------------------------------------------------


def _broken_files(directory: Path, good: Path) -> dict[str, Path]:
    data = good.read_bytes()
    files = {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "corrupt": data[:100] + bytes(200) + data[300:],
        "text": b'{"not": "a checkpoint"}\n',
    }
    paths = {}
    for name, content in files.items():
        paths[name] = directory / f"{name}.pth"
        paths[name].write_bytes(content)
    return paths


def test_broken_files_are_named_by_every_loader(in_demo_workdir, tmp_path, bissl_run):
    from bissl_det.checkpoint import (
        CheckpointFileError,
        check_detector_weights,
        load_backbone_weights,
        load_checkpoint_file,
        load_pretext_checkpoint,
    )
    from bissl_det.engine.finetune import FinetuneTrainer
    from tests.helpers import tiny_config

    from detectron2.modeling import build_model

    bissl = build_model(tiny_config(TINY_C4, tmp_path / "o"))
    detector = FinetuneTrainer.build_model(tiny_config(TINY_FINETUNE, tmp_path / "d"))
    for kind, path in _broken_files(tmp_path, bissl_run / "lower_backbone.pth").items():
        for load in (
            load_checkpoint_file,
            lambda p: load_backbone_weights(bissl.lower_backbone, str(p)),
            lambda p: load_pretext_checkpoint(bissl, str(p), "simclr"),
            lambda p: check_detector_weights(detector, str(p)),
        ):
            with pytest.raises(CheckpointFileError) as err:
                load(path)
            assert str(path) in str(err.value), (kind, str(err.value))
    # A torch file holding no state dict is refused by name too.
    tensor_file = tmp_path / "a_tensor.pth"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(ValueError, match=re.escape(str(tensor_file))):
        load_backbone_weights(bissl.lower_backbone, str(tensor_file))
    # The file they were cut from is untouched and still loads.
    assert "res5.0.conv1.weight" in _load(bissl_run / "lower_backbone.pth")["model"]


@pytest.mark.slow
def test_converter_names_a_truncated_input(in_demo_workdir, tmp_path, bissl_run):
    path = _broken_files(tmp_path, bissl_run / "lower_backbone.pth")["truncated"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), str(path),
         str(tmp_path / "out.pth")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert f"{path} is not a readable torch checkpoint" in proc.stderr
    assert not (tmp_path / "out.pth").exists()


# ---- --resume never resumes garbage ------------------------------------------------------------


def _two_checkpoints(output_dir: Path):
    """A trainer with model_0000000.pth (iteration 0) and model_0000001.pth (iteration 1)."""
    trainer = _bissl_trainer(output_dir)
    trainer.resume_or_load(resume=False)
    trainer.checkpointer.save("model_0000000", iteration=0)
    with torch.no_grad():
        next(trainer.model.parameters()).add_(1.0)
    trainer.checkpointer.save("model_0000001", iteration=1)
    return trainer


def _resume(output_dir: Path, caplog, *opts: str):
    trainer = _bissl_trainer(output_dir, *opts)
    with caplog.at_level(logging.WARNING):
        trainer.resume_or_load(resume=True)
    return trainer


def _same_weights(trainer, path: Path) -> bool:
    saved = _load(path)["model"]
    return all(torch.equal(v, saved[k]) for k, v in trainer.model.state_dict().items())


def test_truncated_latest_checkpoint_falls_back_to_the_previous_good_one(
    in_demo_workdir, tmp_path, caplog
):
    out = tmp_path / "out"
    _two_checkpoints(out)
    latest = out / "model_0000001.pth"
    latest.write_bytes(latest.read_bytes()[:5000])
    trainer = _resume(out, caplog)
    assert trainer.start_iter == 1
    assert _same_weights(trainer, out / "model_0000000.pth")
    assert f"not resuming from {latest} is not a readable torch checkpoint" in caplog.text
    assert f"resuming from {out / 'model_0000000.pth'}, the newest usable" in caplog.text


def test_nonfinite_checkpoint_is_never_the_resume_point(in_demo_workdir, tmp_path, caplog):
    out = tmp_path / "out"
    _two_checkpoints(out)
    # BN statistics poisoned by a diverged forward (the optimiser step never happened).
    state = _load(out / "model_0000001.pth")
    buffers = [k for k in state["model"] if k.endswith("running_var")]
    for key in buffers[:7]:
        state["model"][key].fill_(NAN)
    torch.save(state, out / "model_0000001.pth")
    trainer = _resume(out, caplog)
    assert trainer.start_iter == 1 and _same_weights(trainer, out / "model_0000000.pth")
    assert "holds 7 non-finite tensors" in caplog.text

    # Nothing usable at all: an error listing each file, never a silent fresh start.
    (out / "model_0000000.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="no usable checkpoint") as err:
        _resume(out, caplog)
    assert "model_0000000.pth is empty" in str(err.value)
    assert "model_0000001.pth holds 7 non-finite" in str(err.value)


def test_divergence_leaves_the_resume_point_and_exports_intact(in_demo_workdir, tmp_path, caplog):
    out = tmp_path / "out"
    trainer = _bissl_trainer(out, "BISSL.STAGES", "3", "BISSL.HEAD_WARMUP.ITERS", "0")
    trainer.resume_or_load(resume=False)
    pretext_loss, calls = trainer.model.pretext_loss, {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        return pretext_loss(*args) * (NAN if calls["n"] == 5 else 1.0)  # stage 2, step 0

    trainer.model.pretext_loss = poisoned
    with pytest.raises(FloatingPointError, match="lower level, stage 2, step 0"):
        trainer.train()
    diagnostic = out / "model_nonfinite_stage0000002.pth"
    assert _load(diagnostic)["diagnostic"] == {
        "message": "non-finite pretext loss (nan)", "level": "lower", "stage": 2, "step": 0,
    }  # fmt: skip
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    assert _load(out / "model_0000000.pth")["iteration"] == 0  # earlier ones stay loadable
    exports = sorted(out.glob("lower_backbone*.pth"))
    assert exports, "no periodic export was written"
    for export in exports:
        state = _load(export)
        if export.name.endswith("_torchvision.pth"):
            assert torch.isfinite(state["layer4.0.conv1.weight"]).all()
        else:
            assert torch.isfinite(state["model"]["res5.0.conv1.weight"]).all()

    # An old run whose tag points at its diagnostic file: skipped, the good one is used.
    (out / "last_checkpoint").write_text(diagnostic.name)
    trainer = _resume(out, caplog)
    assert trainer.start_iter == 2 and _same_weights(trainer, out / "model_0000001.pth")
    assert f"{diagnostic} is a diagnostic checkpoint of a failed step" in caplog.text


def test_changed_optimiser_settings_on_resume_are_named(in_demo_workdir, tmp_path, caplog):
    out = tmp_path / "out"
    _two_checkpoints(out)
    _resume(
        out,
        caplog,
        "BISSL.UPPER.BASE_LR", "0.5",
        "BISSL.UPPER.MOMENTUM", "0.5",
        "BISSL.LOWER.WEIGHT_DECAY", "0.25",
    )  # fmt: skip
    message = next(r.message for r in caplog.records if "override the config" in r.message)
    assert "upper_optimizer group 0 initial_lr: config 0.5, checkpoint" in message
    assert "upper_optimizer group 0 momentum: config 0.5, checkpoint 0.9" in message
    assert re.search(r"lower_optimizer group \d weight_decay: config 0.25, checkpoint", message)
    assert "upper_optimizer group 0 weight_decay" not in message  # unchanged: not listed


def _poison_rpn(trainer, on_call: int) -> None:
    """NaN objectness from the RPN head: Detectron2 itself raises FloatingPointError."""
    head, calls = trainer.model.upper.proposal_generator.rpn_head, {"n": 0}
    forward = head.forward

    def poisoned(features):
        calls["n"] += 1
        logits, deltas = forward(features)
        if calls["n"] == on_call:
            logits = [t * NAN for t in logits]
        return logits, deltas

    head.forward = poisoned


@pytest.mark.parametrize(
    ("warmup_iters", "call", "where"),
    [
        ("2", 2, "upper (warm-up) level, stage 0, step 1"),
        ("0", 3, "upper level, stage 0, step 1"),  # step 1: its theta view, then phi's
    ],
)
def test_divergence_inside_detectron2_writes_the_diagnostic_checkpoint(
    in_demo_workdir, tmp_path, warmup_iters, call, where
):
    out = tmp_path / "out"
    trainer = _bissl_trainer(out, "BISSL.HEAD_WARMUP.ITERS", warmup_iters)
    trainer.resume_or_load(resume=False)
    _poison_rpn(trainer, call)
    with pytest.raises(FloatingPointError) as err:
        trainer.train()
    message = str(err.value)
    assert message.startswith("Detectron2: Predicted boxes or scores contain Inf/NaN"), message
    assert where in message
    diagnostic = _load(out / "model_nonfinite_stage0000000.pth")
    level = where.split(" level")[0]
    assert diagnostic["diagnostic"]["level"] == level and diagnostic["diagnostic"]["stage"] == 0
    assert (
        not (out / "last_checkpoint").exists()
        or "nonfinite" not in (out / "last_checkpoint").read_text()
    )


def test_resume_says_what_it_cannot_restore_exactly(in_demo_workdir, tmp_path):
    from bissl_det.engine.resume import inexact_resume_reasons

    assert (
        inexact_resume_reasons(tiny_config(TINY_C4, tmp_path / "exact")) == []
    )  # the tests' setting
    cfg = tiny_config(
        TINY_C4,
        tmp_path / "inexact",
        "DATALOADER.ASPECT_RATIO_GROUPING", "True",  # exact: grouped by index (aspect_groups.py)
        "BISSL.PRETEXT_DATA.NUM_WORKERS", "2",
        "DATALOADER.NUM_WORKERS", "1",
    )  # fmt: skip
    reasons = inexact_resume_reasons(cfg)
    assert [r.split(":")[0] for r in reasons] == [
        "BISSL.PRETEXT_DATA.NUM_WORKERS = 2",
        "DATALOADER.NUM_WORKERS = 1",
    ]
    assert "random augmentations after the resume differ" in reasons[0]
