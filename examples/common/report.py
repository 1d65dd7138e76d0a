"""Both pipelines' results.json header, markdown tables and PNG figures of a study's results (``{fusion: {"metrics":
{str(level): {metric: value}}, ...}}``) and its ``statistics`` over seeds (cells, error bars: mean ± 95 % CI)."""

import argparse
import itertools
import math
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Patch

import gpoe_fusion as gf

from .training import CHECKPOINT
from .cli import Presets, provenance
from .data import describe_size
from .evaluation import PREDICTIONS, base_group

plt.switch_backend("Agg")

FUSION_LABELS = {"moe": "MoE", "poe": "PoE", "gpoe": "gPoE", "mopoe": "MoPoE"}
# What each fusion's own weight of a modality is (``CrossModalObjective.fusion_weights``).
FUSION_WEIGHTS = {"moe": "mixture weight", "poe": "precision share", "gpoe": "alpha", "mopoe": "subsets' weight"}
# Per (corrupted modality, --corruption-kind): a test level as a table's cell, a plot's axis, its scale, the corruption.
_LEVELS = {("rgb", "pixels"): (lambda lv: f"{lv:.0%}", "test pixel corruption (%)", 100.0, "pixel-corrupted"),
           ("points", "pixels"): (lambda lv: f"σ {lv:g}", "test noise of the points (std, normalised units)", 1.0,
                                  "noised"),
           **{(m, "desync"): (lambda lv: f"{lv:.0%} desync", f"test samples with the {name} desynchronised (%)", 100.0,
                              "desynchronised") for m, name in (("rgb", "RGB"), ("points", "points"))}}
# The tables and plots of joint inference: per corrupted modality, its metric groups and their rows' labels.
JOINT_GROUPS = {"rgb": {"metrics_joint": "joint", "metrics_oracle": "oracle"},
                "points": {"metrics_joint_aux_corrupted": "joint", "metrics_aux": "points alone",
                           "metrics_oracle_aux_corrupted": "oracle"}}
_CREDIBILITY_COLUMNS = (("AUROC", "auroc"), ("AUROC of the share", "auroc_share"), ("weight clean", "weight_clean"),
                        ("weight corrupted", "weight_corrupted"))


# What a pipeline's reports say of it: results.json's task, results.md's title, the built-in data's label, its presets
# and what the paper gives of them, the main metric (key, label: a sweep's) and the tables' format.
Task = NamedTuple("Task", [("name", str), ("title", str), ("dataset", str), ("presets", Presets),
                           ("from_paper", Mapping[str, Mapping[str, str]]), ("metric", tuple[str, str]),
                           ("floatfmt", str)])


def header(args: argparse.Namespace, task: Task, seconds: float) -> dict:
    """results.json's start: task, preset, seed, data, time, machine, config, each setting's source (cli.provenance)."""
    data = str(args.data_root) if args.data_root is not None else f"built-in synthetic {task.dataset}"
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "given"}
    return {"task": task.name, "preset": args.preset, "seed": args.seed, "data": data, "seconds": seconds,
            "machine": platform.platform(), "torch": torch.__version__, "kernel_extension": gf.extension_available(),
            "config": config, "provenance": provenance(args, task.presets, task.from_paper[args.preset])}


def seeds_phrase(seeds: Sequence[int]) -> str:
    """``"seed 0"`` or ``"seeds 0-7"``."""
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"


def spread(seeds: Sequence[int]) -> str:
    """What a table's cells are over several seeds, to end a sentence with (nothing for one seed)."""
    return f", mean ± 95 % CI half-width over {len(seeds)} seeds" if len(seeds) > 1 else ""


def first_seed(seeds: Sequence[int]) -> str:
    """The note that a figure shows the first seed's run, where there are several."""
    return f" (seed {seeds[0]})" if len(seeds) > 1 else ""


