"""What both pipelines measure of a trained fusion besides their own metrics: does it trust a modality less when that
modality is corrupted? (The flags only measure; nothing in training sees them.)"""

from __future__ import annotations

import argparse
import math

import torch
from torch.utils.data import Dataset

import gpoe_fusion as gf
from gpoe_fusion.diagnostics import credibility_report

from .data import credibility_set, eval_loader, test_corruption
from .networks import CrossModalVAE


@torch.no_grad()
def fusion_weights(model: CrossModalVAE, dataset: Dataset, args: argparse.Namespace, device: torch.device) -> dict:
    """The metric groups of the fusion's weights on the evaluation ``dataset``: ``alpha``, gPoE's mean alpha per
    modality at each --test-corruption level of the RGB (``{level: {modality: mean}}``; None for the other fusions);
    ``credibility``, per modality of ``data.credibility_set``, ``diagnostics.credibility_report``'s measures (``auroc``
    of the fusion's own weight, ``auroc_alpha``, ``auroc_share``, ``weight_clean``, ``weight_corrupted``,
    ``alpha_clean``, ``alpha_corrupted``, ``effective_experts``, ``samples``; None where a group is empty) and the
    corruption; ``credibility_samples``, each sample's weight (mean over D) and flag."""
    model.eval()

    def measure(data: Dataset, flag: str | None = None) -> dict[str, torch.Tensor]:
        """Over ``data``: the fusion's own weights, gPoE's alpha (uniform for the other fusions: a product of experts is
        gPoE with uniform alpha) and the experts' logvar, [M, N, D] each (and the item's ``flag`` [N])."""
        parts = []
        for batch in eval_loader(data, args):
            posteriors, features = model.encode({m: batch[m].to(device) for m in model.modalities})
            weights = model.objective.fusion_weights(posteriors, features=features)
            logvar = torch.stack([lv for _, lv in posteriors.values()])
            alpha = weights if isinstance(model.objective.fusion, gf.GPoE) else torch.full_like(logvar, 1 / len(logvar))
            parts.append({"weights": weights, "alpha": alpha, "logvar": logvar,
                          **({flag: batch[flag]} if flag else {})})
        return {key: torch.cat([p[key].float().cpu() for p in parts], dim=0 if key == flag else 1) for key in parts[0]}

    alpha = None
    if isinstance(model.objective.fusion, gf.GPoE):
        alpha = {}
        for level in args.test_corruption:
            mean = measure(test_corruption(dataset, level, args.seed))["alpha"].double().mean((1, 2))
            alpha[str(level)] = dict(zip(model.modalities, mean.tolist()))
    report, samples = {}, {}
    for name, (held_out, corruption) in credibility_set(dataset, args).items():
        measured = measure(held_out, f"corrupted_{name}")
        flag = measured[f"corrupted_{name}"].bool()
        measures = credibility_report(measured["alpha"], measured["logvar"], {name: flag}, model.modalities,
                                      weights=measured["weights"])[name]
        report[name] = {**{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in measures.items()},
                        **corruption}
        per_sample = measured["weights"].double().mean(-1)[model.modalities.index(name)]
        samples[name] = {"weight": [round(w, 5) for w in per_sample.tolist()], "corrupted": flag.tolist()}
    return {"alpha": alpha, "credibility": report, "credibility_samples": samples}
