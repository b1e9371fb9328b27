"""The compatibility module: clear errors for missing compiled ops, no effect on a full build."""

import os
import subprocess
import sys
import types

from bissl_det import compat

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.mark.skipif(compat.has_compiled_ops(), reason="a full detectron2 build is installed")
def test_rotated_box_operator_names_itself_and_the_fix():
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    boxes = torch.tensor([[10.0, 10.0, 4.0, 4.0, 0.0]])
    with pytest.raises(compat.MissingCompiledOpError) as err:
        pairwise_iou_rotated(boxes, boxes)
    message = str(err.value)
    assert "detectron2._C.box_iou_rotated" in message
    assert "git+https://github.com/facebookresearch/detectron2.git" in message
    # hasattr-style probing stays a plain False instead of raising.
    assert not hasattr(sys.modules["detectron2._C"], "nms_rotated")


def test_stub_answers_build_information_queries():
    stub = compat._MissingOps("detectron2._C")
    assert stub.has_cuda() is False
    assert "not built" in stub.get_compiler_version()


def test_full_build_is_left_alone(monkeypatch):
    """With a real detectron2._C (simulated), apply() changes nothing at all."""
    real_ops = types.ModuleType("detectron2._C")
    monkeypatch.setitem(sys.modules, "detectron2._C", real_ops)
    for name in compat.NUMPY_ALIASES:
        monkeypatch.delattr(np, name, raising=False)
    monkeypatch.delattr(Image, "LINEAR", raising=False)

    assert compat.has_compiled_ops()
    assert compat.apply() is False
    assert sys.modules["detectron2._C"] is real_ops
    assert not any(name in np.__dict__ for name in compat.NUMPY_ALIASES)
    assert not hasattr(Image, "LINEAR")


def test_missing_ops_get_the_shims(monkeypatch):
    monkeypatch.delitem(sys.modules, "detectron2._C", raising=False)
    monkeypatch.setattr(compat.importlib.util, "find_spec", lambda name: None if
                        name == "detectron2._C" else object())  # fmt: skip
    for name in compat.NUMPY_ALIASES:
        monkeypatch.delattr(np, name, raising=False)
    monkeypatch.delattr(Image, "LINEAR", raising=False)

    assert compat.apply() is True
    assert isinstance(sys.modules["detectron2._C"], compat._MissingOps)
    assert np.int is int and np.float is float
    assert Image.LINEAR == Image.BILINEAR


def test_aliases_detectron2_v0_6_uses_exist_and_behave():
    """After ``import bissl_det`` (done above), v0.6's numpy and Pillow spellings work."""
    for name, builtin in compat.NUMPY_ALIASES.items():
        # numpy 2 brought back np.bool as its own bool type: any alias of the same dtype serves.
        assert np.dtype(getattr(np, name)) == np.dtype(builtin), f"np.{name}"
    # detectron2 v0.6 writes e.g. ``np.asarray(boxes, dtype=np.float)`` and ``.astype(np.int)``.
    assert np.asarray([1, 2], dtype=np.float).dtype == np.float64
    assert np.asarray([1.7, -1.7]).astype(np.int).tolist() == [1, -1]
    # ... and resizes with Image.LINEAR (its ResizeTransform's default): the bilinear filter.
    image = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8))
    linear = np.asarray(image.resize((5, 3), Image.LINEAR))
    assert np.array_equal(linear, np.asarray(image.resize((5, 3), Image.BILINEAR)))
    assert not np.array_equal(linear, np.asarray(image.resize((5, 3), Image.NEAREST)))


@pytest.mark.parametrize("op", ["nms_rotated", "deform_conv_forward", "ROIAlignRotated_forward"])
def test_calling_a_missing_op_names_it(op):
    stub = compat._MissingOps(compat.STUB_NAME)
    with pytest.raises(compat.MissingCompiledOpError, match=rf"detectron2\._C\.{op} is a compiled"):
        getattr(stub, op)(torch.zeros(1))
    assert isinstance(compat.MissingCompiledOpError(), AttributeError)  # hasattr() stays False
    assert not hasattr(stub, op)
    with pytest.raises(AttributeError):  # dunder probes (pickle, copy) are plain misses
        stub.__wrapped__  # noqa: B018


# Run in a fresh interpreter: the shims must work when bissl_det is the first import.
FASTER_RCNN_FORWARD = """
import bissl_det
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

cfg = get_cfg()  # detectron2's default: Faster R-CNN, ResNet-50 C4, upright boxes
cfg.MODEL.DEVICE = "cpu"
cfg.MODEL.RESNETS.STEM_OUT_CHANNELS, cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 16, 32
cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 8
cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
cfg.INPUT.MIN_SIZE_TEST = 96
torch.manual_seed(0)
model = build_model(cfg)
image = torch.rand(3, 96, 128) * 255
target = Instances((96, 128), gt_boxes=Boxes(torch.tensor([[10.0, 20.0, 60.0, 80.0]])),
                   gt_classes=torch.tensor([1]))
with EventStorage():
    losses = model([{"image": image, "instances": target}])
assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}, losses
assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
sum(losses.values()).backward()
model.eval()
with torch.no_grad():
    (out,) = model([{"image": image, "height": 96, "width": 128}])
assert out["instances"].image_size == (96, 128)
print("forward ok", bissl_det.compat.COMPILED_OPS_STUBBED)
"""


@pytest.mark.e2e  # a fresh Python process
def test_detectron2_faster_rcnn_forward_works_after_importing_bissl_det():
    done = subprocess.run(
        [sys.executable, "-c", FASTER_RCNN_FORWARD],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"forward ok {not compat.has_compiled_ops()}" in done.stdout
