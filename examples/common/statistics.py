"""Statistics over seeds: the mean with its Student-t confidence interval, and the paired
differences between fusions.

Runs of the same seed are paired: they train on the same data with the same training noise, start
from the same initial weights of the parts they share (encoders and decoders are built from the
seed before the fusion layer) and are tested on the same corruption, so the seed-to-seed spread that
the fusions share cancels in their difference and the paired t interval is the narrower, right one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from scipy import stats

__all__ = ["CONFIDENCE", "CREDIBILITY_MEASURES", "DIFFERENCES", "paired_difference", "study_statistics",
           "t_interval"]

CONFIDENCE = 0.95
# The paired differences reported, as (minuend, subtrahend): the paper's claim is gPoE against each.
DIFFERENCES = (("gpoe", "poe"), ("gpoe", "moe"))
# The held-out credibility measures summarised over seeds.
CREDIBILITY_MEASURES = ("auroc", "auroc_alpha", "auroc_share", "weight_clean", "weight_corrupted", "effective_experts")


def _present(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def t_interval(values: Sequence[float | None]) -> dict:
    """``{"mean", "std", "n", "ci95", "half_width"}`` of ``values`` (None and NaN left out): the mean,
    the sample standard deviation (n - 1 in the denominator), n, and the 95 % Student-t interval
    ``[mean - h, mean + h]`` with ``h = t(0.975, n - 1) * std / sqrt(n)``. With fewer than two
    values std, ci95 and half_width are None (and with none the mean too)."""
    xs = [float(v) for v in values if _present(v)]
    n = len(xs)
    out = {"mean": None, "std": None, "n": n, "ci95": None, "half_width": None}
    if n == 0:
        return out
    mean = math.fsum(xs) / n
    out["mean"] = mean
    if n < 2:
        return out
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(stats.t.ppf((1 + CONFIDENCE) / 2, n - 1)) * std / math.sqrt(n)
    out.update(std=std, ci95=[mean - half, mean + half], half_width=half)
    return out


def paired_difference(a: Sequence[float | None], b: Sequence[float | None]) -> dict:
    """The paired differences ``a[i] - b[i]`` (``per_seed``, None where either is missing), their
    ``t_interval`` (the paired t interval), and ``excludes_zero``: whether that interval lies
    entirely above or below 0."""
    if len(a) != len(b):
        raise ValueError(f"b: expected {len(a)} values to pair with a's, got {len(b)}")
    per_seed = [x - y if _present(x) and _present(y) else None for x, y in zip(a, b)]
    out = {"per_seed": per_seed, **t_interval(per_seed)}
    out["excludes_zero"] = out["ci95"] is not None and (out["ci95"][0] > 0 or out["ci95"][1] < 0)
    return out


def _scalar_metrics(metrics: Mapping[str, object]) -> list[str]:
    """The metrics summarised: the float-valued ones (not lists, counts or flags)."""
    return [key for key, value in metrics.items() if isinstance(value, float)]


def study_statistics(runs: Mapping[str, Mapping[int, Mapping]], seeds: Sequence[int]) -> dict:
    """Statistics of a study's runs over its seeds.

    runs: fusion -> seed -> a run's result (``metrics``: {level: {metric: value}}, ``credibility``:
    {modality: {measure: value}}). Returns ``{"confidence", "seeds", "metrics": {fusion: {level:
    {metric: t_interval}}}, "credibility": {fusion: {modality: {measure: t_interval}}},
    "differences": {"gpoe-poe": {"metrics": {level: {metric: paired_difference}}, "credibility":
    {modality: {measure: paired_difference}}}, ...}}``, the float metrics and CREDIBILITY_MEASURES
    only, the differences of DIFFERENCES for the fusions trained.
    """
    def metric_values(fusion: str) -> dict[str, dict[str, list]]:
        first = runs[fusion][seeds[0]]["metrics"]
        return {level: {key: [runs[fusion][s]["metrics"][level][key] for s in seeds]
                        for key in _scalar_metrics(values)} for level, values in first.items()}

    def credibility_values(fusion: str) -> dict[str, dict[str, list]]:
        first = runs[fusion][seeds[0]].get("credibility") or {}
        return {modality: {key: [runs[fusion][s]["credibility"][modality].get(key) for s in seeds]
                           for key in CREDIBILITY_MEASURES} for modality in first}

    values = {f: {"metrics": metric_values(f), "credibility": credibility_values(f)} for f in runs}

    def summarise(tree: Mapping, combine) -> dict:
        return {outer: {inner: combine(v) for inner, v in sub.items()} for outer, sub in tree.items()}

    differences = {}
    for a, b in DIFFERENCES:
        if a in values and b in values:
            differences[f"{a}-{b}"] = {
                part: {outer: {inner: paired_difference(series, values[b][part][outer][inner])
                               for inner, series in sub.items()} for outer, sub in values[a][part].items()}
                for part in ("metrics", "credibility")}
    return {"confidence": CONFIDENCE, "seeds": list(seeds),
            "metrics": {f: summarise(v["metrics"], t_interval) for f, v in values.items()},
            "credibility": {f: summarise(v["credibility"], t_interval) for f, v in values.items()},
            "differences": differences}
