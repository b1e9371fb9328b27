"""tools/eval_cls.py: the classifier trainer (SimpleTrainer + hooks), linear probe, seeds."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import statistics
from pathlib import Path

import bissl_det.engine.cls_trainer as cls_trainer
from bissl_det.checkpoint import export_backbone, save_backbone_checkpoint
from bissl_det.data.classification_transfer import load_test_protocol_data, validation_split
from bissl_det.engine.cls_eval import run_cls_eval
from bissl_det.engine.cls_trainer import ClassifierTrainer, read_classifier_backbone
from bissl_det.engine.pretrain import build_pretrain_model
from tests.helpers import CONFIGS, NARROW_RESNET, REPO, tiny_config

import numpy as np
import pytest
import torch

CLS_DEMO = CONFIGS / "quick" / "cls_demo.yaml"
TINY = [
    *NARROW_RESNET,
    *["CLS.IMAGE_SIZE", "32", "CLS.SOLVER.ITERS", "3", "CLS.SOLVER.IMS_PER_BATCH", "8"],
    *["CLS.SOLVER.LOG_PERIOD", "1", "SEED", "0"],
]


@pytest.fixture
def backbone(in_demo_workdir, tmp_path) -> str:
    """A (random) pretext_backbone.pth of the narrow ResNet, as pretrain_ssl.py writes it."""
    cfg = tiny_config(CLS_DEMO, tmp_path / "pretrain", *TINY)
    torch.manual_seed(0)
    return str(export_backbone(build_pretrain_model(cfg), tmp_path, "simclr", "bb")["detectron2"])


def _cfg(tmp_path, weights: str, *opts: str):
    return tiny_config(CLS_DEMO, tmp_path / "out", *TINY, "MODEL.WEIGHTS", weights, *opts)


def _trainer(cfg, out: Path, linear_probe: bool, lr: float = 0.1) -> ClassifierTrainer:
    data = load_test_protocol_data(cfg)
    return ClassifierTrainer(
        cfg,
        read_classifier_backbone(cfg),
        data.train_set,
        data.eval_set,
        lr=lr,
        weight_decay=0.0,
        seed=0,
        linear_probe=linear_probe,
        output_dir=out,
    )


def _hand_metrics(model, loader) -> dict[str, float]:
    """Top-1 and mean per-class accuracy computed here from the model's own predictions."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        preds = np.concatenate([model(b).argmax(1).numpy() for b in loader])
    model.train(was_training)
    labels = np.concatenate([b["targets"].numpy() for b in loader])
    classes = np.unique(labels)
    return {
        "top1": 100 * float(np.mean(preds == labels)),
        "mean_per_class_acc": 100
        * float(np.mean([np.mean(preds[labels == c] == c) for c in classes])),
    }


def test_linear_probe_freezes_weights_and_bn_statistics(tmp_path, backbone):
    # EVAL_PERIOD 1: evaluations between steps switch the model back to training mode.
    cfg = _cfg(tmp_path, backbone, "CLS.SOLVER.EVAL_PERIOD", "1")
    state = read_classifier_backbone(cfg)
    trainer = _trainer(cfg, tmp_path / "probe", linear_probe=True)
    head_before = trainer.model.linear.weight.detach().clone()
    trainer.train()
    after = trainer.model.backbone.state_dict()
    for key, value in state.items():  # weights, running means/variances, batch counters
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)
    assert not torch.equal(head_before, trainer.model.linear.weight.detach())
    assert not trainer.model.backbone.training and trainer.model.linear.training

    tuned = _trainer(cfg, tmp_path / "tune", linear_probe=False)  # control: both move
    tuned.train()
    tuned_sd = tuned.model.backbone.state_dict()
    assert not torch.equal(tuned_sd["stem.conv1.weight"], state["stem.conv1.weight"])
    assert not torch.equal(
        tuned_sd["res2.0.conv1.norm.running_mean"], state["res2.0.conv1.norm.running_mean"]
    )


def test_trainer_writes_metrics_events_and_plots(tmp_path, backbone):
    cfg = _cfg(tmp_path, backbone, "CLS.SOLVER.ITERS", "4", "CLS.SOLVER.EVAL_PERIOD", "2")
    out = tmp_path / "run"
    final = _trainer(cfg, out, linear_probe=True, lr=0.1).train()
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    # Cosine from 0.1 to 0 over 4 steps, no warm-up; lr of step t is logged before its update.
    assert lrs == pytest.approx([0.05 * (1 + math.cos(math.pi * t / 4)) for t in range(4)])
    assert all(math.isfinite(r["total_loss"]) for r in rows if "total_loss" in r)
    evals = [(r["iteration"], r["test/top1"]) for r in rows if "test/top1" in r]
    assert [it for it, _ in evals] == [1, 4]  # after step 2, and the final one after step 4
    assert evals[-1][1] == pytest.approx(final["top1"])
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "accuracy.png",
        "losses.png",
        "lr.png",
    ]
    if importlib.util.find_spec("tensorboard") is not None:
        assert list(out.glob("events.out.tfevents.*"))