def describe_checkpoints(out: str | Path) -> str:
    """The checkpoints under ``out`` with their sizes; a count and the total beyond three."""
    paths = sorted(Path(out).rglob(CHECKPOINT))
    if len(paths) <= 3:
        return "; ".join(f"{path} {describe_size(path)}" for path in paths)
    return f"{len(paths)} checkpoints under {out} ({sum(p.stat().st_size for p in paths) / 1e6:.0f} MB)"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], floatfmt: str = ".4f") -> str:
    """A GitHub-markdown table; floats formatted with ``floatfmt``."""
    lines = ["| " + " | ".join(format(v, floatfmt) if isinstance(v, float) else str(v) for v in row) + " |"
             for row in [header, *rows]]
    return "\n".join([lines[0], "|" + "|".join(["---"] * len(header)) + "|", *lines[1:]]) + "\n"


def _save(fig: plt.Figure, path: str | Path, **layout: object) -> None:
    fig.tight_layout(**layout)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def line_plot(x: Sequence[float], series: Mapping[str, Sequence[float]], path: str | Path, xlabel: str, ylabel: str,
              title: str = "", markers: bool = True, errors: Mapping[str, Sequence[float]] | None = None,
              ylim: tuple[float, float] | None = None, styles: Mapping[str, dict] | None = None) -> None:
    """A line per entry of ``series`` over ``x``; errors, styles: label -> error bars' half-widths, line properties."""
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    for label, ys in series.items():
        ax.errorbar(x, ys, yerr=(errors or {}).get(label), marker="o" if markers else None, markersize=4, capsize=3,
                    label=label, **(styles or {}).get(label, {}))
    ax.set(xlabel=xlabel, ylabel=ylabel, **({"ylim": ylim} if ylim else {}))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def image_grid(rows: Sequence[Sequence[np.ndarray]], path: str | Path, row_labels: Sequence[str] = (),
               col_labels: Sequence[str] = (), cell: float = 1.6,
               legend: Mapping[str, Sequence[int]] | None = None) -> None:
    """A grid of RGB images (uint8 [H, W, 3] or float in [0, 1]); legend: label -> RGB colour (0..255), shown below."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    width, strip, columns = cell * n_cols, 0.0, 1
    if legend:
        # About the width of one entry at font size 8: the patch, a gap, and the longest label.
        columns = max(1, min(len(legend), int(width // (0.5 + 0.075 * max(map(len, legend))))))
        strip = 0.1 + 0.25 * math.ceil(len(legend) / columns)
    height = cell * n_rows + strip
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width, height), dpi=120, squeeze=False)
    for r, c in itertools.product(range(n_rows), range(n_cols)):
        axes[r][c].set(xticks=[], yticks=[])
        if c < len(rows[r]):
            axes[r][c].imshow(rows[r][c])
        if c == 0 and r < len(row_labels):
            axes[r][c].set_ylabel(row_labels[r], fontsize=8)
        if r == 0 and c < len(col_labels):
            axes[r][c].set_title(col_labels[c], fontsize=8)
    if legend:
        fig.legend(handles=[Patch(color=np.asarray(colour) / 255.0, label=label) for label, colour in legend.items()],
                   loc="lower center", ncol=columns, fontsize=8, frameon=False, handlelength=1.2, columnspacing=1.0)
    _save(fig, path, rect=(0, strip / height, 1, 1))


def corruption_levels(results: Mapping[str, Mapping], group: str = "metrics") -> list[str]:
    """The test levels (the keys of the metric group ``group``, e.g. "0.5") of the first fusion, in order."""
    return list(next(iter(results.values()))[group])


def level_labels(args: argparse.Namespace) -> list[str]:
    """The RGB's --test-corruption levels as a figure's columns are titled, e.g. "50% corruption", "50% desync"."""
    return [f"{lv:.0%} {'desync' if args.corruption_kind == 'desync' else 'corruption'}" for lv in args.test_corruption]


def level_label(group: str, level: str, kind: str = "pixels") -> str:
    """A test level of ``group`` under --corruption-kind ``kind`` in a table: "50%", "σ 0.5" (points), "50% desync"."""
    return _LEVELS[PREDICTIONS[base_group(group)][1], kind][0](float(level))


def fusions_title(what: str, fusions: Sequence[str], seeds: int = 1) -> str:
    """"what: MoE vs PoE vs gPoE" (or one fusion), and over how many seeds the points are means."""
    title = f"{what}: {' vs '.join(FUSION_LABELS[f] for f in fusions)}"
    return title + (f"\nmean and 95 % CI over {seeds} seeds" if seeds > 1 else "")


def interval_cell(summary: Mapping, floatfmt: str, brackets: bool = False) -> str:
    """``study.t_interval`` as ``mean ± half-width`` (``brackets``: ``mean [low, high]``), else the mean or n/a."""
    if summary["mean"] is None or summary["half_width"] is None:
        return "n/a" if summary["mean"] is None else format(summary["mean"], floatfmt)
    if brackets:
        low, high = summary["ci95"]
        return f"{summary['mean']:{floatfmt}} [{low:{floatfmt}}, {high:{floatfmt}}]"
    return f"{summary['mean']:{floatfmt}} ± {summary['half_width']:{floatfmt}}"


def metric_summary(results: Mapping[str, Mapping], statistics: Mapping | None, fusion: str, level: str, key: str,
                   group: str = "metrics") -> Mapping:
    """``key`` of ``group`` at ``level``: its ``t_interval`` over seeds, or ``{"mean": value, "half_width": None}``."""
    return (statistics[group][fusion][level][key] if statistics is not None
            else {"mean": results[fusion][group][level][key], "half_width": None})


def metric_cell(results: Mapping[str, Mapping], statistics: Mapping | None, fusion: str, level: str, key: str,
                floatfmt: str, group: str = "metrics") -> str:
    """``metric_summary`` as a table shows it: the single run's value, or mean ± 95 % CI half-width."""
    return interval_cell(metric_summary(results, statistics, fusion, level, key, group), floatfmt)


