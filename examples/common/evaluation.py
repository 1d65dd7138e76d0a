"""What both pipelines measure of a trained model: the task's scores of its predictions under test corruption
(``predictions``) and whether the fusion trusts a corrupted modality less (``credibility``)."""

import argparse
import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Protocol

import torch
from torch import Tensor
from torch.utils.data import Dataset

import gpoe_fusion as gf
from gpoe_fusion.diagnostics import credibility_report

from .data import credibility_set, eval_loader, test_corruption
from .networks import CrossModalVAE

# A run's metric groups: name -> (what is decoded, the modality corrupted at its test levels, the other clean).
# "metrics": the paper's protocol (4.4); "oracle": "joint" without the flagged modality, a bound (no fusion sees flags).
PREDICTIONS = {"metrics": ("rgb", "rgb"), "metrics_joint": ("joint", "rgb"), "metrics_oracle": ("oracle", "rgb"),
               "metrics_aux": ("points", "points"), "metrics_joint_aux_corrupted": ("joint", "points"),
               "metrics_oracle_aux_corrupted": ("oracle", "points")}
UNSEEN = "_unseen"  # the suffix of a metric group of the views of scenes never seen in training (--unseen-scenes)


def base_group(group: str) -> str:
    """The PREDICTIONS group that ``group`` (maybe of the unseen scenes) measures."""
    return group.removesuffix(UNSEEN)


class Score(Protocol):
    """A pipeline's metric accumulated over the batches: ``update(prediction, batch)`` each, then ``compute()``."""

    def update(self, prediction: Tensor, batch: Mapping[str, Tensor]) -> None: ...

    def compute(self) -> dict: ...


def modality_levels(args: argparse.Namespace) -> dict[str, list[float]]:
    """Each modality's test levels: the RGB's --test-corruption; the points' --test-point-noise (desync: the RGB's)."""
    points = args.test_corruption if args.corruption_kind == "desync" else args.test_point_noise
    return {"rgb": list(args.test_corruption), "points": list(points)}


def group_levels(args: argparse.Namespace) -> dict[str, list[float]]:
    """Each metric group's test levels, those of its corrupted modality (``modality_levels``)."""
    levels = modality_levels(args)
    return {group: levels[corrupted] for group, (_, corrupted) in PREDICTIONS.items()}


@torch.no_grad()
def predictions(model: CrossModalVAE, dataset: Dataset, args: argparse.Namespace, device: torch.device, decoded: str,
                score: Callable[[], Score]) -> dict:
    """The metric groups of PREDICTIONS on ``dataset``, ``{group: {str(level): score().compute()}}``, at the levels of
    ``modality_levels``, and ``alpha``, gPoE's mean alpha per --test-corruption level (``{level: {modality: mean}}``;
    None for the other fusions). A clean pass, then one per level encoding only the corrupted modality."""
    model.eval()
    fusion, decoder, names = model.objective.fusion, model.objective.decoders[decoded], model.modalities
    levels = group_levels(args)
    passes = [(None, 0.0)] + [(m, level) for m, at in modality_levels(args).items()
                              for level in dict.fromkeys(at) if level > 0]
    scores: dict[tuple[str, float], Score] = defaultdict(score)
    alpha_sums: dict[float, Tensor] = {}
    clean: list[dict[str, tuple[Tensor, Tensor, Tensor]]] = []  # per batch: modality -> (mu, logvar, features)
    for corrupted, level in passes:
        groups = [g for g, (_, m) in PREDICTIONS.items() if corrupted in (None, m) and level in levels[g]]
        measure_alpha = isinstance(fusion, gf.GPoE) and corrupted in (None, "rgb") and level in args.test_corruption
        data = test_corruption(dataset, level, args.seed, corrupted, args.corruption_kind) if corrupted else dataset
        for i, batch in enumerate(eval_loader(data, args)):
            fresh = {m: model.encoders[m](batch[m].to(device)) for m in (names if corrupted is None else [corrupted])}
            if corrupted is None:
                clean.append(fresh)
            encoded = {**clean[i], **fresh}
            mu, logvar = (torch.stack([encoded[m][part] for m in names]) for part in (0, 1))
            features = [encoded[m][2] for m in names]
            joint, weights = fusion(mu, logvar, None, features, return_weights=True)
            if measure_alpha:
                alpha_sums[level] = alpha_sums.get(level, 0) + weights.double().sum((1, 2)).cpu()
            flags = torch.stack([batch.get(f"corrupted_{m}", torch.zeros(len(mu[0]), dtype=torch.bool))
                                 for m in names]).to(device)
            decoded_once: dict[str, Tensor] = {}  # the clean pass scores the joint for both corrupted modalities
            for group in groups:
                what = PREDICTIONS[group][0]
                if what not in decoded_once:
                    if what == "oracle":
                        z = fusion(mu, logvar, ~flags, features).mean
                    else:
                        z = joint.mean if what == "joint" else encoded[what][0]
                    decoded_once[what] = decoder(z)
                scores[group, level].update(decoded_once[what], batch)
    result = {group: {str(level): scores[group, level].compute() for level in at} for group, at in levels.items()}
    count = len(dataset) * clean[0][names[0]][0].shape[-1]  # alpha's entries at a level: samples x latent dims
    result["alpha"] = None if not alpha_sums else {
        str(level): dict(zip(names, (alpha_sums[level] / count).tolist())) for level in args.test_corruption}
    return result


