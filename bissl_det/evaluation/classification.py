"""Classification metrics: top-1, mean per-class accuracy, and VOC2007 11-point mAP.

Inputs may be NumPy arrays, torch tensors (any device) or nested lists; metrics are computed in
NumPy float64 on the host, once per evaluation, so this is never a hot path.

Multi-label convention (shared with :mod:`bissl_det.data.classification`): labels are ``1``
(positive), ``0`` (negative) or ``-1`` (ignore: the class occurs only as difficult objects). The
VOC devkit writes these as 1 / -1 / 0 and, as here, counts ignored images neither as true nor as
false positives.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "mean_per_class_accuracy",
    "top1_accuracy",
    "voc07_11point_ap",
    "voc07_map",
]

# Recall thresholds of the VOC2007 11-point AP, computed as k * 0.1 in floating point exactly as the
# devkit's ``0:0.1:1`` (and detectron2's ``np.arange(0, 1.1, 0.1)``) do: 3 * 0.1 > 0.3, so a recall
# of exactly 3/10 does not reach the "0.3" threshold there either.
VOC07_RECALL_THRESHOLDS = np.arange(11) * 0.1


def _as_numpy(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    array = np.asarray(x)
    if array.dtype == object:
        raise ValueError(f"{name} must be numeric, got {array.dtype}")
    return array


def _check_logits_targets(logits, targets) -> tuple[np.ndarray, np.ndarray]:
    logits = _as_numpy(logits, "logits")
    targets = _as_numpy(targets, "targets")
    if logits.ndim != 2 or targets.ndim != 1 or len(logits) != len(targets):
        raise ValueError(
            f"expected logits (N, C) and targets (N,), got {logits.shape} and {targets.shape}"
        )
    if len(targets) == 0:
        raise ValueError("accuracy of an empty set is undefined (N = 0)")
    if not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"targets must be integer class indices, got dtype {targets.dtype}")
    if targets.min() < 0 or targets.max() >= logits.shape[1]:
        raise ValueError(
            f"targets must lie in [0, {logits.shape[1]}), got range "
            f"[{targets.min()}, {targets.max()}]"
        )
    return logits, targets


def top1_accuracy(logits, targets) -> float:
    """Fraction of samples whose highest-scoring class is the target.

    Args:
        logits: Scores, shape (N, C); ties go to the lowest class index.
        targets: Class indices, shape (N,).
    """
    logits, targets = _check_logits_targets(logits, targets)
    return float(np.mean(logits.argmax(axis=1) == targets))


def mean_per_class_accuracy(logits, targets, num_classes: int) -> float:
    """Top-1 accuracy of each class, averaged over the classes that occur in ``targets``.

    Classes without any sample have no accuracy and are left out of the mean (rather than
    counted as 0 or 1).

    Args:
        logits: Scores, shape (N, num_classes).
        targets: Class indices, shape (N,).
        num_classes: Number of classes C.
    """
    logits, targets = _check_logits_targets(logits, targets)
    if logits.shape[1] != num_classes:
        raise ValueError(f"logits have {logits.shape[1]} classes, num_classes={num_classes}")
    correct = (logits.argmax(axis=1) == targets).astype(np.float64)
    hits = np.bincount(targets, weights=correct, minlength=num_classes)
    counts = np.bincount(targets, minlength=num_classes)
    present = counts > 0
    return float(np.mean(hits[present] / counts[present]))


def _ap_11point(scores: np.ndarray, labels: np.ndarray) -> float:
    """11-point AP of one class; NaN if it has no positive."""
    keep = labels != -1
    scores, positive = scores[keep], labels[keep] == 1
    num_pos = int(positive.sum())
    if num_pos == 0:
        return float("nan")
    # Stable sort: tied scores keep input order, like the devkit's MATLAB sort.
    ranked = positive[np.argsort(-scores, kind="stable")]
    tp = np.cumsum(ranked)
    fp = np.cumsum(~ranked)
    recall = tp / num_pos
    precision = tp / (tp + fp)
    points = [
        precision[recall >= t].max() if (recall >= t).any() else 0.0
        for t in VOC07_RECALL_THRESHOLDS
    ]
    return float(np.mean(points))


def voc07_11point_ap(scores, labels) -> np.ndarray:
    """Per-class 11-point interpolated AP of the VOC2007 classification devkit.

    For each class, images are ranked by score; at each recall threshold t in {0, 0.1, ..., 1}
    take the highest precision reached at recall >= t (0 if none), and average the 11 values.
    Images labelled -1 (ignore) are removed before ranking, which is what the devkit's "neither
    TP nor FP" amounts to.

    Args:
        scores: Shape (N, C) (or (N,) for a single class), higher = more confident.
        labels: Same shape, values in {1, 0, -1}.

    Returns:
        Float64 array of shape (C,); NaN for a class without positive labels.
    """
    scores = _as_numpy(scores, "scores").astype(np.float64)
    labels = _as_numpy(labels, "labels")
    if scores.ndim == 1:
        scores, labels = scores[:, None], labels.reshape(-1, 1)
    if scores.ndim != 2 or labels.shape != scores.shape:
        raise ValueError(
            f"scores and labels must both be (N, C), got {scores.shape} and {labels.shape}"
        )
    bad = np.setdiff1d(np.unique(labels), [-1, 0, 1])
    if bad.size:
        raise ValueError(f"labels must be 1 (positive), 0 (negative) or -1 (ignore); got {bad}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    labels = labels.astype(np.int64)
    return np.array([_ap_11point(scores[:, c], labels[:, c]) for c in range(scores.shape[1])])


def voc07_map(scores, labels) -> float:
    """Mean over classes of :func:`voc07_11point_ap` (the VOC07 classification metric).

    Raises:
        ValueError: A class has no positive label, so its AP (and the mean) is undefined.
    """
    ap = voc07_11point_ap(scores, labels)
    undefined = np.flatnonzero(np.isnan(ap))
    if undefined.size:
        raise ValueError(
            f"classes {undefined.tolist()} have no positive label; their AP and the mAP are "
            "undefined (evaluate on a set that contains every class)"
        )
    return float(ap.mean())