def fusion_table(results: Mapping[str, Mapping], columns: Sequence[tuple[str, str]], floatfmt: str = ".4f",
                 statistics: Mapping | None = None, groups: Mapping[str, str] | None = None,
                 kind: str = "pixels") -> str:
    """The paper's comparison layout (Tables 3 and 4): a row per fusion (and metric group of ``groups``, group -> label;
    default ``metrics``) and per level a column per (header, key) of ``columns``; over seeds, mean ± half-width."""
    groups = groups or {"metrics": ""}
    first = next(iter(groups))
    levels = corruption_levels(results, first)
    header = ["Fusion"] + [f"{h} @ {level_label(first, lv, kind)}" for lv in levels for h, _ in columns]
    rows = [[FUSION_LABELS[f] + (f", {label}" if label else "")]
            + [metric_cell(results, statistics, f, lv, key, floatfmt, group) for lv in levels for _, key in columns]
            for group, label in groups.items() for f in results]
    return markdown_table(header, rows, floatfmt=floatfmt)


def corruption_plot(results: Mapping[str, Mapping], metric: str, path: str | Path, ylabel: str, what: str,
                    statistics: Mapping | None = None, groups: Mapping[str, str] | None = None,
                    kind: str = "pixels") -> None:
    """``metric`` against the test corruption, a line per fusion and metric group of ``groups`` (group -> label; default
    ``metrics``), over seeds with 95 % CI error bars; a fusion keeps its colour, a group its line style."""
    groups = groups or {"metrics": ""}
    first = next(iter(groups))
    levels = corruption_levels(results, first)
    points, styles = {}, {}
    for (g, label), linestyle in zip(groups.items(), ("-", "--", ":", "-.")):
        for f, colour in zip(results, itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])):
            name = FUSION_LABELS[f] + (f", {label}" if label else "")
            points[name] = [metric_summary(results, statistics, f, lv, metric, g) for lv in levels]
            styles[name] = {"color": colour, "linestyle": linestyle}
    errors = None if statistics is None else {k: [p["half_width"] or 0.0 for p in v] for k, v in points.items()}
    _, xlabel, scale, _ = _LEVELS[PREDICTIONS[base_group(first)][1], kind]
    line_plot([scale * float(lv) for lv in levels], {k: [p["mean"] for p in v] for k, v in points.items()}, path,
              xlabel, ylabel, fusions_title(what, list(results), len(statistics["seeds"]) if statistics else 1),
              errors=errors, styles=styles)


