"""Mask R-CNN as BiSSL's upper level and in fine-tuning: the extra res5 norm feeds both ROI
branches, the mask loss reaches theta through the theta-view pass (finite differences), mask
evaluation scores ground truth 100 AP, and the COCO configs follow MoCo's protocol."""

import types
from pathlib import Path

from bissl_det.data.tasks import downstream_task
from bissl_det.evaluation.evaluate import build_detection_evaluator, detection_metrics
from bissl_det.runtime.setup import load_config
from tests.helpers import CONFIGS, NARROW_RESNET, TINY_C4, tiny_config

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import annotations_to_instances
from detectron2.layers import get_norm
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import mask_head as mask_head_module
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

TINY_MASK = CONFIGS / "quick" / "test_tiny_mask_C4.yaml"
TINY_MASK_FINETUNE = CONFIGS / "quick" / "test_tiny_mask_finetune_C4.yaml"
DEMO_COCO_TEST = "demo_coco_test"


def _first_batch(cfg, size: int = 2) -> list[dict]:
    return next(iter(downstream_task(cfg).build_train_loader(cfg, size, 0, 0)))


# ---- the extra res5 norm serves the box and the mask branch ------------------------------------


def _capture_inputs(module: torch.nn.Module, store: list) -> None:
    module.register_forward_pre_hook(lambda _, args: store.append(args[0].detach()))


def test_extra_res5_norm_feeds_box_and_mask_branches(in_demo_workdir, tmp_path):
    cfg = tiny_config(TINY_MASK_FINETUNE, tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg)
    norm = model.roi_heads.res5.norm
    assert list(model.roi_heads.res5.named_children())[-1][0] == "norm"
    # weight 0, bias 0.5: whatever reaches the norm, its output is 0.5 (train and eval mode).
    with torch.no_grad():
        norm.weight.zero_()
        norm.bias.fill_(0.5)
    box_in, mask_in = [], []
    _capture_inputs(model.roi_heads.box_predictor, box_in)
    _capture_inputs(model.roi_heads.mask_head, mask_in)
    batch = _first_batch(cfg)

    with EventStorage():
        losses = model(batch)  # training: mask features = foreground rows of the box features
    assert "loss_mask" in losses
    assert box_in[0].numel() and mask_in[0].numel()
    assert torch.all(box_in[0] == 0.5) and torch.all(mask_in[0] == 0.5)

    mask_in.clear()
    model.eval()
    given = []
    for item in batch:
        gt = item["instances"]
        given.append(Instances(gt.image_size, pred_boxes=gt.gt_boxes, pred_classes=gt.gt_classes))
    with torch.no_grad():  # inference recomputes the ROI features of the boxes it is given
        out = model.inference(batch, detected_instances=given, do_postprocess=False)
    assert out[0].pred_masks.shape[0] == len(given[0])
    assert mask_in[0].numel() and torch.all(mask_in[0] == 0.5)


# ---- the mask loss reaches theta through the theta-view pass ------------------------------------


def _bce_in_logit_dtype(logits, targets, **kwargs):
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), **kwargs)


@pytest.fixture
def float64_mask_head(monkeypatch):
    """detectron2 casts mask targets to float32, and BCE returns the target's dtype: in float64
    the mask loss would be rounded to float32. Targets in the logits' dtype keep it float64."""
    patched = types.SimpleNamespace(
        **{**vars(F), "binary_cross_entropy_with_logits": _bce_in_logit_dtype}
    )
    monkeypatch.setattr(mask_head_module, "F", patched)


