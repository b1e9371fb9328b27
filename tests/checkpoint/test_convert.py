"""Key conversion: numerical equivalence with Detectron2, round trips, every source format, CLI."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import bissl_det  # noqa: F401  (detectron2 shims before detectron2 is imported)
from bissl_det.checkpoint import (
    FORMATS,
    check_complete,
    convert_to_detectron2,
    detect_format,
    detectron2_to_torchvision,
    load_checkpoint_file,
    resnet50_detectron2_keys,
    resnet_detectron2_keys,
    torchvision_to_detectron2,
)

import pytest
import torch
import torchvision
from torch import nn

REPO = Path(__file__).resolve().parents[2]

StateDict = dict[str, torch.Tensor]


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random weights AND BatchNorm statistics, so every converted tensor matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                # gamma < 1 keeps the un-normalised activations O(1) through 16 residual blocks.
                module.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.25)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                module.num_batches_tracked.fill_(7)
    return model.eval()


@pytest.fixture(scope="module")
def tv_model() -> nn.Module:
    torch.manual_seed(0)
    return _randomise(torchvision.models.resnet50(weights=None), seed=1)


@pytest.fixture(scope="module")
def tv_sd(tv_model: nn.Module) -> StateDict:
    return dict(tv_model.state_dict())


def _d2_resnet(depth: int = 50, stride_in_1x1: bool = False) -> nn.Module:
    # Imported here: detectron2 must come after bissl_det's shims, which isort cannot express.
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone import build_resnet_backbone

    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = stride_in_1x1
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0  # keep plain BN everywhere (FrozenBN has no counter buffer)
    if depth < 50:
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    return build_resnet_backbone(cfg, ShapeSpec(channels=3))


def _tv_res5(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


# --- numerical equivalence --------------------------------------------------------------------


def test_detectron2_resnet50_with_converted_weights_matches_torchvision(tv_model, tv_sd):
    converted, unconverted = torchvision_to_detectron2(tv_sd)
    assert unconverted == ["fc.weight", "fc.bias"]
    # An already normalised image: both libraries normalise outside the ResNet body.
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = _tv_res5(tv_model, x)
        d2 = _d2_resnet().eval()
        d2.load_state_dict(converted, strict=True)
        got = d2(x)["res5"]
        # Control: Caffe2-style stride placement on the same weights gives another network.
        d2_c2 = _d2_resnet(stride_in_1x1=True).eval()
        d2_c2.load_state_dict(converted, strict=True)
        wrong = d2_c2(x)["res5"]
    assert got.shape == expected.shape == (2, 2048, 2, 2)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (wrong - expected).abs().max() > 1e-2


@pytest.mark.parametrize("depth", [18, 50])
def test_expected_keys_equal_those_of_a_detectron2_resnet(depth):
    model_keys = {
        k for k in _d2_resnet(depth).state_dict() if not k.endswith("num_batches_tracked")
    }
    assert resnet_detectron2_keys(depth) == model_keys
    if depth == 50:
        assert resnet50_detectron2_keys() == model_keys


def test_expected_keys_reject_unknown_depth():
    with pytest.raises(ValueError, match="depth 42"):
        resnet_detectron2_keys(42)


# --- round trip -------------------------------------------------------------------------------


def test_round_trip_torchvision_detectron2_torchvision_is_exact(tv_sd):
    d2, _ = torchvision_to_detectron2(tv_sd)
    back, unconverted = detectron2_to_torchvision(d2)
    assert unconverted == []
    assert set(back) == set(tv_sd) - {"fc.weight", "fc.bias"}
    for key, value in back.items():
        assert torch.equal(value, tv_sd[key]), key
    # And the other way round, from Detectron2's own key set.
    again, _ = torchvision_to_detectron2(back)
    assert again.keys() == d2.keys()


def test_detectron2_to_torchvision_reports_non_backbone_keys():
    sd = {
        "stem.conv1.weight": torch.zeros(1),
        "res5.2.conv3.norm.running_var": torch.zeros(1),
        "res5.2.conv3.norm.foo": torch.zeros(1),
        "fpn_lateral2.weight": torch.zeros(1),
    }
    converted, unconverted = detectron2_to_torchvision(sd)
    assert set(converted) == {"conv1.weight", "layer4.2.bn3.running_var"}
    assert unconverted == ["res5.2.conv3.norm.foo", "fpn_lateral2.weight"]


def test_hand_checked_key_names():
    pairs = {
        "conv1.weight": "stem.conv1.weight",
        "bn1.running_mean": "stem.conv1.norm.running_mean",
        "layer1.0.conv2.weight": "res2.0.conv2.weight",
        "layer2.3.bn3.bias": "res3.3.conv3.norm.bias",
        "layer3.0.downsample.0.weight": "res4.0.shortcut.weight",
        "layer4.0.downsample.1.running_var": "res5.0.shortcut.norm.running_var",
    }
    converted, unconverted = torchvision_to_detectron2({k: torch.zeros(1) for k in pairs})
    assert unconverted == []
    assert sorted(converted) == sorted(pairs.values())
    wrong, unconverted = torchvision_to_detectron2(
        {"layer5.0.conv1.weight": torch.zeros(1), "layer1.0.conv4.weight": torch.zeros(1)}
    )
    assert wrong == {}
    assert len(unconverted) == 2


# --- source formats ---------------------------------------------------------------------------


def _prefixed(sd: StateDict, prefix: str, drop_fc: bool = False) -> StateDict:
    return {prefix + k: v for k, v in sd.items() if not (drop_fc and k.startswith("fc."))}


def _mlp(prefix: str, dims: tuple[int, ...] = (2048, 8, 4)) -> StateDict:
    out = {}
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        out[f"{prefix}{2 * i}.weight"] = torch.randn(b, a)
        out[f"{prefix}{2 * i}.bias"] = torch.randn(b)
    return out


def _lightly_backbone(tv_model: nn.Module) -> StateDict:
    # The real lightly layout: the torchvision children up to (excluding) fc.
    return dict(nn.Sequential(*list(tv_model.children())[:-1]).state_dict())


def _torchvision(sd, _m):
    return sd, {"fc.weight", "fc.bias"}


def _timm(sd, _m):
    ckpt = _prefixed(sd, "", drop_fc=True)
    heads = {"head.fc.weight": torch.randn(3, 2048), "head.fc.bias": torch.randn(3)}
    return {**ckpt, **heads}, set(heads)


def _moco_v2(sd, _m):
    q = _prefixed(sd, "module.encoder_q.", drop_fc=True)
    k = _prefixed(sd, "module.encoder_k.", drop_fc=True)
    heads = {
        **k,
        **_mlp("module.encoder_q.fc."),
        **_mlp("module.encoder_k.fc."),
        "module.queue": torch.randn(4, 16),
        "module.queue_ptr": torch.zeros(1, dtype=torch.long),
    }
    ckpt = {"epoch": 200, "arch": "resnet50", "state_dict": {**q, **heads}, "optimizer": {}}
    return ckpt, set(heads)


def _moco_v3(sd, _m):
    base = _prefixed(sd, "module.base_encoder.", drop_fc=True)
    heads = {
        **_prefixed(sd, "module.momentum_encoder.", drop_fc=True),
        **_mlp("module.base_encoder.fc."),
        **_mlp("module.momentum_encoder.fc."),
        **_mlp("module.predictor.", (4, 8, 4)),
    }
    return {"epoch": 100, "state_dict": {**base, **heads}}, set(heads)


def _solo_learn(sd, _m):
    heads = {
        **_prefixed(sd, "momentum_backbone.", drop_fc=True),
        **_mlp("projector."),
        **_mlp("momentum_projector."),
        **_mlp("predictor.", (4, 8, 4)),
        "classifier.weight": torch.randn(10, 2048),
        "classifier.bias": torch.randn(10),
    }
    state = {**_prefixed(sd, "backbone.", drop_fc=True), **heads}
    ckpt = {
        "epoch": 3,
        "global_step": 30,
        "pytorch-lightning_version": "2.0.0",
        "state_dict": state,
    }
    return ckpt, set(heads)


def _lightly(sd, tv_model):
    body = _lightly_backbone(tv_model)
    heads = {
        **{f"model.backbone_momentum.{k}": v for k, v in body.items()},
        **_mlp("model.projection_head.layers."),
        **_mlp("model.prediction_head.layers.", (4, 8, 4)),
    }
    state = {**{f"model.backbone.{k}": v for k, v in body.items()}, **heads}
    return {"epoch": 1, "state_dict": state}, set(heads)


def _lightly_plain(sd, tv_model):
    body = _lightly_backbone(tv_model)
    heads = _mlp("projection_head.layers.")
    return {**{f"backbone.{k}": v for k, v in body.items()}, **heads}, set(heads)


def _bissl(sd, _m):
    heads = _mlp("module.projector.")
    state = {**_prefixed(sd, "module.backbone.", drop_fc=True), **heads}
    return {"model": state, "epoch": 5}, set(heads)


def _bissl_bare(sd, _m):
    return {"state_dict": _prefixed(sd, "module.")}, {"module.fc.weight", "module.fc.bias"}


def _detectron2(sd, _m):
    d2, _ = torchvision_to_detectron2(sd)
    return {"model": d2, "__author__": "bissl_det", "matching_heuristics": True}, set()


def _detectron2_detector(sd, _m):
    d2, _ = torchvision_to_detectron2(sd)
    state = {f"backbone.{k}": v for k, v in d2.items() if not k.startswith("res5.")}
    state.update({f"roi_heads.{k}": v for k, v in d2.items() if k.startswith("res5.")})
    heads = {
        "roi_heads.box_predictor.cls_score.weight": torch.randn(21, 2048),
        "proposal_generator.rpn_head.conv.weight": torch.randn(4, 4, 3, 3),
    }
    return {"model": {**state, **heads}, "iteration": 10}, set(heads)


BUILDERS: dict[str, tuple[str, Callable]] = {
    "torchvision": ("torchvision", _torchvision),
    "timm": ("timm", _timm),
    "moco_v2": ("moco", _moco_v2),
    "moco_v3": ("moco", _moco_v3),
    "solo_learn": ("solo-learn", _solo_learn),
    "lightly_lightning": ("lightly", _lightly),
    "lightly_plain": ("lightly", _lightly_plain),
    "bissl": ("bissl", _bissl),
    "bissl_bare": ("bissl", _bissl_bare),
    "detectron2": ("detectron2", _detectron2),
    "detectron2_detector": ("detectron2", _detectron2_detector),
}


@pytest.mark.parametrize("case", sorted(BUILDERS))
def test_each_format_is_detected_converted_completely_and_heads_listed(case, tv_sd, tv_model):
    fmt, build = BUILDERS[case]
    ckpt, heads = build(tv_sd, tv_model)
    expected, _ = torchvision_to_detectron2(tv_sd)

    assert detect_format(ckpt) == fmt
    for chosen in ("auto", fmt):
        result = convert_to_detectron2(ckpt, fmt=chosen)
        assert result.source_format == fmt
        assert set(result.dropped_heads) == heads
        assert result.unconverted == []
        check_complete(result.model, resnet50_detectron2_keys())
        assert result.model.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(result.model[key], value), key


def test_all_formats_are_covered_by_the_cases():
    assert {fmt for fmt, _ in BUILDERS.values()} == set(FORMATS)


def test_unknown_keys_are_reported_not_dropped(tv_sd):
    ckpt, _ = _moco_v2(tv_sd, None)
    ckpt["state_dict"]["module.encoder_q.layer1.0.se.weight"] = torch.zeros(1)
    ckpt["state_dict"]["module.extra_thing"] = torch.zeros(1)
    result = convert_to_detectron2(ckpt)
    assert result.unconverted == ["module.encoder_q.layer1.0.se.weight", "module.extra_thing"]


def test_numpy_arrays_become_tensors(tv_sd):
    ckpt = {"model": {k: v.numpy() for k, v in tv_sd.items()}, "__author__": "someone"}
    result = convert_to_detectron2(ckpt, fmt="torchvision")
    assert all(isinstance(v, torch.Tensor) for v in result.model.values())
    assert torch.equal(result.model["res5.2.conv3.weight"], tv_sd["layer4.2.conv3.weight"])


def test_wrong_explicit_format_and_unknown_format_fail_clearly(tv_sd):
    with pytest.raises(ValueError, match="no moco backbone found"):
        convert_to_detectron2(tv_sd, fmt="moco")
    with pytest.raises(ValueError, match="unknown checkpoint format 'swav'"):
        convert_to_detectron2(tv_sd, fmt="swav")


def test_ambiguous_backbones_need_a_prefix(tv_sd):
    ckpt = {**_prefixed(tv_sd, "lower."), **_prefixed(tv_sd, "upper.")}
    with pytest.raises(ValueError, match=r"several ResNet bodies.*'lower\.', 'upper\.'"):
        convert_to_detectron2(ckpt)
    result = convert_to_detectron2(ckpt, backbone_prefix="lower.")
    check_complete(result.model, resnet50_detectron2_keys())
    # The upper copy is reported, not silently dropped (its fc is a head).
    assert len(result.unconverted) == len(tv_sd) - 2
    assert set(result.dropped_heads) == {
        "lower.fc.weight",
        "lower.fc.bias",
        "upper.fc.weight",
        "upper.fc.bias",
    }


def test_undetectable_and_caffe2_checkpoints_fail_clearly():
    with pytest.raises(ValueError, match="cannot detect the checkpoint format.*'a.weight'"):
        detect_format({"a.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no state dict found.*'epoch'"):
        detect_format({"epoch": 1, "args": "x"})
    with pytest.raises(ValueError, match="Caffe2"):
        detect_format({"model": {"res2_0_branch2a_w": torch.zeros(1)}, "__author__": "Caffe2"})


# --- completeness and the CLI -----------------------------------------------------------------


def _without_block(sd: StateDict, prefix: str = "layer3.2.") -> StateDict:
    return {k: v for k, v in sd.items() if not k.startswith(prefix)}


def test_check_complete_names_missing_and_unexpected_keys(tv_sd):
    result = convert_to_detectron2(_without_block(tv_sd))
    with pytest.raises(ValueError, match=r"15 backbone keys missing: res4\.2\.conv1\.norm\.bias"):
        check_complete(result.model, resnet50_detectron2_keys())
    extra = {**result.model, "res5.3.conv1.weight": torch.zeros(1)}
    with pytest.raises(
        ValueError, match=r"missing: .*; 1 unexpected keys: res5\.3\.conv1\.weight$"
    ):
        check_complete(extra, resnet50_detectron2_keys())


def test_check_complete_rejects_a_different_depth(tv_sd):
    result = convert_to_detectron2(tv_sd)
    with pytest.raises(ValueError, match=r"255 backbone keys missing: res4\.10\.conv1"):
        check_complete(result.model, resnet_detectron2_keys(101))


def _cli_main() -> Callable:
    spec = importlib.util.spec_from_file_location(
        "convert_checkpoint", REPO / "tools/convert_checkpoint.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_converts_and_reports(tmp_path, tv_sd, capsys):
    src, dst = tmp_path / "moco.pth.tar", tmp_path / "out" / "moco_d2.pth"
    ckpt, _ = _moco_v2(tv_sd, None)
    torch.save(ckpt, src)
    assert _cli_main()([str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert "source format: moco (backbone prefix 'module.encoder_q.')" in out
    assert "converted tensors: 318" in out
    assert "module.encoder_k: 322" in out and "module.queue: 1" in out
    assert "unconverted keys: 0" in out
    saved = load_checkpoint_file(dst)
    assert saved["matching_heuristics"] is True and saved["source_format"] == "moco"
    assert torch.equal(saved["model"]["res4.5.conv2.weight"], tv_sd["layer3.5.conv2.weight"])


def test_cli_refuses_missing_keys_and_writes_nothing(tmp_path, tv_sd, capsys):
    src, dst = tmp_path / "broken.pth", tmp_path / "broken_d2.pth"
    torch.save(_without_block(tv_sd), src)
    assert _cli_main()([str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert "refusing to write" in err and "res4.2.conv3.weight" in err
    assert not dst.exists()
    assert os.listdir(tmp_path) == ["broken.pth"]


def test_cli_refuses_pkl_output_and_missing_input(tmp_path, tv_sd, capsys):
    src = tmp_path / "tv.pth"
    torch.save(tv_sd, src)
    assert _cli_main()([str(src), str(tmp_path / "x.pkl")]) == 2
    assert "must not end in .pkl" in capsys.readouterr().err
    assert _cli_main()([str(tmp_path / "nope.pth"), str(tmp_path / "y.pth")]) == 2
    assert "nope.pth" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["tv.pth"]