def joint_plots(results: Mapping[str, Mapping], metric: str, out: str | Path, ylabel: str,
                statistics: Mapping | None = None, kind: str = "pixels") -> None:
    """``joint_vs_rgb_corruption.png`` (joint, oracle) and ``joint_vs_points_corruption.png`` (joint, points alone)."""
    points_corrupted = {"metrics_joint_aux_corrupted": "joint", "metrics_aux": "points alone"}
    for corrupted, groups in (("RGB", JOINT_GROUPS["rgb"]), ("points", points_corrupted)):
        corruption_plot(results, metric, Path(out) / f"joint_vs_{corrupted.lower()}_corruption.png", ylabel,
                        f"Joint inference, {corrupted} corrupted", statistics, groups, kind)


def alpha_plots(results: Mapping[str, Mapping], out_dir: str | Path, kind: str = "pixels") -> None:
    """Per gPoE fusion, ``alpha_<fusion>.png``: each modality's mean alpha against the RGB's test corruption."""
    levels = corruption_levels(results)
    for f, r in results.items():
        if r.get("alpha"):
            series = {m: [r["alpha"][lv][m] for lv in levels] for m in r["alpha"][levels[0]]}
            line_plot([100 * float(lv) for lv in levels], series, Path(out_dir) / f"alpha_{f}.png",
                      _LEVELS["rgb", kind][1], "mean alpha", f"{FUSION_LABELS[f]}: credibility per modality",
                      ylim=(0.0, 1.0))


def credibility_plots(results: Mapping[str, Mapping], out_dir: str | Path) -> None:
    """Per fusion, ``credibility_<fusion>.png``: per modality, box plots (and dots) of each held-out sample's own weight
    (mean over D) on its clean and its corrupted samples."""
    for f, r in results.items():
        samples = r.get("credibility_samples")
        if not samples:
            continue
        fig, axes = plt.subplots(1, len(samples), figsize=(2.6 * len(samples) + 0.6, 3.4), dpi=120, squeeze=False)
        for ax, (modality, data) in zip(axes[0], samples.items()):
            weight, corrupted = np.asarray(data["weight"], dtype=float), np.asarray(data["corrupted"], dtype=bool)
            groups = [weight[~corrupted], weight[corrupted]]
            ax.boxplot(groups, showfliers=False, widths=0.5)
            jitter = np.random.default_rng(0)
            for i, values in enumerate(groups, start=1):
                ax.scatter(i + jitter.uniform(-0.15, 0.15, len(values)), values, s=4, alpha=0.35, color="tab:blue")
            ax.set_xticks([1, 2], [f"clean\n({len(groups[0])})", f"corrupted\n({len(groups[1])})"])
            ax.set_ylim(0.0, 1.0)
            auroc = r["credibility"][modality]["auroc"]
            ax.set_title(f"{modality} (AUROC {'n/a' if auroc is None else format(auroc, '.2f')})", fontsize=9)
            ax.grid(alpha=0.3, axis="y")
        axes[0][0].set_ylabel(f"{FUSION_WEIGHTS[f]} of the modality")
        fig.suptitle(f"{FUSION_LABELS[f]}: {FUSION_WEIGHTS[f]} on held-out samples", fontsize=9)
        _save(fig, Path(out_dir) / f"credibility_{f}.png")


def difference_label(name: str) -> str:
    return " − ".join(FUSION_LABELS[f] for f in name.split("-"))


def differences_table(statistics: Mapping, part: str, cells: Sequence[tuple[str, str, str]], floatfmt: str) -> str:
    """The paired differences of ``statistics`` (``part``: "metrics" or "credibility") at ``cells``, (outer, inner key,
    column header) each, as ``mean [95 % paired-t interval]``, and a line naming those whose interval excludes 0."""
    rows, found = [], []
    for name, difference in statistics["differences"].items():
        measured = [(difference[part][outer][inner], label) for outer, inner, label in cells]
        rows.append([difference_label(name)] + [interval_cell(d, floatfmt, True) for d, _ in measured])
        found += [f"{difference_label(name)} in {label} ({interval_cell(d, floatfmt, True)}: "
                  f"{FUSION_LABELS[name.split('-')[0]]} {'higher' if d['mean'] > 0 else 'lower'})"
                  for d, label in measured if d["excludes_zero"]]
    table = markdown_table(["Difference"] + [label for _, _, label in cells], rows)
    return (f"{table}\n" + ("95 % intervals that exclude 0: " + "; ".join(found) + ".\n" if found
                           else "No paired difference's 95 % interval excludes 0.\n"))


