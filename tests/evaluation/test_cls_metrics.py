"""Classification metrics against hand-computed values and an independent 11-point AP reference."""

import bissl_det  # noqa: F401  (shims before detectron2)
from bissl_det.evaluation import (
    mean_per_class_accuracy,
    top1_accuracy,
    voc07_11point_ap,
    voc07_map,
)

import numpy as np
import pytest
import torch


def _one_hot_logits(pred: list[int], num_classes: int) -> np.ndarray:
    logits = np.zeros((len(pred), num_classes))
    logits[np.arange(len(pred)), pred] = 1.0
    return logits


def test_top1_and_mean_per_class_differ_on_imbalanced_set():
    # 8 samples of class 0, 2 of class 1; the model always predicts 0.
    targets = np.array([0] * 8 + [1] * 2)
    logits = _one_hot_logits([0] * 10, 2)
    assert top1_accuracy(logits, targets) == pytest.approx(0.8)  # 8 / 10
    # class 0: 8/8 = 1, class 1: 0/2 = 0 -> (1 + 0) / 2
    assert mean_per_class_accuracy(logits, targets, 2) == pytest.approx(0.5)


def test_top1_equals_mean_per_class_on_balanced_even_errors():
    # 4 samples per class, exactly one error in each class.
    targets = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    pred = [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 0]
    logits = _one_hot_logits(pred, 3)
    assert top1_accuracy(logits, targets) == pytest.approx(9 / 12)
    assert mean_per_class_accuracy(logits, targets, 3) == pytest.approx(3 / 4)


def test_mean_per_class_skips_absent_classes_and_takes_torch():
    # Class 2 never occurs: mean over classes 0 (1/2) and 1 (2/2) only.
    targets = torch.tensor([0, 0, 1, 1])
    logits = torch.tensor(_one_hot_logits([0, 1, 1, 1], 3))
    assert mean_per_class_accuracy(logits, targets, 3) == pytest.approx(0.75)
    assert top1_accuracy(logits, targets) == pytest.approx(0.75)


def test_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="targets must lie in"):
        top1_accuracy(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match=r"logits \(N, C\)"):
        top1_accuracy(np.zeros((2, 3)), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="num_classes"):
        mean_per_class_accuracy(np.zeros((2, 3)), np.array([0, 1]), 4)


def test_11point_ap_hand_computed():
    # Class 0, in score order (the input is shuffled below):
    #   score 0.9 0.8 0.7 0.6 0.5 0.4
    #   label  1   0   1  -1   0   1      3 positives, the -1 is ignored
    # after dropping the ignored image:  tp 1 1 2 2 3,  fp 0 1 1 2 2
    #   recall    1/3 1/3 2/3 2/3 1
    #   precision 1   1/2 2/3 1/2 3/5
    # t = 0, .1, .2, .3  -> max precision at recall >= t = 1      (4 points)
    # t = .4, .5, .6     -> max(2/3, 1/2, 3/5) = 2/3              (3 points)
    # t = .7, .8, .9, 1  -> 3/5                                   (4 points)
    # AP = (4 * 1 + 3 * 2/3 + 4 * 3/5) / 11 = 8.4 / 11
    # Class 1 ranks both positives first: AP = 1.
    scores0 = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    labels0 = np.array([1, 0, 1, -1, 0, 1])
    scores1 = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 0.8])
    labels1 = np.array([0, 0, 0, -1, 1, 1])
    perm = np.array([3, 0, 5, 1, 4, 2])
    scores = np.stack([scores0, scores1], axis=1)[perm]
    labels = np.stack([labels0, labels1], axis=1)[perm]
    ap = voc07_11point_ap(scores, labels)
    np.testing.assert_allclose(ap, [8.4 / 11, 1.0], rtol=0, atol=1e-12)
    assert voc07_map(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(
        (8.4 / 11 + 1) / 2
    )


def test_11point_ap_ignore_is_not_a_negative():
    # An ignored image ranked first must not cost precision; as a negative it would.
    scores = np.array([0.9, 0.8, 0.1])
    assert voc07_11point_ap(scores, np.array([-1, 1, 0]))[0] == pytest.approx(1.0)
    # As a negative: precision 1/2 at recall 1 at every threshold.
    assert voc07_11point_ap(scores, np.array([0, 1, 0]))[0] == pytest.approx(0.5)


def _reference_11point_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """Plain-loop precision/recall fed to detectron2's own VOC07 11-point ``voc_ap``."""
    from detectron2.evaluation.pascal_voc_evaluation import voc_ap

    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    tp = fp = 0
    rec, prec = [], []
    npos = sum(1 for v in labels if v == 1)
    for i in order:
        if labels[i] == 1:
            tp += 1
        elif labels[i] == 0:
            fp += 1
        else:
            continue
        rec.append(tp / npos)
        prec.append(tp / (tp + fp))
    return voc_ap(np.array(rec), np.array(prec), use_07_metric=True)


@pytest.mark.parametrize("seed", range(5))
def test_11point_ap_matches_detectron2_voc_ap(seed):
    rng = np.random.default_rng(seed)
    n, c = 40, 4
    labels = rng.choice([1, 0, 0, -1], size=(n, c))
    labels[0] = 1  # every class has a positive
    # Positives score higher on average, so APs spread over (0, 1); distinct scores (no ties).
    scores = rng.permutation(n * c).reshape(n, c) / (n * c) + 0.3 * (labels == 1)
    ap = voc07_11point_ap(scores, labels)
    expected = [_reference_11point_ap(scores[:, k], labels[:, k]) for k in range(c)]
    np.testing.assert_allclose(ap, expected, rtol=0, atol=1e-12)


def test_11point_ap_no_positive_is_nan_and_map_raises():
    ap = voc07_11point_ap(np.array([[0.5, 0.1], [0.2, 0.3]]), np.array([[1, 0], [0, -1]]))
    assert ap[0] == pytest.approx(1.0) and np.isnan(ap[1])
    with pytest.raises(ValueError, match=r"classes \[1\] have no positive"):
        voc07_map(np.array([[0.5, 0.1], [0.2, 0.3]]), np.array([[1, 0], [0, -1]]))


def test_11point_ap_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels must be 1"):
        voc07_11point_ap(np.array([0.1, 0.2]), np.array([1, 2]))
    with pytest.raises(ValueError, match="both be"):
        voc07_11point_ap(np.zeros((3, 2)), np.zeros((3, 3)))
