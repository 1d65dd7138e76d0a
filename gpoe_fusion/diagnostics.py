"""Does the credibility track the noise? Measures for alpha, or any fusion's weights, against
per-sample corruption flags.

The flags only measure: nothing here feeds back into training. Shapes: alpha, logvar, weights
[M, B, D] (as the layers return them with ``return_weights=True``); mask bool [M, B] or None; corrupted
bool [B] (True = that sample's modality was corrupted).

    report = credibility_report(alpha, logvar, {"rgb": corrupted_rgb}, modalities=["rgb", "depth"])
    report["rgb"]["auroc_alpha"]     # 1.0: every corrupted sample trusts RGB less than every clean one
    # Another fusion's own weights (PoE's precision shares, MoE's mixture weights), alpha uniform:
    credibility_report(uniform, logvar, {"rgb": corrupted_rgb}, ["rgb", "depth"], weights=shares)["rgb"]["auroc"]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["auroc", "credibility_report", "effective_experts", "precision_share"]


def auroc(scores: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve of ``scores`` [B] for the labels ``positive`` bool [B]: the probability
    that a random positive scores above a random negative, ties counting one half (the Mann-Whitney
    U statistic over the two groups' sizes). NaN when either group is empty."""
    scores = scores.detach().double().flatten()
    positive = positive.flatten().bool().to(scores.device)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Average ranks (ties share the mean of their ranks), 1-based.
    order = torch.argsort(scores)
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=scores.dtype, device=scores.device)
    values, inverse = torch.unique(scores, return_inverse=True)
    tie_sum = scores.new_zeros(values.numel()).index_add_(0, inverse, ranks)
    tie_count = scores.new_zeros(values.numel()).index_add_(0, inverse, torch.ones_like(ranks))
    ranks = (tie_sum / tie_count)[inverse]
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def precision_share(alpha: Tensor, logvar: Tensor, mask: Tensor | None = None) -> Tensor:
    """Each expert's share of the joint precision, alpha_i exp(-logvar_i) / sum_j alpha_j exp(-logvar_j)
    over the present experts: the weight its mean gets in the joint mean (PoE's implicit weight when
    alpha is uniform). Computed in log space, so exact at any logvar. [M, B, D], 0 where masked."""
    log_alpha = torch.log(alpha.double())
    s = log_alpha - logvar.double()
    if mask is not None:
        s = s.masked_fill(~mask.unsqueeze(-1), float("-inf"))
    share = torch.softmax(s, dim=0)
    return share.nan_to_num(0.0).to(alpha.dtype)


def effective_experts(weights: Tensor) -> Tensor:
    """The effective number of experts behind each (sample, dimension), 1 / sum_i w_i^2 (inverse
    Simpson index) of weights [M, B, D] summing to 1 over the experts: M for uniform weights, 1 when
    one expert takes all. Returns [B, D]."""
    return 1.0 / (weights.double() ** 2).sum(0)


def credibility_report(alpha: Tensor, logvar: Tensor, corrupted: Mapping[str, Tensor],
                       modalities: Sequence[str], mask: Tensor | None = None,
                       weights: Tensor | None = None) -> dict[str, dict[str, float]]:
    """Per corrupted modality: how well its weight separates corrupted from clean samples.

    corrupted: modality name -> bool [B] flags. weights: the fusion's own weight of each expert
    [M, B, D] summing to 1 over the experts (a layer's ``return_weights`` output: PoE's precision
    shares, MoE's mixture weights), default ``alpha``. For each corrupted modality, over the samples
    where it is present: ``auroc``, the AUROC of "the weight (averaged over D) is lower on corrupted
    samples"; ``auroc_alpha``, the same for alpha; ``auroc_share``, the same for the precision share
    (what a product of the same experts weighted by alpha gives each mean); the mean weight and
    the mean alpha on clean and on corrupted samples; and ``effective_experts``, the mean effective
    number of experts under the weights. 0.5 means the weight ignores the corruption.
    """
    weights = alpha if weights is None else weights
    for name, other in (("alpha", alpha), ("weights", weights)):
        if other.shape != logvar.shape:
            raise ValueError(f"{name}: shape {tuple(other.shape)} differs from logvar shape {tuple(logvar.shape)}")
    if len(modalities) != alpha.shape[0]:
        raise ValueError(f"modalities: expected {alpha.shape[0]} names, got {list(modalities)}")
    share = precision_share(alpha, logvar, mask)
    weight_per_sample = weights.double().mean(-1)  # [M, B]
    alpha_per_sample = alpha.double().mean(-1)
    share_per_sample = share.double().mean(-1)
    effective = effective_experts(weights).mean(-1)  # [B]
    report = {}
    for name, flags in corrupted.items():
        if name not in modalities:
            raise ValueError(f"corrupted: {name!r} is not one of the modalities {list(modalities)}")
        i = list(modalities).index(name)
        flags = flags.flatten().bool().to(alpha.device)
        if flags.numel() != alpha.shape[1]:
            raise ValueError(f"corrupted[{name!r}]: expected {alpha.shape[1]} flags, got {flags.numel()}")
        keep = torch.ones_like(flags) if mask is None else mask[i].to(alpha.device)
        w, a, s, f = weight_per_sample[i][keep], alpha_per_sample[i][keep], share_per_sample[i][keep], flags[keep]
        report[name] = {
            # Lower weight on corrupted samples = a corrupted sample scores higher under -weight.
            "auroc": auroc(-w, f),
            "auroc_alpha": auroc(-a, f),
            "auroc_share": auroc(-s, f),
            "weight_clean": _mean(w[~f]),
            "weight_corrupted": _mean(w[f]),
            "alpha_clean": _mean(a[~f]),
            "alpha_corrupted": _mean(a[f]),
            "effective_experts": float(effective[keep].mean()),
            "samples": int(keep.sum()),
        }
    return report


def _mean(values: Tensor) -> float:
    """The mean of ``values``, NaN when there are none."""
    return float(values.mean()) if values.numel() else float("nan")