def differences_markdown(statistics: Mapping | None, columns: Sequence[tuple[str, str]], floatfmt: str,
                         group: str = "metrics", of: str = "", kind: str = "pixels") -> str:
    """``differences_table`` of ``columns`` (header, key) of ``group`` at every level, introduced as those ``of`` a
    prediction (e.g. " of the joint"); empty without statistics or a pair of fusions."""
    if statistics is None or not statistics["differences"]:
        return ""
    levels = list(next(iter(statistics[group].values())))
    return (f"Paired differences{of} over the {len(statistics['seeds'])} seeds (the runs of a seed share their data, "
            f"training noise, test corruption and the initial weights of their encoders and decoders): mean [95 % "
            f"paired-t interval].\n\n" + differences_table(statistics, group, [
                (lv, key, f"{h} @ {level_label(group, lv, kind)}") for lv in levels for h, key in columns], floatfmt))


def joint_markdown(results: Mapping[str, Mapping], statistics: Mapping | None, columns: Sequence[tuple[str, str]],
                   floatfmt: str, kind: str = "pixels") -> str:
    """Joint inference's tables of ``columns`` (header, key), RGB or points corrupted, with the joint's differences."""
    seeds = spread(statistics["seeds"]) if statistics else ""
    masked = ("as every test sample is corrupted, above level 0 it is the other modality alone" if kind == "pixels"
              else "it masks the modality of the desynchronised samples only")
    text = ("Joint inference: the fused posterior of both modalities decoded (MoE and MoPoE: the mixture's mean); "
            "oracle: the same with the corrupted modality's weight set to 0 from the corruption flags (for measurement "
            f"only: no fusion sees them; {masked}).\n\n")
    for modality, name, other in (("rgb", "RGB", "points"), ("points", "Points", "RGB")):
        what = f"{name} {_LEVELS[modality, kind][3]}, {other} clean{seeds}"
        text += f"{what}.\n\n{fusion_table(results, columns, floatfmt, statistics, JOINT_GROUPS[modality], kind)}\n"
        joint = next(g for g, label in JOINT_GROUPS[modality].items() if label == "joint")
        text += differences_markdown(statistics, columns, floatfmt, joint, " of the joint", kind) + "\n"
    return text


def credibility_markdown(results: Mapping[str, Mapping], statistics: Mapping | None, floatfmt: str = ".3f") -> str:
    """The held-out credibility table (_CREDIBILITY_COLUMNS per fusion and modality), the paired AUROC differences."""
    first = next(iter(results.values()))["credibility"]
    if not first:
        return ""
    corruption = ", ".join(f"{m}: " + ("desynchronised" if first[m].get("desync") else ", ".join(
        f"{k.replace('_', ' ')} {v:g}" for k, v in first[m].items() if k in ("pixel_corruption", "point_noise")))
        for m in first)
    rows = [[f"{FUSION_LABELS[f]} ({FUSION_WEIGHTS[f]})"]
            + [metric_cell(results, statistics, f, m, key, floatfmt, "credibility") for m in first
               for _, key in _CREDIBILITY_COLUMNS] for f in results]
    header = ["Fusion (its weight)"] + [f"{m} {h}" for m in first for h, _ in _CREDIBILITY_COLUMNS]
    text = (f"Credibility on held-out samples: for each modality, the evaluation samples with a seeded half of them "
            f"corrupted in that modality as in training ({corruption}), the other modality clean. AUROC that the "
            f"fusion's own weight of the modality (gPoE: alpha, PoE: its precision share, MoE: its mixture weight) is "
            f"lower on the corrupted samples than on the clean ones (0.5: blind to the corruption), the same for the "
            f"precision share alpha T / sum, and the mean weight on each.\n\n{markdown_table(header, rows, floatfmt)}")
    if statistics is None or not statistics["differences"]:
        return text
    return (f"{text}\nPaired differences of the AUROC: mean [95 % paired-t interval].\n\n"
            + differences_table(statistics, "credibility", [(m, "auroc", f"{m} AUROC") for m in first], floatfmt))
