"""Every BiSSL configuration key, with the BiSSL paper's defaults (see BISSL_REFERENCE.md).

Use ``add_bissl_config(cfg)`` on a ``detectron2.config.get_cfg()`` before merging a YAML file.
Schedules count optimiser steps: a BiSSL "stage" is LOWER_STEPS lower steps, then UPPER_STEPS
upper steps.
"""

from __future__ import annotations

from detectron2.config import CfgNode as CN

# DATASETS.CUSTOM entry keys per FORMAT: (required, optional).
CUSTOM_DATASET_KEYS = {
    "voc": ({"NAME", "FORMAT", "ROOT", "SPLIT", "CLASSES"}, {"YEAR"}),
    "coco": ({"NAME", "FORMAT", "JSON", "IMAGE_ROOT"}, set()),
}
# BISSL.COUPLING values: BiSSL and the arms of a study (engine/coupling.py).
COUPLINGS = ("bilevel", "first_order", "proximal", "decoupled")
GRAPH_DTYPES = ("float32", "bfloat16")  # BISSL.HYPERGRAD.GRAPH_DTYPE
# DATASETS.CHECK_IMAGES values: which images are decoded in full at start-up.
CHECK_IMAGES_MODES = ("header", "decode_test", "decode_all")


def add_dataset_config(cfg: CN) -> CN:
    """Add the data set keys (registered and checked by ``bissl_det.data.register_from_config``)."""
    # User data sets, registered under NAME before training/evaluation; a list of dicts:
    #   {NAME, FORMAT: "voc", ROOT, SPLIT, CLASSES: [...], YEAR (optional, 2007)}
    #   {NAME, FORMAT: "coco", JSON, IMAGE_ROOT}  (boxes; optional polygon/RLE masks)
    # Relative paths: current directory first, then $DETECTRON2_DATASETS.
    cfg.DATASETS.CUSTOM = []
    # Start-up check of every image of DATASETS.TRAIN/TEST and BISSL.PRETEXT_DATA.DATASETS:
    # "header" (exists, readable, size as annotated, bit depth, pixel limit), "decode_test"
    # (also decodes the TEST images, so a truncated one fails before training) or "decode_all".
    cfg.DATASETS.CHECK_IMAGES = "decode_test"
    return cfg


