"""The BiSSL meta-architecture: which tensors form the shared backbone, and the theta-view loss."""

import copy

from bissl_det.data.build import build_downstream_train_loader
from bissl_det.runtime.setup import load_config
from tests.helpers import CONFIGS, NARROW_RESNET, TINY_C4, tiny_config

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage


def _model(config, *opts):
    cfg = load_config(str(config), ["MODEL.DEVICE", "cpu", *NARROW_RESNET, *opts])
    cfg.MODEL.RESNETS.NORM = "BN"
    return build_model(cfg)


def test_c4_backbone_is_stem_to_res4_plus_the_box_heads_res5():
    model = _model(TINY_C4)
    upper = model.backbone_pairs.upper_names
    assert {n.split(".")[0] for n in upper} == {"backbone", "roi_heads"}
    assert all(n.startswith("roi_heads.res5.") for n in upper if n.startswith("roi_heads"))
    assert "roi_heads.res5.0.conv1.weight" in upper and "backbone.stem.conv1.weight" in upper
    # The extra res5 norm, RPN and box predictor are downstream head, not backbone.
    head = {id(p) for p in model.upper_head_parameters()}
    named = dict(model.upper.named_parameters())
    for name in ("roi_heads.res5.norm.weight", "roi_heads.box_predictor.cls_score.weight"):
        assert id(named[name]) in head
    assert not head & {id(p) for p in model.backbone_pairs.upper}
    assert len(head) + len(upper) == len(named)


def test_fpn_backbone_is_the_bottom_up_resnet():
    model = _model(CONFIGS / "bissl" / "simclr_R50_FPN_voc.yaml")
    assert all(n.startswith("backbone.bottom_up.") for n in model.backbone_pairs.upper_names)
    assert len(model.backbone_pairs.names) == len(list(model.lower_backbone.parameters()))


def test_classifier_backbone():
    model = _model(CONFIGS / "quick" / "bissl_simclr_cls_demo.yaml")
    assert all(n.startswith("backbone.") for n in model.backbone_pairs.upper_names)
    assert [id(p) for p in model.upper_head_parameters()] == [
        id(model.upper.linear.weight),
        id(model.upper.linear.bias),
    ]


def test_copy_lower_backbone_to_upper():
    model = _model(TINY_C4)
    with torch.no_grad():
        for p in model.backbone_pairs.lower:
            p.add_(1.0)
    model.copy_lower_backbone_to_upper()
    for lower, upper in zip(model.backbone_pairs.lower, model.backbone_pairs.upper, strict=True):
        assert torch.equal(lower, upper)


def test_buffer_pairs_follow_device_and_dtype_moves():
    """``.to()``/``.cuda()``/``.double()`` replace buffers: the pairs must hold the new ones."""
    model = _model(TINY_C4).double()
    live = {id(b) for b in model.buffers()}
    pairs = model.backbone_buffer_pairs
    assert pairs.lower and all(id(b) in live for b in (*pairs.lower, *pairs.upper))
    assert all(b.dtype == torch.float64 for b in pairs.lower if b.is_floating_point())
    with torch.no_grad():
        for b in pairs.lower:
            b.add_(1)
    model.copy_lower_backbone_to_upper()
    for lower, upper in zip(pairs.lower, pairs.upper, strict=True):
        assert torch.equal(lower, upper)


def test_downstream_loss_on_theta(in_demo_workdir, tmp_path):
    """The theta view equals the detector run with theta's weights, grads go to theta only,
    and no BN statistics move in either level."""
    cfg = tiny_config(TINY_C4, tmp_path, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "512")
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    with torch.no_grad():  # theta != phi
        for p in model.backbone_pairs.lower:
            p.add_(0.01 * torch.randn_like(p))
    batch = next(iter(build_downstream_train_loader(cfg, 2)))
    # Backbone statistics of both levels (the head's own norms are the upper level's business).
    backbone_buffers = [f"upper.{n}" for n in model.backbone_buffer_pairs.upper_names]
    backbone_buffers += [f"lower.encoder.resnet.{n}" for n in model.backbone_buffer_pairs.names]
    state = model.state_dict()
    buffers_before = {k: state[k].clone() for k in backbone_buffers}

    reference = copy.deepcopy(model)
    reference.copy_lower_backbone_to_upper()
    with EventStorage():
        torch.manual_seed(1)
        losses = model.downstream_losses(batch, with_lower_backbone=True)
        torch.manual_seed(1)
        expected = reference.downstream_losses(batch)
    for key in expected:
        torch.testing.assert_close(losses[key], expected[key])

    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.backbone_pairs.upper)
    assert all(p.grad is not None for p in model.backbone_pairs.lower)
    assert any(p.grad is not None for p in model.upper_head_parameters())
    state = model.state_dict()
    assert any("running_mean" in k for k in buffers_before)
    for k, before in buffers_before.items():
        assert torch.equal(state[k], before), k


def test_upper_architecture_cannot_be_bissl():
    with pytest.raises(ValueError, match="UPPER_META_ARCHITECTURE"):
        _model(TINY_C4, "MODEL.BISSL.UPPER_META_ARCHITECTURE", "BiSSL")
