"""What a run leaves in --out besides its figures: results.json (the record of the run: settings,
where they come from, and every number) and the markdown tables both pipelines put in results.md:
the paired differences between fusions, the held-out credibility, and the sweep over the training
data corruption."""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

import gpoe_fusion as gf

from .checkpoint import write_json
from .options import provenance
from .report import FUSION_LABELS, FUSION_WEIGHTS, fusions_title, interval_cell, line_plot, markdown_table
from .study import Study, SweepPoint
from .training import CHECKPOINT

__all__ = ["credibility_markdown", "describe_checkpoints", "describe_size", "differences_markdown",
           "seeds_phrase", "write_summary", "write_sweep_summary"]

# The test levels the sweep's figure shows (paper Fig. 4, first panel: clean and 50 % corrupted).
SWEEP_LEVELS = (0.0, 0.5)
# The credibility table's columns per modality: (header, measure).
_CREDIBILITY_COLUMNS = (("AUROC", "auroc"), ("AUROC of the share", "auroc_share"), ("weight clean", "weight_clean"),
                        ("weight corrupted", "weight_corrupted"))


def describe_size(path: str | Path) -> str:
    """The disk space a file or folder takes, e.g. ``"(172 MB)"``."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return f"({sum(os.path.getsize(p) for p in files) / 1e6:.0f} MB)"


def describe_checkpoints(out: str | Path) -> str:
    """The checkpoints under ``out`` with their sizes; a count and the total beyond three."""
    paths = sorted(Path(out).rglob(CHECKPOINT))
    if len(paths) <= 3:
        return "; ".join(f"{path} {describe_size(path)}" for path in paths)
    total = sum(os.path.getsize(p) for p in paths) / 1e6
    return f"{len(paths)} checkpoints under {out} ({total:.0f} MB)"


def seeds_phrase(seeds: Sequence[int]) -> str:
    """``"seed 0"`` or ``"seeds 0-7"``."""
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"


def _header(args: argparse.Namespace, task: str, data: str, seconds: float, presets: Mapping[str, Mapping[str, object]],
            from_paper: Mapping[str, str]) -> dict:
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "given"}
    return {"task": task, "preset": args.preset, "seed": args.seed, "data": data, "seconds": seconds,
            "machine": platform.platform(), "torch": torch.__version__,
            "kernel_extension": gf.extension_available(), "config": config,
            "provenance": provenance(args, presets, from_paper)}


def write_summary(args: argparse.Namespace, task: str, data: str, study: Study, seconds: float,
                  presets: Mapping[str, Mapping[str, object]], from_paper: Mapping[str, str],
                  **extra: object) -> dict:
    """Write ``args.out/results.json``: the task, preset, seed, data, time, machine, the full config,
    where each setting comes from (``provenance``), any ``extra`` entries, and the study's record
    (``Study.record``: every fusion's results, over seeds with their statistics). Returns it."""
    summary = {**_header(args, task, data, seconds, presets, from_paper), **extra, **study.record()}
    write_json(Path(args.out) / "results.json", summary)
    return summary


def _difference_label(name: str) -> str:
    a, b = name.split("-")
    return f"{FUSION_LABELS[a]} − {FUSION_LABELS[b]}"


def _difference_cell(difference: Mapping, floatfmt: str) -> str:
    """A paired difference as ``mean [low, high]`` (its 95 % interval)."""
    if difference["mean"] is None:
        return "n/a"
    if difference["ci95"] is None:
        return format(difference["mean"], floatfmt)
    low, high = difference["ci95"]
    return f"{difference['mean']:{floatfmt}} [{low:{floatfmt}}, {high:{floatfmt}}]"


def _excluding_zero(statistics: Mapping, part: str, cells: Sequence[tuple[str, str, str]], floatfmt: str) -> str:
    """The sentence that names the differences whose interval excludes 0. cells: (outer, inner, label)."""
    found = []
    for name, difference in statistics["differences"].items():
        for outer, inner, label in cells:
            d = difference[part][outer][inner]
            if d["excludes_zero"]:
                side = "higher" if d["mean"] > 0 else "lower"
                found.append(f"{_difference_label(name)} in {label} ({_difference_cell(d, floatfmt)}: "
                             f"{FUSION_LABELS[name.split('-')[0]]} {side})")
    if not found:
        return "No paired difference's 95 % interval excludes 0.\n"
    return "95 % intervals that exclude 0: " + "; ".join(found) + ".\n"


def differences_markdown(statistics: Mapping | None, columns: Sequence[tuple[str, str]], floatfmt: str) -> str:
    """The paired differences of the metrics ``columns`` (header, key) at every test level, each
    ``mean [95 % paired-t interval]``, and a line naming those whose interval excludes 0. Empty
    without statistics or without a pair of fusions to compare."""
    if statistics is None or not statistics["differences"]:
        return ""
    levels = list(next(iter(statistics["metrics"].values())))
    cells = [(lv, key, f"{h} @ {float(lv):.0%}") for lv in levels for h, key in columns]
    rows = [[_difference_label(name)] + [_difference_cell(d["metrics"][lv][key], floatfmt) for lv, key, _ in cells]
            for name, d in statistics["differences"].items()]
    n = len(statistics["seeds"])
    return (f"Paired differences over the {n} seeds (the runs of a seed share their data, training noise, test "
            f"corruption and the initial weights of their encoders and decoders): mean [95 % paired-t "
            f"interval].\n\n{markdown_table(['Difference'] + [label for _, _, label in cells], rows)}\n"
            + _excluding_zero(statistics, "metrics", cells, floatfmt))


def credibility_markdown(study: Study, floatfmt: str = ".3f") -> str:
    """The held-out credibility: per fusion and corrupted modality, the AUROC that the fusion's own
    weight (and the precision share) is lower on the corrupted samples and the mean weight on clean
    and corrupted ones; over seeds, mean ± 95 % CI half-width, then the paired AUROC differences."""
    results, statistics = study.results, study.statistics
    first = next(iter(results.values()))["credibility"]
    if not first:
        return ""
    modalities = list(first)
    corruption = ", ".join(f"{m}: " + ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in first[m].items()
                                                if k in ("pixel_corruption", "point_noise")) for m in modalities)
    header = ["Fusion (its weight)"] + [f"{m} {h}" for m in modalities for h, _ in _CREDIBILITY_COLUMNS]

    def cell(fusion: str, modality: str, measure: str) -> float | str:
        if statistics is not None:
            return interval_cell(statistics["credibility"][fusion][modality][measure], floatfmt)
        value = results[fusion]["credibility"][modality][measure]
        return "n/a" if value is None else value

    rows = [[f"{FUSION_LABELS[f]} ({FUSION_WEIGHTS[f]})"] + [cell(f, m, key) for m in modalities
                                                              for _, key in _CREDIBILITY_COLUMNS] for f in results]
    text = (f"Credibility on held-out samples: for each modality, the evaluation samples with a seeded half of them "
            f"corrupted in that modality as in training ({corruption}), the other modality clean. AUROC that the fusion's own weight of the modality (gPoE: alpha, "
            f"PoE: its precision share, MoE: its mixture weight) is lower on the corrupted samples than on the "
            f"clean ones (0.5: blind to the corruption), the same for the precision share alpha T / sum, and "
            f"the mean weight on each.\n\n{markdown_table(header, rows, floatfmt=floatfmt)}")
    if statistics is None or not statistics["differences"]:
        return text
    cells = [(m, "auroc", f"{m} AUROC") for m in modalities]
    rows = [[_difference_label(name)] + [_difference_cell(d["credibility"][m][key], floatfmt) for m, key, _ in cells]
            for name, d in statistics["differences"].items()]
    return (f"{text}\nPaired differences of the AUROC: mean [95 % paired-t interval].\n\n"
            f"{markdown_table(['Difference'] + [label for _, _, label in cells], rows)}\n"
            + _excluding_zero(statistics, "credibility", cells, floatfmt))