def add_bissl_config(cfg: CN) -> CN:
    """Add the BiSSL keys to a Detectron2 config in place (and return it)."""
    _C = cfg
    add_dataset_config(_C)

    # ---- What the two levels are -------------------------------------------------------------
    _C.MODEL.BISSL = CN()
    # Meta-architecture of the upper (downstream) level inside BiSSLDetector.
    _C.MODEL.BISSL.UPPER_META_ARCHITECTURE = "GeneralizedRCNN"
    # Lower-level pretext task: "simclr" or "byol".
    _C.MODEL.BISSL.PRETEXT = "simclr"

    _C.MODEL.SIMCLR = CN()
    # NT-Xent temperature.
    _C.MODEL.SIMCLR.TEMPERATURE = 0.5
    # Projector widths after the backbone's pooled features (2048 for R50): 2048-256-256-256.
    _C.MODEL.SIMCLR.PROJECTOR_DIMS = [256, 256, 256]
    # Gather embeddings across processes so negatives (and the loss) are global.
    _C.MODEL.SIMCLR.GATHER = True
    # Encode the two views as two batches (per-view BN statistics, the BiSSL authors' way);
    # False: one joint batch of both views (the original SimCLR).
    _C.MODEL.SIMCLR.SEPARATE_VIEWS = False

    _C.MODEL.BYOL = CN()
    # Projector widths after the pooled features, predictor widths after the projector (whose
    # output is the predictor's input): three Linear layers each, 2048-256-256-256 and
    # 256-256-256-256 for R50, BN + ReLU between, no bias on the last (the authors' MLPs).
    _C.MODEL.BYOL.PROJECTOR_DIMS = [256, 256, 256]
    _C.MODEL.BYOL.PREDICTOR_DIMS = [256, 256, 256]
    # EMA momentum of the target network (updated after each lower optimiser step only).
    _C.MODEL.BYOL.EMA_MOMENTUM = 0.9995

    _C.MODEL.CLASSIFIER = CN()
    # Classes of the classification upper level (BiSSLClassifier).
    _C.MODEL.CLASSIFIER.NUM_CLASSES = 10
    # Multi-label targets (VOC07 classification) use a binary cross-entropy loss.
    _C.MODEL.CLASSIFIER.MULTI_LABEL = False

    # ---- The bilevel optimisation ----------------------------------------------------------
    _C.BISSL = CN()
    # Alternations T; lower steps N_L and upper steps N_U per stage.
    _C.BISSL.STAGES = 500
    _C.BISSL.LOWER_STEPS = 20
    _C.BISSL.UPPER_STEPS = 8
    # Proximity weight lambda in L_P(theta) + lambda/2 ||theta - phi||^2.
    _C.BISSL.LAMBDA = 1e-3
    # How the levels are coupled (engine/coupling.py). "bilevel": BiSSL (the pull
    # lambda/2 ||theta - phi||^2 and the implicit gradient x). Arms of a study: "first_order"
    # (x = g), "proximal" (x = 0: theta pulled toward a phi trained by GAMMA L_D alone) and
    # "decoupled", the compute-matched control: no pull (theta never depends on phi), x = 0. All
    # draw the same pretext batches and run the same lower and upper steps for the same SEED.
    _C.BISSL.COUPLING = "bilevel"
    # Weight of the upper loss on the upper backbone itself: L_D(theta*) + GAMMA * L_D(phi).
    _C.BISSL.GAMMA = 1.0
    # Save both levels (and export the lower backbone) every this many stages.
    _C.BISSL.CHECKPOINT_PERIOD = 50
    # Write metrics every this many stages.
    _C.BISSL.LOG_PERIOD = 1

    _C.BISSL.AMP = CN()
    # Mixed precision for the first-order passes (pretext steps, both downstream passes of the
    # upper step); the Hessian graph, its products and CG stay in float32 for accuracy.
    _C.BISSL.AMP.ENABLED = False
    # torch dtype name: "bfloat16" (no loss scaling needed) or "float16".
    _C.BISSL.AMP.DTYPE = "bfloat16"
    # NHWC weights, for GPU tensor cores (upper step 1.2-1.5x slower on CPU: benchmarks/).
    _C.BISSL.CHANNELS_LAST = False
    # Recompute ResNet block activations in backward (modeling/memory.py): saves those of the
    # first-order passes, not the retained graph the Hessian products need, which was the
    # upper step's peak in benchmarks/ (no saving there); upper step 1.2-1.5x slower.
    _C.BISSL.ACTIVATION_CHECKPOINTING = False
    # At start-up on CUDA, the stage's peak memory estimate (engine/memory_plan.py) against the
    # device: "refuse" (stop before the head warm-up, naming the largest batch that fits),
    # "warn", or "off".
    _C.BISSL.MEMORY_PLAN = "refuse"

    _C.BISSL.HYPERGRAD = CN()
    # The matrix C of the implicit-gradient system (I + C / (LAMBDA + DAMPING)) x = g, built once
    # per stage: "hessian" (the paper's pretext Hessian: indefinite on trained models), "ggn" (the
    # Gauss-Newton matrix of the part of the pretext loss convex in its outputs: PSD, same cost
    # per product) or "fisher" (empirical Fisher of the last FISHER_HISTORY lower-step pretext
    # gradients: no extra forward or backward at all).
    _C.BISSL.HYPERGRAD.CURVATURE = "hessian"
    # How the system is solved: "cg", "layerwise_cg" (the authors' variant), "neumann" (step from
    # an eigenvalue estimate), "lanczos" (one basis of BASIS_SIZE products per stage serves every
    # upper step) or "direct" (the curvature's exact inverse: "fisher" only, by Woodbury).
    _C.BISSL.HYPERGRAD.SOLVER = "cg"
    # How a "ggn" product gets J v: "forward" (one forward-mode pass per product; the stage keeps
    # only the first-order graph) or "double_backward" (through a second-order J^T u graph built
    # once per stage). The same matrix; on a full-width ResNet-50 (CPU) forward mode halves the
    # stage's graph (59 -> 30 MiB per 96 px image) and makes products 1.55x, the build 3x cheaper.
    _C.BISSL.HYPERGRAD.GGN_JV = "forward"
    # Solver iterations (products per upper step); for "lanczos", correction iterations per step.
    _C.BISSL.HYPERGRAD.MAX_ITER = 5
    # Stop early once ||residual|| <= TOL * ||g|| (0: always MAX_ITER iterations).
    _C.BISSL.HYPERGRAD.TOL = 0.0
    # Damping delta added to LAMBDA in the system (0: the exact implicit gradient).
    _C.BISSL.HYPERGRAD.DAMPING = 10.0
    # What CG does at a direction with p^T A p <= 0 (proof the system is indefinite): "truncate"
    # (keep the last iterate before it, as truncated-Newton CG does) or "continue" (the paper's
    # code: step on, which can return x hundreds of times longer than g).
    _C.BISSL.HYPERGRAD.ON_NEGATIVE_CURVATURE = "truncate"
    # Lanczos basis size per stage (SOLVER "lanczos").
    _C.BISSL.HYPERGRAD.BASIS_SIZE = 10
    # True: grow the Lanczos basis (SOLVER "lanczos") only until the free residual estimate of
    # the stage's first right-hand side meets TOL (> 0), BASIS_SIZE being the cap; the size
    # used is logged as hypergrad_basis_size.
    _C.BISSL.HYPERGRAD.ADAPTIVE_BASIS = False
    # Lower-step pretext gradients kept for CURVATURE "fisher", and where ("cpu" or "model": the
    # model's device). m gradients of the backbone: ~0.1 GB each for a ResNet-50.
    _C.BISSL.HYPERGRAD.FISHER_HISTORY = 20
    _C.BISSL.HYPERGRAD.FISHER_DEVICE = "cpu"
    # Log the true relative residual ||A x - g|| / ||g|| of every solve (one extra product per
    # upper step); False logs the solver's own estimate.
    _C.BISSL.HYPERGRAD.TRUE_RESIDUAL = True
    # A stage whose worst true residual exceeds this is out of range: a WARNING names the key to
    # change (engine/verdict.py), and results.json counts such stages under "hypergradient".
    _C.BISSL.HYPERGRAD.WARN_RESIDUAL = 0.3
    # Lanczos steps per stage estimating the extreme eigenvalues of I + C / (LAMBDA + DAMPING)
    # (products; free for SOLVER "lanczos", whose basis gives them). 0: not estimated.
    _C.BISSL.HYPERGRAD.EIGEN_STEPS = 8
    # Treat the pretext head as a lower-level variable in the derivative (joint system over
    # backbone and head, identity on the backbone only = the Schur complement); the paper: False.
    _C.BISSL.HYPERGRAD.INCLUDE_PRETEXT_HEAD = False
    # TF32 in the curvature batch's forward, the products and the solvers (Ampere+ GPUs): False
    # runs them in true float32 whatever torch's global switches say (utils/precision.py; cost
    # and accuracy in docs/full_scale.md). The first-order passes keep the global settings.
    _C.BISSL.HYPERGRAD.ALLOW_TF32 = False
    # Images of the curvature batch, over all processes: the first ones of the stage's pretext
    # batch (0: all of it, the paper's choice). Smaller: a proportionally smaller retained graph
    # (engine/curvature_batch.py; its effect on the implicit gradient in docs/full_scale.md).
    _C.BISSL.HYPERGRAD.IMS_PER_BATCH = 0
    # Precision of the curvature batch's retained graph: "float32" or "bfloat16" (its forward
    # under autocast: about half the memory; products and solvers stay float32).
    _C.BISSL.HYPERGRAD.GRAPH_DTYPE = "float32"

    _C.BISSL.LOWER = CN()
    # LARS over the lower backbone and pretext head.
    _C.BISSL.LOWER.BASE_LR = 1.0
    _C.BISSL.LOWER.MOMENTUM = 0.9
    _C.BISSL.LOWER.WEIGHT_DECAY = 1e-6
    # Linear warm-up steps, then cosine to FINAL_LR_FACTOR * BASE_LR over STAGES * LOWER_STEPS.
    _C.BISSL.LOWER.WARMUP_STEPS = 200
    _C.BISSL.LOWER.FINAL_LR_FACTOR = 1e-3
    # Pretext images per step, over all processes.
    _C.BISSL.LOWER.IMS_PER_BATCH = 1024
    # Gradient-norm clipping (0 disables).
    _C.BISSL.LOWER.CLIP_GRAD_NORM = 10.0

    _C.BISSL.UPPER = CN()
    # SGD over the upper backbone and downstream head (VOC detection, SimCLR: 0.015 / 0).
    _C.BISSL.UPPER.BASE_LR = 0.015
    _C.BISSL.UPPER.MOMENTUM = 0.9
    _C.BISSL.UPPER.WEIGHT_DECAY = 0.0
    # Cosine over STAGES * UPPER_STEPS down to FINAL_LR_FACTOR * BASE_LR (the authors': 1e-3).
    _C.BISSL.UPPER.FINAL_LR_FACTOR = 1e-3
    # Downstream images per step, over all processes.
    _C.BISSL.UPPER.IMS_PER_BATCH = 16
    _C.BISSL.UPPER.CLIP_GRAD_NORM = 10.0

    _C.BISSL.HEAD_WARMUP = CN()
    # Downstream head training on the frozen backbone before stage 1. ITERS > 0 wins over EPOCHS.
    _C.BISSL.HEAD_WARMUP.ITERS = 0
    _C.BISSL.HEAD_WARMUP.EPOCHS = 5.0
    # Constant-lr SGD; None: the upper level's BASE_LR / WEIGHT_DECAY (the authors' choice).
    _C.BISSL.HEAD_WARMUP.BASE_LR = None
    _C.BISSL.HEAD_WARMUP.MOMENTUM = 0.9
    _C.BISSL.HEAD_WARMUP.WEIGHT_DECAY = None
    # Backbone BN during warm-up: "train" (batch statistics, as the authors) or "frozen" (eval).
    _C.BISSL.HEAD_WARMUP.BN_MODE = "train"

    # ---- Pretext data (unlabeled images, two augmented views each) ------------------------------
    _C.BISSL.PRETEXT_DATA = CN()
    # Folders searched recursively for images.
    _C.BISSL.PRETEXT_DATA.IMAGE_ROOTS = []
    # Registered Detectron2 datasets whose images (not annotations) are added.
    _C.BISSL.PRETEXT_DATA.DATASETS = []
    # Skip undecodable images (warned and counted); fail once more than this fraction is bad.
    _C.BISSL.PRETEXT_DATA.MAX_BAD_FRACTION = 0.01
    _C.BISSL.PRETEXT_DATA.NUM_WORKERS = 4
    _C.BISSL.PRETEXT_DATA.AUG = CN()
    # Square crop size of both views.
    _C.BISSL.PRETEXT_DATA.AUG.CROP_SIZE = 96
    # RandomResizedCrop area range (the aspect-ratio range stays 3/4..4/3).
    _C.BISSL.PRETEXT_DATA.AUG.CROP_SCALE = (0.08, 1.0)
    _C.BISSL.PRETEXT_DATA.AUG.FLIP_P = 0.5
    # Colour jitter (brightness, contrast, saturation, hue), applied with JITTER_P.
    _C.BISSL.PRETEXT_DATA.AUG.JITTER = (0.4, 0.4, 0.2, 0.1)
    _C.BISSL.PRETEXT_DATA.AUG.JITTER_P = 0.8
    _C.BISSL.PRETEXT_DATA.AUG.GRAY_P = 0.2
    # Per-view probabilities (view 1, view 2) of Gaussian blur and solarisation.
    _C.BISSL.PRETEXT_DATA.AUG.BLUR_P = (1.0, 0.1)
    _C.BISSL.PRETEXT_DATA.AUG.SOLARIZE_P = (0.0, 0.2)

    add_cls_config(_C)
    add_det_search_config(_C)

    add_pretrain_config(_C)

    # ---- Multi-process runs ------------------------------------------------------------------
    # Every this many iterations of a trainer (BiSSL stages, pretraining or fine-tuning steps),
    # and after the last, the processes compare checksums of every floating-point parameter and
    # buffer of their model copies (one small all-reduce) and stop, naming the first differing
    # tensor, if the copies differ. 0: only after the last iteration.
    _C.REPLICA_CHECK_PERIOD = 20
    return cfg


