"""What both pipelines measure of a trained fusion besides their own metrics: does it trust a modality
less when that modality is corrupted? gPoE's mean alpha per modality at every test-corruption level,
and how well every fusion's own weight separates the corrupted from the clean samples of the held-out
credibility sets (``data.credibility_set``; the flags only measure, nothing in training sees them)."""

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
    """The metric groups of the fusion's weights on the evaluation ``dataset``:

    - ``alpha``: gPoE's mean alpha per modality with the test RGB corrupted at each --test-corruption
      level, ``{level: {modality: mean alpha}}`` (None for the other fusions);
    - ``credibility``: per corrupted modality, ``diagnostics.credibility_report``'s measures on its set
      (``auroc`` of the fusion's own weight, ``auroc_alpha``, ``auroc_share``, ``weight_clean``,
      ``weight_corrupted``, ``alpha_clean``, ``alpha_corrupted``, ``effective_experts``, ``samples``; None
      where a group is empty) and the corruption used (``pixel_corruption`` or ``point_noise``);
    - ``credibility_samples``: per corrupted modality, each sample's weight (mean over D) and flag, for
      the figure of the two distributions.
    """
    model.eval()

    def weights(data: Dataset, flag: str | None = None) -> dict[str, torch.Tensor]:
        """``CrossModalVAE.credibility``'s weights, alpha and logvar [M, N, D] over ``data`` (and its ``flag`` [N])."""
        parts = []
        for batch in eval_loader(data, args):
            measured = model.credibility({m: batch[m].to(device) for m in model.modalities})
            parts.append({**measured._asdict(), **({flag: batch[flag]} if flag else {})})
        return {key: torch.cat([p[key].float().cpu() for p in parts], dim=0 if key == flag else 1) for key in parts[0]}

    alpha = None
    if isinstance(model.objective.fusion, gf.GPoE):
        alpha = {}
        for level in args.test_corruption:
            mean = weights(test_corruption(dataset, level, args.seed))["alpha"].double().mean((1, 2))
            alpha[str(level)] = dict(zip(model.modalities, mean.tolist()))
    report, samples = {}, {}
    for name, (held_out, corruption) in credibility_set(dataset, args).items():
        measured = weights(held_out, f"corrupted_{name}")
        flag = measured[f"corrupted_{name}"].bool()
        measures = credibility_report(measured["alpha"], measured["logvar"], {name: flag}, model.modalities,
                                      weights=measured["weights"])[name]
        report[name] = {**{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in measures.items()},
                        **corruption}
        per_sample = measured["weights"].double().mean(-1)[model.modalities.index(name)]
        samples[name] = {"weight": [round(w, 5) for w in per_sample.tolist()], "corrupted": flag.tolist()}
    return {"alpha": alpha, "credibility": report, "credibility_samples": samples}