def test_seeds_report_hand_computed_metrics_mean_and_std(tmp_path, backbone, monkeypatch):
    by_hand = []
    evaluate = cls_trainer.evaluate_classifier

    def spy(model, loader, multi_label):
        by_hand.append(_hand_metrics(model, loader))
        return evaluate(model, loader, multi_label)

    monkeypatch.setattr(cls_trainer, "evaluate_classifier", spy)
    cfg = _cfg(tmp_path, backbone, "CLS.SOLVER.BASE_LR", "0.5")
    results = run_cls_eval(cfg, seeds=3)
    assert json.loads((tmp_path / "out" / "cls_results.json").read_text()) == results
    assert results["protocol"] == "finetune" and results["hparams"]["iters"] == 3
    assert [r["seed"] for r in results["per_seed"]] == [0, 1, 2]
    assert len(by_hand) == 3  # one (final) evaluation per seed
    for key in ("top1", "mean_per_class_acc"):
        hand = [m[key] for m in by_hand]
        assert [r["metrics"][key] for r in results["per_seed"]] == pytest.approx(hand)
        assert results["mean"][key] == pytest.approx(statistics.mean(hand))
        assert results["std"][key] == pytest.approx(statistics.stdev(hand))
    for seed in (0, 1, 2):
        assert (tmp_path / "out" / f"seed_{seed}" / "metrics.json").is_file()


def test_validation_split_is_per_class_and_disjoint():
    targets = [0] * 12 + [1] * 8 + [2] * 4 + [3] * 1
    train, val = validation_split(targets, 0.25, seed=0)
    assert sorted(train + val) == list(range(len(targets)))
    counts = np.bincount(np.asarray(targets)[val], minlength=4)
    assert counts.tolist() == [3, 2, 1, 0]  # round(0.25 n), >= 1, a singleton class stays in train
    with pytest.raises(ValueError, match="VAL_FRACTION"):
        validation_split(targets, 1.0, seed=0)


def test_mean_per_class_accuracy_differs_from_top1_on_an_imbalanced_test_set(
    tmp_path, backbone, monkeypatch
):
    # 4 / 3 / 1 / 1 images per class: even a constant prediction gets top-1 != 25 % = mean
    # per-class accuracy.
    test_root = tmp_path / "imbalanced_test"
    for cls, n in {"circle": 4, "square": 3, "triangle": 1, "cross": 1}.items():
        (test_root / cls).mkdir(parents=True)
        source = sorted((Path("datasets/demo/cls/test") / cls).iterdir())[:n]
        for image in source:
            shutil.copy(image, test_root / cls / image.name)
    cfg = _cfg(tmp_path, backbone, "CLS.TEST_ROOT", str(test_root))
    seen = []
    evaluate = cls_trainer.evaluate_classifier

    def spy(model, loader, multi_label):
        labels = np.concatenate([b["targets"].numpy() for b in loader])
        seen.append((labels, _hand_metrics(model, loader)))
        return evaluate(model, loader, multi_label)

    monkeypatch.setattr(cls_trainer, "evaluate_classifier", spy)
    reported = run_cls_eval(cfg, seeds=1, linear_probe=True)["per_seed"][0]["metrics"]
    labels, hand = seen[-1]
    assert labels.tolist() == [0] * 4 + [1] * 1 + [2] * 3 + [3] * 1  # sorted: circle cross ...
    assert reported == pytest.approx(hand)
    assert reported["top1"] != pytest.approx(reported["mean_per_class_acc"])


def test_missing_or_incomplete_weights_are_clear_errors(tmp_path, backbone):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth"):
        run_cls_eval(_cfg(tmp_path, str(tmp_path / "nowhere.pth")))
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty"):
        run_cls_eval(_cfg(tmp_path, ""))
    state = torch.load(backbone, weights_only=True)["model"]
    del state["res4.0.conv2.weight"]
    partial = tmp_path / "partial.pth"
    save_backbone_checkpoint(partial, state)
    with pytest.raises(KeyError, match=r"partial\.pth.*missing keys.*res4\.0\.conv2\.weight"):
        run_cls_eval(_cfg(tmp_path, str(partial)))


def test_command_line_linear_probe(tmp_path, backbone):
    spec = importlib.util.spec_from_file_location("eval_cls", REPO / "tools" / "eval_cls.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = tool.argument_parser().parse_args(
        ["--config-file", str(CLS_DEMO), "--linear-probe", "--seeds", "1", *TINY]
        + ["MODEL.WEIGHTS", backbone, "OUTPUT_DIR", str(tmp_path / "cli")]
    )
    tool.main(args)
    results = json.loads((tmp_path / "cli" / "cls_results.json").read_text())
    assert results["protocol"] == "linear_probe" and results["units"]["top1"] == "percent"
    assert set(results["mean"]) == {"top1", "mean_per_class_acc"}
