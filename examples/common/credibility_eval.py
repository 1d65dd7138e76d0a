"""Does a trained fusion trust a modality less when it is corrupted? Two measures of its weights:
gPoE's mean alpha per modality at every test-corruption level, and, for every fusion, how well its
own weight separates the corrupted from the clean samples of the held-out credibility set."""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn
from torch.utils.data import Dataset

import gpoe_fusion as gf
from gpoe_fusion.diagnostics import credibility_report

from .corruption import credibility_set, test_corruption
from .data import eval_loader
from .model import CrossModalVAE

__all__ = ["alpha_by_corruption", "held_out_credibility"]


@torch.no_grad()
def alpha_by_corruption(model: nn.Module, dataset: Dataset, args: argparse.Namespace,
                        device: torch.device) -> dict[str, dict[str, float]] | None:
    """gPoE's mean alpha per modality when the test RGB is corrupted at each --test-corruption level
    (None without gPoE). Returns {level: {modality: mean alpha}}: does the model trust RGB less as
    it gets noisier?
    """
    if not isinstance(model.objective.fusion, gf.GPoE):
        return None
    model.eval()
    out = {}
    for level in args.test_corruption:
        sums = torch.zeros(len(model.modalities), dtype=torch.float64)
        count = 0
        for batch in eval_loader(test_corruption(dataset, level, args.seed), args):
            alpha = model.credibility({k: v.to(device) for k, v in batch.items()}).alpha
            sums += alpha.double().mean(-1).sum(1).cpu()
            count += alpha.shape[1]
        out[str(level)] = {name: float(s / count) for name, s in zip(model.modalities, sums)}
    return out


def _finite(value: float) -> float | None:
    """JSON has no NaN: None stands for a measure without samples."""
    return None if isinstance(value, float) and math.isnan(value) else value


@torch.no_grad()
def held_out_credibility(model: CrossModalVAE, dataset: Dataset, args: argparse.Namespace,
                         device: torch.device) -> tuple[dict[str, dict], dict[str, dict[str, list]]]:
    """The fusion's weights on the credibility sets built from the evaluation ``dataset``
    (``corruption.credibility_set``: per modality, a seeded half of the samples with that modality
    corrupted at the training strength, the other modalities clean).

    Returns (report, samples). report: modality -> ``diagnostics.credibility_report``'s measures on
    its set (``auroc`` of the fusion's own weight, ``auroc_alpha``, ``auroc_share``, ``weight_clean``,
    ``weight_corrupted``, ``alpha_clean``, ``alpha_corrupted``, ``effective_experts``, ``samples``)
    and the corruption used (``pixel_corruption`` or ``point_noise``); None where a group is
    empty. samples: modality -> {"weight": each sample's weight (mean over D), "corrupted": its
    flag}, for the figure of the two distributions.
    """
    model.eval()
    report, samples = {}, {}
    for name, (held_out, corruption) in credibility_set(dataset, args).items():
        parts: dict[str, list[torch.Tensor]] = {"weights": [], "alpha": [], "logvar": []}
        flags = []
        for batch in eval_loader(held_out, args):
            flags.append(batch[f"corrupted_{name}"])
            out = model.credibility({m: batch[m].to(device) for m in model.modalities})
            for key in parts:
                parts[key].append(getattr(out, key).float().cpu())
        weights, alpha, logvar = (torch.cat(parts[key], dim=1) for key in ("weights", "alpha", "logvar"))
        flag = torch.cat(flags)
        measures = credibility_report(alpha, logvar, {name: flag}, model.modalities, weights=weights)[name]
        report[name] = {**{k: _finite(v) for k, v in measures.items()}, **corruption}
        per_sample = weights.double().mean(-1)[model.modalities.index(name)]  # [B]
        samples[name] = {"weight": [round(w, 5) for w in per_sample.tolist()], "corrupted": flag.bool().tolist()}
    return report, samples
