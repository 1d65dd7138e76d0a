"""Segmentation metrics from one confusion matrix accumulated over every evaluated pixel of the test set: IoU, F1 (macro
over the classes present, torchmetrics' ``average="macro"``) and pixel accuracy (docs/surgical.md, "The metrics and
their averaging"). Pixels whose target is ``ignore_index`` are dropped."""

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int | None = 255) -> torch.Tensor:
    """Counts int64 [C, C]: (t, p) counts the pixels of target class t predicted as p; pred, target: integer tensors of
    one shape. Target pixels equal to ``ignore_index`` are skipped, other labels outside 0..C-1 an error."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {list(pred.shape)} and {list(target.shape)}")
    if pred.dtype.is_floating_point or target.dtype.is_floating_point:
        raise TypeError(f"pred and target must be integer labels, got {pred.dtype} and {target.dtype}")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = None if ignore_index is None else target != ignore_index
    for name, labels in (("target", target), ("pred", pred)):
        kept = labels if keep is None else labels.where(keep, 0)  # an ignored pixel's labels count for nothing
        low, high = torch.aminmax(kept) if kept.numel() else (0, 0)
        if low < 0 or high >= num_classes:
            bad = kept[(kept < 0) | (kept >= num_classes)][0].item()
            allowed = f"0..{num_classes - 1}" + (f" or ignore_index {ignore_index}" if name == "target" else "")
            raise ValueError(f"{name} contains label {bad}; expected {allowed}")
    # Ignored pixels go to an extra bin, then are dropped: copying out the kept pixels took most of the scoring time.
    cells = num_classes * num_classes
    index = target * num_classes + pred if keep is None else torch.where(keep, target * num_classes + pred, cells)
    return torch.bincount(index, minlength=cells + 1)[:cells].reshape(num_classes, num_classes)


def scores_from_confusion(confusion: torch.Tensor) -> dict:
    """Scores of ``confusion`` [C, C] (rows: target): ``iou``, ``f1`` (macro over classes present), ``pixel_accuracy``,
    ``iou_per_class``, ``f1_per_class`` (C floats, NaN if absent), ``support``, ``pixels``; ValueError if all 0."""
    confusion = confusion.detach().to("cpu", torch.float64)
    if (total := confusion.sum()) == 0:
        raise ValueError("no pixels were evaluated (empty confusion matrix, or every target pixel ignored)")
    tp = confusion.diagonal()
    fp, fn = confusion.sum(dim=0) - tp, confusion.sum(dim=1) - tp
    present = (tp + fp + fn) > 0
    iou, f1 = tp / (tp + fp + fn), 2 * tp / (2 * tp + fp + fn)  # NaN (0 / 0) for a class absent from both
    return {"iou": iou[present].mean().item(), "f1": f1[present].mean().item(),
            "pixel_accuracy": (tp.sum() / total).item(), "iou_per_class": iou.tolist(), "f1_per_class": f1.tolist(),
            "support": [int(n) for n in confusion.sum(dim=1).tolist()], "pixels": int(total.item())}


class SegmentationEvaluator:
    """Accumulates a confusion matrix over batches; ``compute()`` gives IoU/F1/accuracy (module docs). ``confusion``,
    int64 [C, C] on the device of the first batch, can be ``torch.distributed.all_reduce``-d across ranks first."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        if not (isinstance(num_classes, int) and num_classes >= 2):
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index must not be a class id (0..{num_classes - 1}), got {ignore_index}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch. pred: per-class logits (or probabilities) float [B, C, H, W], reduced by argmax over dim 1, or
        labels, integer [B, H, W]; target: integer [B, H, W] class ids or ``ignore_index``."""
        if pred.dtype.is_floating_point:
            if pred.dim() != target.dim() + 1 or pred.shape[1] != self.num_classes:
                raise ValueError(f"logits must be [B, {self.num_classes}, ...] matching target {list(target.shape)}, "
                                 f"got {list(pred.shape)}")
            pred = pred.argmax(dim=1)
        batch = confusion_matrix(pred, target.to(pred.device), self.num_classes, self.ignore_index)
        self.confusion = self.confusion.to(batch.device) + batch

    def compute(self) -> dict:
        """The scores of everything accumulated (see :func:`scores_from_confusion`)."""
        return scores_from_confusion(self.confusion)
