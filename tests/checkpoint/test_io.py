"""Checkpoint files: atomic writes, safe loading, and loading into a Detectron2 R50-C4 detector."""

from __future__ import annotations

import argparse
import logging
import os
import pickle

import bissl_det  # noqa: F401  (detectron2 shims before detectron2 is imported)
from bissl_det.checkpoint import (
    UntrustedCheckpointError,
    convert_to_detectron2,
    load_checkpoint_file,
    save_backbone_checkpoint,
)

import numpy as np
import pytest
import torch
import torchvision


@pytest.fixture(scope="module")
def d2_sd() -> dict[str, torch.Tensor]:
    """A converted ResNet-50 with random weights and distinct BatchNorm statistics."""
    torch.manual_seed(0)
    sd = torchvision.models.resnet50(weights=None).state_dict()
    for key, value in sd.items():
        if key.endswith(("running_mean", "running_var", "bias")):
            value.copy_(torch.rand_like(value) + 0.1)
    return convert_to_detectron2(sd).model


def test_save_writes_the_detectron2_format(tmp_path, d2_sd):
    path = tmp_path / "sub" / "backbone.pth"
    half = {k: v.half() if v.is_floating_point() else v for k, v in d2_sd.items()}
    save_backbone_checkpoint(path, half, author="me", extra={"source_format": "torchvision"})

    loaded = torch.load(path, weights_only=True)  # the safe loader must accept it
    assert loaded["__author__"] == "me"
    assert loaded["matching_heuristics"] is True
    assert loaded["source_format"] == "torchvision"
    assert loaded["model"].keys() == d2_sd.keys()
    weight = loaded["model"]["res3.1.conv2.weight"]
    assert weight.dtype == torch.float32 and weight.device.type == "cpu"
    assert torch.equal(weight, half["res3.1.conv2.weight"].float())
    counter = loaded["model"]["res2.0.conv1.norm.num_batches_tracked"]
    assert counter.dtype == torch.int64  # integer buffers are not cast
    assert sorted(os.listdir(path.parent)) == ["backbone.pth"]  # no temporary file left


def test_failed_save_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, d2_sd, monkeypatch):
    path = tmp_path / "backbone.pth"
    path.write_bytes(b"previous checkpoint")

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_backbone_checkpoint(path, d2_sd)
    assert os.listdir(tmp_path) == ["backbone.pth"]
    assert path.read_bytes() == b"previous checkpoint"

    with pytest.raises(OSError, match="disk full"):
        save_backbone_checkpoint(tmp_path / "new.pth", d2_sd)
    assert os.listdir(tmp_path) == ["backbone.pth"]


def test_save_rejects_bad_arguments(tmp_path, d2_sd):
    with pytest.raises(ValueError, match=r"\['model'\] clash"):
        save_backbone_checkpoint(tmp_path / "a.pth", d2_sd, extra={"model": 1})
    with pytest.raises(ValueError, match="must not end in .pkl"):
        save_backbone_checkpoint(tmp_path / "a.pkl", d2_sd)
    with pytest.raises(ValueError, match="Caffe2"):
        save_backbone_checkpoint(tmp_path / "a.pth", d2_sd, author="Caffe2")
    with pytest.raises(ValueError, match="'stem.conv1.weight' is a ndarray"):
        save_backbone_checkpoint(tmp_path / "a.pth", {"stem.conv1.weight": np.zeros(1)})
    assert os.listdir(tmp_path) == []


def test_load_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_checkpoint_file(tmp_path / "nowhere.pth")


def test_pickled_objects_need_trust(tmp_path, caplog):
    path = tmp_path / "moco.pth.tar"
    torch.save({"args": argparse.Namespace(lr=0.03), "state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(UntrustedCheckpointError, match=r"trust_pickle=True.*argparse\.Namespace"):
        load_checkpoint_file(path)
    with caplog.at_level(logging.WARNING, logger="bissl_det.checkpoint.io"):
        loaded = load_checkpoint_file(path, trust_pickle=True)
    assert loaded["args"].lr == 0.03
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(2))
    assert "weights_only=False" in caplog.text and "moco.pth.tar" in caplog.text


@pytest.mark.parametrize("trust", [False, True])
def test_corrupt_file_is_reported_not_blamed_on_trust(tmp_path, trust):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"\x80\x02not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pth is not a readable torch checkpoint") as info:
        load_checkpoint_file(path, trust_pickle=trust)
    assert not isinstance(info.value, UntrustedCheckpointError)


def test_detectron2_pkl_files_are_read_with_pickle(tmp_path, d2_sd):
    path = tmp_path / "model_zoo.pkl"
    payload = {"model": {k: v.numpy() for k, v in d2_sd.items()}, "__author__": "Detectron2 Zoo"}
    with open(path, "wb") as f:
        pickle.dump(payload, f)
    loaded = load_checkpoint_file(path)
    assert loaded["__author__"] == "Detectron2 Zoo"
    result = convert_to_detectron2(loaded)
    assert result.source_format == "detectron2"
    assert torch.equal(result.model["res5.2.conv3.weight"], d2_sd["res5.2.conv3.weight"])


def _r50_c4_on_cpu():
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res4"]
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RPN.IN_FEATURES = ["res4"]
    cfg.MODEL.ROI_HEADS.NAME = "Res5ROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["res4"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 16
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.280, 103.530]
    cfg.MODEL.PIXEL_STD = [58.395, 57.120, 57.375]
    cfg.INPUT.FORMAT = "RGB"
    return build_model(cfg)


def test_saved_file_loads_into_a_detectron2_r50_c4(tmp_path, d2_sd):
    from detectron2.checkpoint import DetectionCheckpointer

    path = tmp_path / "backbone.pth"
    save_backbone_checkpoint(path, d2_sd)
    model = _r50_c4_on_cpu()
    DetectionCheckpointer(model).load(str(path))

    state = model.state_dict()
    loaded_keys = set()
    for key, value in state.items():
        if key.startswith("backbone."):
            source = key[len("backbone.") :]
        elif key.startswith("roi_heads.res5."):
            source = key[len("roi_heads.") :]
        else:
            continue
        assert torch.equal(value, d2_sd[source]), key
        loaded_keys.add(source)
    # Every backbone tensor of the detector came from the file (FrozenBN has no counters).
    assert loaded_keys == {k for k in d2_sd if not k.endswith("num_batches_tracked")}
