"""Classification transfer of a backbone checkpoint on the test split: seeds -> mean and std.

Protocol (tools/eval_cls.py):

* Model: ``ResNetClassifier`` (MODEL.RESNETS trunk + global pooling + linear layer), the backbone
  loaded from MODEL.WEIGHTS (any format :func:`~bissl_det.checkpoint.convert_to_detectron2` reads).
  Missing backbone keys are refused.
* Training (:class:`~bissl_det.engine.cls_trainer.ClassifierTrainer`): SGD with momentum,
  cosine from CLS.SOLVER.BASE_LR to 0 over CLS.SOLVER.ITERS (or EPOCHS) steps,
  random-resized-crop + flip. A linear probe freezes the backbone's weights AND its BN statistics;
  fine-tuning trains everything.
* Evaluation on CLS.TEST_ROOT: top-1 and mean per-class accuracy, or VOC07 11-point mAP (percent).
* Or the deterministic linear probe (``logistic_probe``, engine/cls_probe.py): L2 logistic
  regression by L-BFGS on frozen, un-augmented features, its L2 chosen on a validation split of
  CLS.TRAIN_ROOT; identical on rerun.
* ``seeds`` runs (seeds SEED, SEED + 1, ...): per-seed numbers, mean and sample std (ddof 1);
  each run writes metrics.json, TensorBoard events and plots to OUTPUT_DIR/seed_<seed>/.

lr and weight decay come from the config: tools/search.py selects them on a validation split of
CLS.TRAIN_ROOT and writes a config for this step (the test split is never used for selection).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from detectron2.config import CfgNode
from detectron2.utils import comm

from ..checkpoint.io import atomic_write_text
from ..data.classification_transfer import load_test_protocol_data, training_iters
from ..utils.stats import summarise
from .cls_probe import run_logistic_probe
from .cls_trainer import read_classifier_backbone, train_classifier

logger = logging.getLogger(__name__)

RESULTS_FILE = "cls_results.json"


def run_cls_eval(
    cfg: CfgNode, seeds: int = 1, linear_probe: bool = False, logistic_probe: bool = False
) -> dict:
    """The whole protocol; writes and returns OUTPUT_DIR/cls_results.json's content.

    ``logistic_probe``: the deterministic linear probe (engine/cls_probe.py) instead of SGD
    training; one run (its result does not depend on a seed beyond SEED's validation split).
    """
    if comm.get_world_size() > 1:
        raise RuntimeError("eval_cls.py runs in one process: use --num-gpus 1")
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: need at least 1")
    if logistic_probe and (linear_probe or seeds > 1):
        raise ValueError(
            "--logistic-probe is deterministic: it takes neither --linear-probe nor --seeds > 1"
        )
    data = load_test_protocol_data(cfg)
    backbone_state = read_classifier_backbone(cfg)
    if logistic_probe:
        return _write_results(cfg, _logistic_probe_results(cfg, backbone_state, data))
    protocol = "linear_probe" if linear_probe else "finetune"
    lr, wd = cfg.CLS.SOLVER.BASE_LR, cfg.CLS.SOLVER.WEIGHT_DECAY
    results: dict = {
        "weights": cfg.MODEL.WEIGHTS,
        "protocol": protocol,
        "train_root": cfg.CLS.TRAIN_ROOT,
        "test_root": cfg.CLS.TEST_ROOT,
        "num_train": len(data.train_set),
        "num_test": len(data.eval_set),
        "hparams": {
            "lr": lr,
            "weight_decay": wd,
            "iters": training_iters(cfg, len(data.train_set)),
            "ims_per_batch": cfg.CLS.SOLVER.IMS_PER_BATCH,
        },
    }
    per_seed = []
    for k in range(seeds):
        seed = max(cfg.SEED, 0) + k
        _, metrics = train_classifier(
            cfg,
            backbone_state,
            data,
            lr=lr,
            weight_decay=wd,
            seed=seed,
            linear_probe=linear_probe,
            output_dir=Path(cfg.OUTPUT_DIR) / f"seed_{seed}",
            run_name=f"{protocol} seed {seed} ({k + 1}/{seeds})",
        )
        per_seed.append({"seed": seed, "metrics": metrics})
    results["per_seed"] = per_seed
    return _write_results(cfg, results)


def _logistic_probe_results(cfg: CfgNode, backbone_state, data) -> dict:
    metrics, probe = run_logistic_probe(cfg, backbone_state, data)
    return {
        "weights": cfg.MODEL.WEIGHTS,
        "protocol": "logistic_probe",
        "train_root": cfg.CLS.TRAIN_ROOT,
        "test_root": cfg.CLS.TEST_ROOT,
        "num_train": len(data.train_set),
        "num_test": len(data.eval_set),
        "probe": probe,
        "per_seed": [{"seed": max(cfg.SEED, 0), "metrics": metrics}],
    }


def _write_results(cfg: CfgNode, results: dict) -> dict:
    """Mean and std over ``results["per_seed"]``, then OUTPUT_DIR/cls_results.json."""
    per_seed = results["per_seed"]
    stats = summarise([r["metrics"] for r in per_seed])  # sample std (ddof 1), 0 for one seed
    for field in ("mean", "std"):  # metric order as the evaluation reports it
        results[field] = {k: stats[k][field] for k in per_seed[0]["metrics"]}
    out = Path(cfg.OUTPUT_DIR) / RESULTS_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(results, indent=2), out)
    logger.info(
        "%s of %s over %d seed(s): mean %s, std %s (%s)",
        results["protocol"],
        cfg.MODEL.WEIGHTS,
        len(per_seed),
        results["mean"],
        results["std"],
        out,
    )
    return results
