"""Per-modality reconstruction losses (negative log-likelihoods up to constants), one value per sample.

Each takes ``(prediction, target)`` with a leading batch axis and returns [B], so the objective
can weight, mask and average samples itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["chamfer_distance", "cross_entropy", "squared_error"]


def squared_error(prediction: Tensor, target: Tensor) -> Tensor:
    """Sum of squared errors per sample (Gaussian likelihood, unit variance): [B, ...] -> [B].

    For keypoints [B, 21, 3] this is the L2 loss of the hand-pose VAEs.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction: shape {tuple(prediction.shape)} differs from target shape {tuple(target.shape)}")
    return (prediction - target).pow(2).flatten(1).sum(1)


def chamfer_distance(prediction: Tensor, target: Tensor) -> Tensor:
    """Symmetric Chamfer distance between point sets: [B, P, 3] and [B, Q, 3] -> [B].

    The mean over each set of the squared distance to the nearest point of the other set,
    summed over both directions (the FoldingNet training loss).
    """
    if prediction.dim() != 3 or target.dim() != 3 or prediction.shape[0] != target.shape[0] or prediction.shape[2] != target.shape[2]:
        raise ValueError(f"prediction, target: expected [B, P, C] and [B, Q, C], got {tuple(prediction.shape)} and {tuple(target.shape)}")
    target = target.to(prediction.dtype)
    # The nearest neighbours are found without autograd, then only the matched pairs are differentiated:
    # the same value and gradient as differentiating the min over every pair (the min passes its
    # gradient to the arg-min alone), without the [B, P, Q] distance graph.
    with torch.no_grad():
        d = torch.cdist(prediction, target)  # [B, P, Q]
        to_target = d.min(dim=2).indices  # [B, P]
        to_prediction = d.min(dim=1).indices  # [B, Q]
    c = prediction.shape[2]
    nearest_target = target.gather(1, to_target.unsqueeze(-1).expand(-1, -1, c))
    nearest_prediction = prediction.gather(1, to_prediction.unsqueeze(-1).expand(-1, -1, c))
    return ((prediction - nearest_target).square().sum(-1).mean(dim=1)
            + (target - nearest_prediction).square().sum(-1).mean(dim=1))


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean per-pixel cross-entropy per sample: logits [B, C, *spatial], target int [B, *spatial] -> [B].

    Pixels labelled ``ignore_index`` are left out of their sample's mean.
    """
    if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
        raise ValueError(f"logits, target: expected [B, C, *spatial] and [B, *spatial], got {tuple(logits.shape)} and {tuple(target.shape)}")
    per_pixel = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none").flatten(1)
    valid = (target != ignore_index).flatten(1).to(per_pixel.dtype)
    return per_pixel.sum(1) / valid.sum(1).clamp_min(1.0)