def add_cls_config(cfg: CN) -> CN:
    """Add the classification keys (BiSSLClassifier's data, tools/eval_cls.py, its search)."""
    _C = cfg
    _C.CLS = CN()
    # "imagefolder" (ROOT/<class>/*.jpg) or "voc07" (multi-label, from a VOC folder).
    _C.CLS.FORMAT = "imagefolder"
    _C.CLS.TRAIN_ROOT = ""
    _C.CLS.TEST_ROOT = ""
    # Class names; empty: sorted folder names (imagefolder).
    _C.CLS.CLASSES = []
    # Square input size of train crops and test center crops.
    _C.CLS.IMAGE_SIZE = 224
    # RandomResizedCrop area range of the training crops (torchvision's default 0.08-1; small
    # images such as 28-32 px digits or clothes lose their object below ~0.3).
    _C.CLS.CROP_SCALE = (0.08, 1.0)
    _C.CLS.NUM_WORKERS = 4
    _C.CLS.SOLVER = CN()
    # Training length of tools/eval_cls.py; ITERS > 0 wins over EPOCHS (passes over TRAIN_ROOT).
    _C.CLS.SOLVER.ITERS = 0
    _C.CLS.SOLVER.EPOCHS = 100.0
    # SGD (momentum) with a cosine schedule from BASE_LR to 0, no warm-up.
    _C.CLS.SOLVER.BASE_LR = 0.05
    _C.CLS.SOLVER.MOMENTUM = 0.9
    _C.CLS.SOLVER.WEIGHT_DECAY = 5e-4
    # Training images per step (one process).
    _C.CLS.SOLVER.IMS_PER_BATCH = 256
    # Images per step of the (un-augmented) evaluation passes.
    _C.CLS.SOLVER.TEST_IMS_PER_BATCH = 64
    # Write metrics (console line with ETA, metrics.json, TensorBoard) every this many steps.
    _C.CLS.SOLVER.LOG_PERIOD = 20
    # Also evaluate every this many steps (accuracy curves); 0: only after the last step.
    _C.CLS.SOLVER.EVAL_PERIOD = 0
    _C.CLS.SEARCH = CN()
    # tools/search.py on a classification config: lr and weight decay drawn log-uniformly from
    # these (the authors' ranges).
    _C.CLS.SEARCH.LR_RANGE = (1e-4, 1.0)
    _C.CLS.SEARCH.WD_RANGE = (1e-5, 1e-2)
    # Fraction of TRAIN_ROOT held out (per class for single-label sets) to score the trials.
    _C.CLS.SEARCH.VAL_FRACTION = 0.2
    _C.CLS.PROBE = CN()
    # tools/eval_cls.py --logistic-probe (the deterministic linear probe): L2 logistic regression
    # by L-BFGS in float64 on frozen, un-augmented features. The L2 strength is the one of
    # L2_GRID that scores best on VAL_FRACTION of CLS.TRAIN_ROOT (per class, seeded by SEED);
    # the probe is then refitted on all of CLS.TRAIN_ROOT and scored on CLS.TEST_ROOT.
    _C.CLS.PROBE.L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    _C.CLS.PROBE.VAL_FRACTION = 0.2
    # L-BFGS iterations at most, and the stopping tolerance on max |gradient|.
    _C.CLS.PROBE.MAX_ITER = 1000
    _C.CLS.PROBE.TOL = 1e-8
    return cfg


