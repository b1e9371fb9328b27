"""tools/eval_cls.py: linear probe and fine-tuning of a backbone checkpoint, seeds, search."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import bissl_det.engine.cls_eval as cls_eval
from bissl_det.checkpoint import save_backbone_checkpoint
from bissl_det.engine.checkpointer import export_backbone
from bissl_det.engine.pretrain import build_pretrain_model
from tests.conftest import CONFIGS, NARROW_RESNET, REPO, tiny_config

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


def _train(cfg, linear_probe: bool, lr: float = 0.1):
    state = cls_eval.read_backbone_weights(cfg.MODEL.WEIGHTS)
    train_set = cls_eval._classification_dataset(cfg, train=True)
    model = cls_eval.train_classifier(
        cfg, state, train_set, seed=0, lr=lr, weight_decay=0.0, linear_probe=linear_probe
    )
    return state, model


def test_linear_probe_freezes_weights_and_bn_statistics(tmp_path, backbone):
    cfg = _cfg(tmp_path, backbone)
    state, probed = _train(cfg, linear_probe=True)
    after = probed.backbone.state_dict()
    for key, value in state.items():  # weights, running means/variances, batch counters
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)
    torch.manual_seed(0)  # the linear layer did train
    init = torch.nn.Linear(probed.linear.in_features, 4)
    assert not torch.equal(init.weight, probed.linear.weight.detach())

    _, tuned = _train(cfg, linear_probe=False)  # control: fine-tuning moves both
    tuned_sd = tuned.backbone.state_dict()
    assert not torch.equal(tuned_sd["stem.conv1.weight"], state["stem.conv1.weight"])
    assert not torch.equal(
        tuned_sd["res2.0.conv1.norm.running_mean"], state["res2.0.conv1.norm.running_mean"]
    )


def test_fine_tune_over_seeds_reports_mean_and_std(tmp_path, backbone):
    cfg = _cfg(tmp_path, backbone)
    results = cls_eval.run_cls_eval(cfg, seeds=2)
    assert json.loads((tmp_path / "out" / "cls_results.json").read_text()) == results
    assert results["protocol"] == "finetune" and results["hparams"]["iters"] == 3
    assert [r["seed"] for r in results["per_seed"]] == [0, 1]
    for key in ("top1", "mean_per_class_acc"):
        values = np.array([r["metrics"][key] for r in results["per_seed"]])
        assert values.min() >= 0.0 and values.max() <= 100.0
        assert results["mean"][key] == pytest.approx(values.mean())
        assert results["std"][key] == pytest.approx(values.std(ddof=1))


def test_search_selects_the_best_validation_trial(tmp_path, backbone):
    cfg = _cfg(tmp_path, backbone, "CLS.SOLVER.ITERS", "2")
    results = cls_eval.run_cls_eval(cfg, seeds=1, search_trials=3, linear_probe=True)
    search = results["search"]
    assert len(search["trials"]) == 3 and search["metric"] == "top1"
    for trial in search["trials"]:
        assert 1e-4 <= trial["lr"] <= 1.0 and 1e-5 <= trial["weight_decay"] <= 1e-2
        assert trial["score"] == trial["val"]["top1"]
    best = max(search["trials"], key=lambda t: t["score"])
    assert results["hparams"]["lr"] == best["lr"] == search["best"]["lr"]
    assert results["hparams"]["weight_decay"] == best["weight_decay"]
    assert search["num_train"] + search["num_val"] == results["num_train"]


def test_validation_split_is_per_class_and_disjoint():
    targets = [0] * 12 + [1] * 8 + [2] * 4 + [3] * 1
    train, val = cls_eval.validation_split(targets, 0.25, seed=0)
    assert sorted(train + val) == list(range(len(targets)))
    counts = np.bincount(np.asarray(targets)[val], minlength=4)
    assert counts.tolist() == [3, 2, 1, 0]  # round(0.25 n), >= 1, a singleton class stays in train
    with pytest.raises(ValueError, match="VAL_FRACTION"):
        cls_eval.validation_split(targets, 1.0, seed=0)


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

    def spy(model, loader, multi_label):
        seen.append((model, loader))
        return evaluate(model, loader, multi_label)

    evaluate = cls_eval.evaluate_classifier
    monkeypatch.setattr(cls_eval, "evaluate_classifier", spy)
    results = cls_eval.run_cls_eval(cfg, seeds=1, linear_probe=True)
    reported = results["per_seed"][0]["metrics"]

    # Recompute both metrics by hand from the evaluated model's predictions.
    model, loader = seen[-1]
    model.eval()
    with torch.no_grad():
        preds = np.concatenate([model(b).argmax(1).numpy() for b in loader])
    labels = np.array(loader.dataset.targets)
    assert labels.tolist() == [0] * 4 + [1] * 1 + [2] * 3 + [3] * 1  # sorted: circle cross ...
    top1 = 100 * np.mean(preds == labels)
    per_class = 100 * np.mean([np.mean(preds[labels == c] == c) for c in range(4)])
    assert reported["top1"] == pytest.approx(top1)
    assert reported["mean_per_class_acc"] == pytest.approx(per_class)
    assert reported["top1"] != pytest.approx(reported["mean_per_class_acc"])


def test_missing_or_incomplete_weights_are_clear_errors(tmp_path, backbone):
    with pytest.raises(FileNotFoundError, match=r"MODEL.WEIGHTS = .*nowhere\.pth"):
        cls_eval.run_cls_eval(_cfg(tmp_path, str(tmp_path / "nowhere.pth")))
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty"):
        cls_eval.run_cls_eval(_cfg(tmp_path, ""))
    state = torch.load(backbone, weights_only=True)["model"]
    del state["res4.0.conv2.weight"]
    partial = tmp_path / "partial.pth"
    save_backbone_checkpoint(partial, state)
    with pytest.raises(KeyError, match=r"missing keys \['res4.0.conv2.weight'\]"):
        cls_eval.run_cls_eval(_cfg(tmp_path, str(partial)))


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
    assert results["protocol"] == "linear_probe"
    assert set(results["mean"]) == {"top1", "mean_per_class_acc"}
