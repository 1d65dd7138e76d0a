"""IoU / F1 / pixel accuracy: hand-computed cases and torchmetrics as the independent reference."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassJaccardIndex

from sim2real.metrics import SegmentationEvaluator, confusion_matrix, scores_from_confusion

# target:  0 0 1 1 2 | ignored
# pred:    0 1 1 1 0 | 2
TARGET = torch.tensor([[0, 0, 1, 1, 2, 255]])
PRED = torch.tensor([[0, 1, 1, 1, 0, 2]])


def test_hand_computed_case():
    confusion = confusion_matrix(PRED, TARGET, num_classes=3)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    scores = scores_from_confusion(confusion)
    # TP = (1, 2, 0), FP = (1, 1, 0), FN = (1, 0, 1)
    assert scores["iou_per_class"] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert scores["f1_per_class"] == pytest.approx([2 / 4, 4 / 5, 0.0])
    assert scores["iou"] == pytest.approx((1 / 3 + 2 / 3 + 0.0) / 3)
    assert scores["f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(3 / 5)
    assert scores["support"] == [2, 2, 1] and scores["pixels"] == 5


def test_absent_class_is_nan_and_excluded_from_the_mean():
    scores = scores_from_confusion(confusion_matrix(PRED, TARGET, num_classes=5))
    assert math.isnan(scores["iou_per_class"][3]) and math.isnan(scores["f1_per_class"][4])
    assert scores["iou"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(1.3 / 3)
    # A class only predicted (never in the target) counts, with score 0.
    only_predicted = scores_from_confusion(confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 0]), 5))
    assert only_predicted["iou_per_class"][:1] + only_predicted["iou_per_class"][3:4] == [0.5, 0.0]
    assert only_predicted["iou"] == pytest.approx(0.25)


def test_perfect_prediction():
    target = torch.randint(0, 5, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    scores = scores_from_confusion(confusion_matrix(target, target, 5))
    assert scores["iou"] == scores["f1"] == scores["pixel_accuracy"] == 1.0


def test_evaluator_accumulates_logits_and_labels():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 5, 6, 7, generator=generator)
    target = torch.randint(0, 5, (4, 6, 7), generator=generator)
    target[0, :2] = 255
    from_logits = SegmentationEvaluator(num_classes=5)
    from_labels = SegmentationEvaluator(num_classes=5)
    for i in range(4):  # batch by batch
        from_logits.update(logits[i : i + 1], target[i : i + 1])
    from_labels.update(logits.argmax(dim=1), target)  # all at once
    assert torch.equal(from_logits.confusion, from_labels.confusion)
    assert from_logits.confusion.sum() == 4 * 6 * 7 - 2 * 7
    assert from_logits.compute() == from_labels.compute()
    from_logits.reset()
    with pytest.raises(ValueError, match="no pixels"):
        from_logits.compute()


@pytest.mark.parametrize("seed", range(6))
def test_matches_torchmetrics(seed):
    generator = torch.Generator().manual_seed(seed)
    num_classes = 5
    evaluator = SegmentationEvaluator(num_classes, ignore_index=255)
    kwargs = {"num_classes": num_classes, "ignore_index": 255}
    reference = {
        "iou": MulticlassJaccardIndex(average="macro", **kwargs),
        "f1": MulticlassF1Score(average="macro", **kwargs),
        "iou_per_class": MulticlassJaccardIndex(average="none", **kwargs),
        "f1_per_class": MulticlassF1Score(average="none", **kwargs),
        "pixel_accuracy": MulticlassAccuracy(average="micro", **kwargs),
    }
    # Skewed, partly wrong predictions; with an odd seed, class 4 never occurs in either tensor.
    classes = num_classes - seed % 2
    for _ in range(3):
        target = torch.randint(0, classes, (2, 16, 16), generator=generator)
        noise = torch.randint(0, classes, target.shape, generator=generator)
        pred = torch.where(torch.rand(target.shape, generator=generator) < 0.6, target, noise)
        target[torch.rand(target.shape, generator=generator) < 0.1] = 255
        logits = torch.nn.functional.one_hot(pred, num_classes).permute(0, 3, 1, 2).float()
        evaluator.update(logits, target)
        for metric in reference.values():
            metric.update(pred, target)
    ours = evaluator.compute()
    for key, metric in reference.items():
        expected = metric.compute()
        if key.endswith("per_class"):
            # torchmetrics reports 0 for an absent class where we report NaN.
            got = torch.tensor(ours[key], dtype=torch.float64).nan_to_num(0.0)
            torch.testing.assert_close(got, expected.double(), rtol=1e-6, atol=1e-6)
        else:
            assert ours[key] == pytest.approx(expected.item(), rel=1e-6), key
    assert math.isnan(ours["iou_per_class"][4]) == (seed % 2 == 1)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="target contains label 7"):
        confusion_matrix(torch.tensor([0]), torch.tensor([7]), 5)
    with pytest.raises(ValueError, match="pred contains label -1"):
        confusion_matrix(torch.tensor([-1]), torch.tensor([0]), 5)
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long), 5)
    with pytest.raises(TypeError, match="integer"):
        confusion_matrix(torch.zeros(2), torch.zeros(2, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="ignore_index"):
        SegmentationEvaluator(5, ignore_index=2)
    with pytest.raises(ValueError, match=r"logits must be \[B, 5"):
        SegmentationEvaluator(5).update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
