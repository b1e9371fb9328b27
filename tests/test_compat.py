"""The compatibility module: clear errors for missing compiled ops, no effect on a full build."""

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


def test_detectron2_faster_rcnn_imports_after_bissl_det():
    from detectron2.modeling import build_model  # noqa: F401