@torch.no_grad()
def rgb_metrics(predict: Callable[[Tensor], Tensor], dataset: Dataset, args: argparse.Namespace,
                score: Callable[[], Score]) -> dict:
    """``predictions``' ``metrics`` group of any ``predict(rgb) -> prediction`` (e.g. an exported model's)."""
    result = {}
    for level in args.test_corruption:
        data = dataset if level == 0 else test_corruption(dataset, level, args.seed, "rgb", args.corruption_kind)
        scores = score()
        for batch in eval_loader(data, args):
            scores.update(predict(batch["rgb"]), batch)
        result[str(level)] = scores.compute()
    return result


@torch.no_grad()
def credibility(model: CrossModalVAE, dataset: Dataset, args: argparse.Namespace, device: torch.device) -> dict:
    """``credibility``: per modality of ``data.credibility_set``, ``diagnostics.credibility_report``'s measures (None
    where a group is empty) and the corruption; ``credibility_samples``: each sample's weight (mean over D) and flag."""
    model.eval()

    def measure(data: Dataset, flag: str) -> dict[str, torch.Tensor]:
        """Fusion weights, alpha (uniform but in gPoE: PoE is gPoE with uniform alpha), logvar: [M, N, D]; flag [N]."""
        parts = []
        for batch in eval_loader(data, args):
            posteriors, features = model.encode({m: batch[m].to(device) for m in model.modalities})
            weights = model.objective.fusion_weights(posteriors, features=features)
            logvar = torch.stack([lv for _, lv in posteriors.values()])
            alpha = weights if isinstance(model.objective.fusion, gf.GPoE) else torch.full_like(logvar, 1 / len(logvar))
            parts.append({"weights": weights, "alpha": alpha, "logvar": logvar, flag: batch[flag]})
        return {key: torch.cat([p[key].float().cpu() for p in parts], dim=0 if key == flag else 1) for key in parts[0]}

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
    return {"credibility": report, "credibility_samples": samples}


def evaluate(model: CrossModalVAE, dataset: Dataset, args: argparse.Namespace, device: torch.device, decoded: str,
             score: Callable[[], Score], unseen: Dataset | None = None) -> dict:
    """``predictions`` and ``credibility``; with ``unseen`` (unseen scenes' views) its predictions, suffixed UNSEEN."""
    result = {**predictions(model, dataset, args, device, decoded, score), **credibility(model, dataset, args, device)}
    if unseen is not None:
        measured = predictions(model, unseen, args, device, decoded, score)
        result.update({group + UNSEEN: measured[group] for group in PREDICTIONS})
    return result