def _float64_bissl(cfg):
    """The tiny BiSSL model built in float64 (built so: BiSSL pairs its tensors at construction,
    and ``.double()`` would replace the buffers it paired; see the report of issue 13)."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = build_model(cfg)
    finally:
        torch.set_default_dtype(default)
    model.copy_lower_backbone_to_upper()
    return model


def _with_fixed_proposals(model, batch: list[dict]) -> list[dict]:
    """Given proposals (jittered ground-truth boxes) instead of the RPN's: theta moves the RPN's
    scores and so the proposal set, which would make the loss piecewise constant in theta."""
    model.upper.proposal_generator = None
    gen = torch.Generator().manual_seed(3)
    for item in batch:
        boxes = item["instances"].gt_boxes.tensor.double()
        boxes = boxes + 2.0 * torch.randn(boxes.shape, generator=gen, dtype=boxes.dtype)
        height, width = item["image"].shape[1:]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        item["proposals"] = Instances(
            (height, width),
            proposal_boxes=Boxes(boxes),
            objectness_logits=torch.zeros(len(boxes), dtype=boxes.dtype),
        )
    return batch


# The FPN upper level shrunk like test_tiny_mask_C4.yaml (its ResNet, FPN and heads).
TINY_FPN = [
    "MODEL.DEVICE", "cpu", *NARROW_RESNET, "MODEL.FPN.OUT_CHANNELS", "16",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "32", "MODEL.ROI_MASK_HEAD.CONV_DIM", "16",
    "MODEL.ROI_HEADS.NUM_CLASSES", "4", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
    "MODEL.SIMCLR.PROJECTOR_DIMS", "[32, 16]",
]  # fmt: skip


@pytest.mark.parametrize("arch", ["C4", "FPN"])
def test_mask_loss_gradient_wrt_theta_matches_finite_difference(
    arch, in_demo_workdir, tmp_path, float64_mask_head
):
    data_cfg = tiny_config(TINY_MASK, tmp_path)  # the demo COCO set with masks, 64 px
    cfg = data_cfg
    if arch == "FPN":
        cfg = load_config(str(CONFIGS / "bissl" / "simclr_R50_FPN_coco.yaml"), TINY_FPN)
    model = _float64_bissl(cfg)
    batch = _with_fixed_proposals(model, _first_batch(data_cfg))
    theta, phi = model.backbone_pairs.lower, model.backbone_pairs.upper

    def mask_loss() -> torch.Tensor:
        torch.manual_seed(1)  # the same ROI subsample (fixed proposals) every call
        losses = model.downstream_losses(batch, with_lower_backbone=True)
        return losses["loss_mask"]

    with EventStorage():
        loss = mask_loss()
        assert loss.dtype == torch.float64
        grads = torch.autograd.grad(loss, theta, retain_graph=True, allow_unused=True)
        # The theta view runs on theta only: phi is not in the graph.
        assert all(g is None for g in torch.autograd.grad(loss, phi, allow_unused=True))
        # Every theta tensor, stem to res5 (shared by the box and mask branches), gets a gradient.
        assert all(g is not None and g.abs().sum() > 0 for g in grads)

        gen = torch.Generator().manual_seed(4)
        direction = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in theta]
        scale = torch.sqrt(sum((d * d).sum() for d in direction))
        direction = [d / scale for d in direction]
        analytic = sum((g * d).sum() for g, d in zip(grads, direction, strict=True)).item()

        # ReLU kinks crossed make the error O(eps); measured relative error at 1e-7: C4 1e-4,
        # FPN 2e-7 (1e-3 and 2e-7 at 1e-6).
        eps = 1e-7
        with torch.no_grad():
            torch._foreach_add_(list(theta), direction, alpha=eps)
            plus = mask_loss().item()
            torch._foreach_add_(list(theta), direction, alpha=-2 * eps)
            minus = mask_loss().item()
            torch._foreach_add_(list(theta), direction, alpha=eps)
    numeric = (plus - minus) / (2 * eps)
    assert abs(analytic) > 1e-6
    assert numeric == pytest.approx(analytic, rel=1e-3)


# ---- mask evaluation ---------------------------------------------------------------------------


def _ground_truth_as_predictions(name: str, spoil_masks: bool = False) -> list[tuple]:
    """(input, output) pairs with every ground-truth object predicted at score 1, its mask too."""
    pairs = []
    for record in DatasetCatalog.get(name):
        size = (record["height"], record["width"])
        gt = annotations_to_instances(record["annotations"], size, mask_format="bitmask")
        masks = gt.gt_masks.tensor.clone()
        if spoil_masks:  # keep each mask's box, drop its left half: box AP stays 100
            for mask, box in zip(masks, gt.gt_boxes.tensor, strict=True):
                x0, x1 = int(box[0]), int((box[0] + box[2]) / 2)  # XYXY
                mask[:, x0:x1] = False
        predictions = Instances(
            size,
            pred_boxes=gt.gt_boxes,
            scores=torch.ones(len(gt)),
            pred_classes=gt.gt_classes,
            pred_masks=masks,
        )
        pairs.append(({"image_id": record["image_id"]}, {"instances": predictions}))
    return pairs


def _evaluate(cfg, pairs, out_dir) -> dict:
    evaluator = build_detection_evaluator(cfg, DEMO_COCO_TEST, str(out_dir))
    evaluator.reset()
    for inputs, outputs in pairs:
        evaluator.process([inputs], [outputs])
    return evaluator.evaluate()


def test_ground_truth_scores_100_box_and_mask_ap(in_demo_workdir, tmp_path):
    cfg = tiny_config(TINY_MASK, tmp_path)
    # The demo set mixes polygon (squares, triangles) and RLE (circles, crosses) masks.
    kinds = {type(a["segmentation"]) for r in DatasetCatalog.get(DEMO_COCO_TEST)
             for a in r["annotations"]}  # fmt: skip
    assert kinds == {list, dict}
    results = _evaluate(cfg, _ground_truth_as_predictions(DEMO_COCO_TEST), tmp_path / "gt")
    metrics = detection_metrics(results)
    assert metrics == {
        "AP": 100.0, "AP50": 100.0, "AP75": 100.0,
        "segm": {"AP": 100.0, "AP50": 100.0, "AP75": 100.0},
    }  # fmt: skip


def test_mask_ap_sees_the_masks(in_demo_workdir, tmp_path):
    cfg = tiny_config(TINY_MASK, tmp_path)
    pairs = _ground_truth_as_predictions(DEMO_COCO_TEST, spoil_masks=True)
    results = _evaluate(cfg, pairs, tmp_path / "spoilt")
    assert results["bbox"]["AP"] == 100.0
    assert results["segm"]["AP"] < 50.0  # half a mask: IoU about 0.5


def test_masks_are_scored_even_without_predictions(in_demo_workdir, tmp_path):
    cfg = tiny_config(TINY_MASK, tmp_path)
    empty = [
        (inputs, {"instances": out["instances"][:0]})
        for inputs, out in _ground_truth_as_predictions(DEMO_COCO_TEST)
    ]
    results = _evaluate(cfg, empty, tmp_path / "empty")
    assert set(results) == {"bbox", "segm"}


def test_mask_rcnn_on_a_voc_test_set_is_refused(in_demo_workdir, tmp_path):
    cfg = tiny_config(TINY_C4, tmp_path)  # boxes-only training data: MASK_ON set after it
    cfg.defrost()
    cfg.MODEL.MASK_ON = True
    with pytest.raises(ValueError, match="MODEL.MASK_ON.*'demo_voc_test'"):
        build_detection_evaluator(cfg, "demo_voc_test", str(tmp_path))
    assert MetadataCatalog.get("demo_voc_test").evaluator_type == "pascal_voc"


# ---- COCO configs: MoCo's protocol -------------------------------------------------------------

COCO_FINETUNE = ["coco_R50_C4_2x.yaml", "coco_R50_FPN_2x.yaml"]
COCO_BISSL = [f"{p}_R50_{a}_coco.yaml" for p in ("simclr", "byol") for a in ("C4", "FPN")]


@pytest.mark.parametrize(
    "path", [f"finetune/{n}" for n in COCO_FINETUNE] + [f"bissl/{n}" for n in COCO_BISSL]
)
def test_coco_configs_are_mask_rcnn_in_mocos_protocol(path):
    cfg = load_config(str(CONFIGS / path))
    assert cfg.MODEL.MASK_ON
    assert cfg.MODEL.RESNETS.NORM == "naiveSyncBN"
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 80
    assert cfg.INPUT.MIN_SIZE_TRAIN == (640, 672, 704, 736, 768, 800)
    assert cfg.DATASETS.TRAIN == ("coco_2017_train",)
    assert cfg.DATASETS.TEST == ("coco_2017_val",)
    if path.startswith("finetune"):
        assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS) == (180000, (120000, 160000))
        assert cfg.TEST.PRECISE_BN.ENABLED
    if "FPN" in path:
        assert cfg.MODEL.FPN.NORM == "naiveSyncBN"
        # The mask head sees foreground ROIs only: a count per GPU that differs, can be 0.
        assert cfg.MODEL.ROI_MASK_HEAD.NORM == "naiveSyncBN_N"
        assert cfg.MODEL.ROI_MASK_HEAD.NUM_CONV == 4
    else:
        assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm"


@pytest.mark.parametrize("arch", ["C4", "FPN"])
def test_bissl_coco_upper_level_is_mask_rcnn(arch):
    cfg = load_config(
        str(CONFIGS / "bissl" / f"simclr_R50_{arch}_coco.yaml"),
        ["MODEL.DEVICE", "cpu", *NARROW_RESNET],
    )
    model = build_model(cfg)
    assert model.upper.roi_heads.mask_on
    # The mask head is upper head (phi_d), never paired with theta.
    mask_params = {id(p) for p in model.upper.roi_heads.mask_head.parameters()}
    assert mask_params <= {id(p) for p in model.upper_head_parameters()}
    assert not mask_params & {id(p) for p in model.backbone_pairs.upper}
    assert len(model.backbone_pairs.upper) == 53 + 53 * 2  # convs + BN affine pairs of R50


# ---- why the FPN mask head's norm is naiveSyncBN_N ---------------------------------------------

WORLD = 2
CHANNELS = 3


def _roi_features(rows: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, CHANNELS, 2, 2, generator=gen, dtype=torch.float64) * 3 + 1


def _sync_norm_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        out = {}
        # Unequal foreground counts (3 and 1 ROIs), then none on rank 1.
        for case, rows in (("unequal", (3, 1)), ("empty", (3, 0))):
            x = _roi_features(rows[rank], seed=rank)
            for norm in ("naiveSyncBN", "naiveSyncBN_N"):
                if norm == "naiveSyncBN" and case == "empty":
                    continue  # asserts B > 0 on rank 1 (and rank 0 would wait forever)
                out[case, norm] = get_norm(norm, CHANNELS).double().train()(x).detach()
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_count_weighted_sync_norm_equals_one_batch_norm_over_all_rois(tmp_path):
    mp.start_processes(
        _sync_norm_worker,
        args=(str(tmp_path / "init"), str(tmp_path)),
        nprocs=WORLD,
        join=True,
        start_method="spawn",
    )
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    bn = torch.nn.BatchNorm2d(CHANNELS).double().train()
    pooled = bn(torch.cat([_roi_features(3, seed=0), _roi_features(1, seed=1)])).detach()
    counted = torch.cat([outs[0]["unequal", "naiveSyncBN_N"], outs[1]["unequal", "naiveSyncBN_N"]])
    torch.testing.assert_close(counted, pooled)
    # MoCo's naiveSyncBN averages the GPUs' statistics unweighted: not the statistics of all ROIs.
    equal = torch.cat([outs[0]["unequal", "naiveSyncBN"], outs[1]["unequal", "naiveSyncBN"]])
    assert (equal - pooled).abs().max() > 1e-2
    # No ROI on one GPU: the others normalise by their own ROIs alone.
    alone = bn(_roi_features(3, seed=0)).detach()
    torch.testing.assert_close(outs[0]["empty", "naiveSyncBN_N"], alone)
    assert outs[1]["empty", "naiveSyncBN_N"].shape == (0, CHANNELS, 2, 2)