def add_det_search_config(cfg: CN) -> CN:
    """Add the keys of tools/search.py on a detection fine-tuning config (tools/finetune_det.py)."""
    _C = cfg
    _C.DET_SEARCH = CN()
    # SOLVER.BASE_LR and SOLVER.WEIGHT_DECAY drawn log-uniformly from these.
    _C.DET_SEARCH.LR_RANGE = (1e-3, 0.1)
    _C.DET_SEARCH.WD_RANGE = (1e-5, 1e-3)
    # Fraction of the DATASETS.TRAIN images held out (a seeded random subset) to score the
    # trials; DATASETS.TEST is never used by the search.
    _C.DET_SEARCH.VAL_FRACTION = 0.1
    # Objective on that split, maximised: "AP50" or "AP" (COCO-style evaluation, percent).
    _C.DET_SEARCH.METRIC = "AP50"
    return cfg


def add_pretrain_config(cfg: CN) -> CN:
    """Add the keys of conventional SSL pretraining (tools/pretrain_ssl.py)."""
    cfg.PRETRAIN = CN()
    # LARS steps; lr warm-up steps then cosine to FINAL_LR_FACTOR * BASE_LR.
    cfg.PRETRAIN.ITERS = 1000
    # LARS learning rate, momentum and weight decay (biases and norms: no decay, no adaptation).
    cfg.PRETRAIN.BASE_LR = 4.8
    cfg.PRETRAIN.MOMENTUM = 0.9
    cfg.PRETRAIN.WEIGHT_DECAY = 1e-6
    cfg.PRETRAIN.WARMUP_STEPS = 100
    cfg.PRETRAIN.FINAL_LR_FACTOR = 1e-3
    # Images per step, over all processes (each gives two views).
    cfg.PRETRAIN.IMS_PER_BATCH = 1024
    # Gradient-norm clipping (0 disables; the norm is still checked for NaN/Inf).
    cfg.PRETRAIN.CLIP_GRAD_NORM = 0.0
    # Checkpoint (and export pretext_backbone.pth) every this many steps.
    cfg.PRETRAIN.CHECKPOINT_PERIOD = 500
    # Write metrics (console line with ETA, metrics.json) every this many steps.
    cfg.PRETRAIN.LOG_PERIOD = 20
    # BYOL target momentum per step: "cosine" (MODEL.BYOL.EMA_MOMENTUM -> 1 over ITERS, as in
    # BYOL) or "constant" (MODEL.BYOL.EMA_MOMENTUM throughout).
    cfg.PRETRAIN.EMA_SCHEDULE = "cosine"
    # Synchronise BN statistics across processes, as the authors' pretraining does (torch's
    # SyncBatchNorm: CUDA only; the BiSSL lower level keeps plain BN for double backward).
    cfg.PRETRAIN.SYNC_BN = False
    return cfg


def config_value(cfg: CN, key: str):
    """The value of a dotted key (``"CLS.NUM_WORKERS"``); KeyError naming it if absent."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"config has no key {key!r}")
        node = node[part]
    return node