def _sweep_cell(study: Study, fusion: str, level: str, metric: str) -> dict:
    """A sweep point's ``metric``: ``{"mean", "half_width"}`` over seeds, or the single run's value."""
    statistics = study.statistics
    if statistics is not None:
        return statistics["metrics"][fusion][level][metric]
    return {"mean": study.results[fusion]["metrics"][level][metric], "half_width": None}


def write_sweep_summary(args: argparse.Namespace, task: str, data: str, points: Sequence[SweepPoint],
                        metric: tuple[str, str], presets: Mapping[str, Mapping[str, object]],
                        from_paper: Mapping[str, str], seconds: float, heading: str, floatfmt: str) -> str:
    """The sweep's top-level report in ``args.out``: results.json (the header of ``write_summary``
    and ``sweep``: ``{"metric", "fractions", "points": {str(fraction): {"out", **Study.record()}}}``),
    results.md (the main ``metric`` (key, label) per training fraction, fusion and test level, and
    over seeds the paired differences) and ``training_corruption_sweep.png`` (the metric at the test
    levels of SWEEP_LEVELS evaluated, against the training fraction). Returns the table."""
    out = Path(args.out)
    key, label = metric
    write_json(out / "results.json", {
        **_header(args, task, data, seconds, presets, from_paper),
        "sweep": {"metric": key, "fractions": [p.fraction for p in points],
                  "points": {str(p.fraction): {"out": str(p.out), **p.study.record()} for p in points}}})
    first = points[0].study
    levels = list(first.results[first.fusions[0]]["metrics"])
    rows = []
    for p in points:
        for f in p.study.fusions:
            rows.append([f"{p.fraction:.0%}", FUSION_LABELS[f]]
                        + [interval_cell(_sweep_cell(p.study, f, lv, key), floatfmt) for lv in levels])
        statistics = p.study.statistics
        for name, d in (statistics["differences"] if statistics else {}).items():
            rows.append([f"{p.fraction:.0%}", _difference_label(name)]
                        + [_difference_cell(d["metrics"][lv][key], floatfmt) for lv in levels])
    seeds = first.seeds
    spread = ("mean ± 95 % CI half-width, differences: mean [95 % paired-t interval]" if len(seeds) > 1
              else "one seed")
    table = markdown_table(["Training corruption", "Fusion"] + [f"{label} @ {float(lv):.0%}" for lv in levels], rows)
    (out / "results.md").write_text(
        f"# {heading}: sweep over the training data corruption ({data}, preset {args.preset}, "
        f"{seeds_phrase(seeds)})\n\n{label} from RGB alone, by the fraction of training samples corrupted "
        f"(--data-corruption) and the test pixel corruption; {spread}. Each fraction's full report is in its "
        f"folder (corruption<X>/).\n\n{table}")
    shown = [lv for lv in levels if float(lv) in SWEEP_LEVELS] or levels
    series, errors = {}, {}
    for f in first.fusions:
        for lv in shown:
            cells = [_sweep_cell(p.study, f, lv, key) for p in points]
            name = f"{FUSION_LABELS[f]} @ {float(lv):.0%} test corruption"
            series[name] = [c["mean"] for c in cells]
            errors[name] = [c["half_width"] or 0.0 for c in cells]
    line_plot([100 * p.fraction for p in points], series, out / "training_corruption_sweep.png",
              "training samples corrupted (%)", label,
              fusions_title(f"{label} against training corruption", first.fusions, len(seeds)),
              errors=errors if len(seeds) > 1 else None)
    return table
