"""Studies, a layer above a pipeline's run: every fusion of --fusions (--compare) at every seed of --seeds, at every
fraction of --corruption-sweep, each a run into its own folder (--out, then ``corruption<X>/``, ``<fusion>/``,
``seed<k>/``); finished runs reused, not trained again; the statistics over seeds, whose runs are paired (the same data,
noise and initial weights of the parts they share, so the spread they share cancels in their difference); the sweep."""

import argparse
import itertools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from scipy import stats
from torch import nn

from . import report
from .training import CHECKPOINT, DistEnv, load_checkpoint, write_json
from .cli import run_signature
from .evaluation import PREDICTIONS, base_group, group_levels
from .report import FUSION_LABELS, Task

CONFIDENCE = 0.95
DIFFERENCES = (("gpoe", "poe"), ("gpoe", "moe"))  # (minuend, subtrahend): the paper's claim is gPoE against each
# The held-out credibility measures summarised over seeds.
CREDIBILITY_MEASURES = ("auroc", "auroc_alpha", "auroc_share", "weight_clean", "weight_corrupted", "effective_experts")
SWEEP_LEVELS = (0.0, 0.5)  # the test levels of the sweep's figure (paper Fig. 4, first panel: clean, 50 % corrupted)
# What a run's results.json holds that its study's does not: settings (in its config), per-sample weights (for figures).
_RUN_ONLY = ("signature", "credibility_samples")


def _present(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def t_interval(values: Sequence[float | None]) -> dict:
    """``{"mean", "std", "n", "ci95", "half_width"}`` of ``values`` (None and NaN left out): the sample std (n - 1) and
    the Student-t interval, ``h = t(0.975, n - 1) * std / sqrt(n)``; None below two values (the mean too with none)."""
    xs = [float(v) for v in values if _present(v)]
    n = len(xs)
    out = {"mean": math.fsum(xs) / n if n else None, "std": None, "n": n, "ci95": None, "half_width": None}
    if n >= 2:
        std = math.sqrt(math.fsum((x - out["mean"]) ** 2 for x in xs) / (n - 1))
        half = float(stats.t.ppf((1 + CONFIDENCE) / 2, n - 1)) * std / math.sqrt(n)
        out.update(std=std, ci95=[out["mean"] - half, out["mean"] + half], half_width=half)
    return out


def paired_difference(a: Sequence[float | None], b: Sequence[float | None]) -> dict:
    """The differences ``a[i] - b[i]`` (None if one is missing) as ``{"per_seed", **t_interval, "excludes_zero"}``."""
    if len(a) != len(b):
        raise ValueError(f"b: expected {len(a)} values to pair with a's, got {len(b)}")
    per_seed = [x - y if _present(x) and _present(y) else None for x, y in zip(a, b)]
    out = {"per_seed": per_seed, **t_interval(per_seed)}
    out["excludes_zero"] = out["ci95"] is not None and (out["ci95"][0] > 0 or out["ci95"][1] < 0)
    return out


def study_statistics(runs: Mapping[str, Mapping[int, Mapping]], seeds: Sequence[int]) -> dict:
    """Statistics of a study's runs (fusion -> seed -> result): ``{"confidence", "seeds", <group>: {fusion: {level:
    {metric: t_interval}}} per metric group held, "credibility": {fusion: {modality: {measure: t_interval}}},
    "differences": {"gpoe-poe": {<group>: ..., "credibility": ...} of paired_difference}}`` for DIFFERENCES trained."""
    groups = [group for group in runs[next(iter(runs))][seeds[0]] if base_group(group) in PREDICTIONS]
    parts = [*groups, "credibility"]

    def series(fusion: str) -> dict[str, dict]:
        first = runs[fusion][seeds[0]]
        metrics = {group: {level: {key: [runs[fusion][s][group][level][key] for s in seeds]
                                   for key, value in values.items() if isinstance(value, float)}
                           for level, values in first[group].items()} for group in groups}
        credibility = {m: {key: [runs[fusion][s]["credibility"][m].get(key) for s in seeds]
                           for key in CREDIBILITY_MEASURES} for m in first.get("credibility") or {}}
        return {**metrics, "credibility": credibility}

    values = {f: series(f) for f in runs}

    def combine(a: dict, b: dict | None, part: str) -> dict:
        return {outer: {inner: t_interval(v) if b is None else paired_difference(v, b[part][outer][inner])
                        for inner, v in sub.items()} for outer, sub in a[part].items()}

    return {"confidence": CONFIDENCE, "seeds": list(seeds),
            **{p: {f: combine(v, None, p) for f, v in values.items()} for p in parts},
            "differences": {f"{a}-{b}": {p: combine(values[a], values[b], p) for p in parts}
                            for a, b in DIFFERENCES if a in values and b in values}}


@dataclass
class Study:
    """The runs of one training data corruption. runs: fusion -> seed -> result (main process only); first: fusion ->
    the arguments of its first seed's run, whose model the figures show; began: ``time.perf_counter`` at its start."""

    fusions: list[str]
    seeds: list[int]
    runs: dict[str, dict[int, dict]] = field(default_factory=dict)
    first: dict[str, argparse.Namespace] = field(default_factory=dict)
    began: float = field(default_factory=time.perf_counter)

    @property
    def results(self) -> dict[str, dict]:
        """fusion -> the first seed's result: the single run's, or the one the figures show."""
        return {f: self.runs[f][self.seeds[0]] for f in self.fusions}

    @cached_property
    def statistics(self) -> dict | None:
        """``study_statistics`` over the seeds (of the runs when first asked for); None with one seed."""
        return study_statistics(self.runs, self.seeds) if len(self.seeds) > 1 else None

    def record(self) -> dict:
        """What results.json holds of the study. One seed: ``{"fusions": {fusion: result}}``. More: ``{"seeds",
        "fusions": {fusion: {"runs": {seed: result without its history}}}, "statistics"}``."""
        def kept(result: dict, *dropped: str) -> dict:
            return {k: v for k, v in result.items() if k not in _RUN_ONLY + dropped}

        if len(self.seeds) == 1:
            return {"fusions": {f: kept(r) for f, r in self.results.items()}}
        return {"seeds": self.seeds, "statistics": self.statistics,
                "fusions": {f: {"runs": {str(s): kept(self.runs[f][s], "history") for s in self.seeds}}
                            for f in self.fusions}}

    def models(self, build_model: Callable[[argparse.Namespace], nn.Module]) -> dict[str, nn.Module]:
        """fusion -> its first seed's trained model, loaded from the run's checkpoint (on the CPU)."""
        models = {fusion: build_model(args) for fusion, args in self.first.items()}
        for fusion, model in models.items():
            model.load_state_dict(load_checkpoint(Path(self.first[fusion].out) / CHECKPOINT)["model"])
        return {f: m.eval() for f, m in models.items()}


def _with(args: argparse.Namespace, **changes: object) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


def finished_run(args: argparse.Namespace) -> dict | None:
    """The result in --out/results.json if it is this run's (signature, test levels) by its checkpoint, else None."""
    try:
        result = json.loads((Path(args.out) / "results.json").read_text())
    except (OSError, ValueError):  # none, half a file of an older version, or unreadable: train again
        return None
    same = isinstance(result, dict) and result.get("signature") == run_signature(args)
    evaluated = same and all(list(result.get(group) or ()) == [str(level) for level in levels]
                             for group, levels in group_levels(args).items())
    return result if evaluated and (Path(args.out) / CHECKPOINT).is_file() else None


def _run_point(args: argparse.Namespace, env: DistEnv, run_one: Callable[[argparse.Namespace], dict | None],
               heading: str = "") -> Study:
    """args.fusion, or with --compare each of --fusions, at each seed of --seeds, each into its folder: a seed's fusions
    one after the other, so that the paired comparisons of the first seeds come first."""
    log = print if env.is_main else (lambda _: None)
    fusions = list(args.fusions) if args.compare else [args.fusion]
    study = Study(fusions, list(range(args.seed, args.seed + args.seeds)), {f: {} for f in fusions})
    runs = list(itertools.product(study.seeds, study.fusions))
    for count, (seed, fusion) in enumerate(runs, start=1):
        # In a sweep the fraction's folder holds its study's results.json: a run of its own goes below it.
        own_folder = args.compare or args.corruption_sweep
        out = Path(args.out) / (fusion if own_folder else "") / (f"seed{seed}" if args.seeds > 1 else "")
        run = _with(args, fusion=fusion, seed=seed, out=out)
        name = heading + FUSION_LABELS[fusion] + (f", seed {seed}" if args.seeds > 1 else "")
        name += f" (run {count} of {len(runs)})" if len(runs) > 1 else ""
        result = finished_run(run) if args.seeds > 1 or args.corruption_sweep else None
        if result is not None:
            log(f"== {name}: finished in {out}, its results loaded (not retrained)")
        else:
            log(f"== {name} -> {out}")
            result = run_one(run)
        if env.is_main:
            study.runs[fusion][seed] = result
        study.first.setdefault(fusion, run)
    return study


def run(args: argparse.Namespace, env: DistEnv, task: Task, run_one: Callable[[argparse.Namespace], dict | None],
        write_report: Callable[[argparse.Namespace, Study], str]) -> Study | list[Study] | None:
    """The command's runs, ``run_one(args)`` each, then on the main process each study's ``write_report(args, study)``
    (its tables) and weight figures, a sweep's report; prints the tables. Returns the study (a sweep's list) or None."""
    began, studies = time.perf_counter(), []
    for fraction in args.corruption_sweep or [None]:
        point = args if fraction is None else _with(args, data_corruption=fraction, given=sorted(
            {*args.given, "data_corruption"}), out=Path(args.out) / f"corruption{fraction:g}")
        heading = "" if fraction is None else f"training corruption {fraction:.0%}: "
        studies.append(_run_point(point, env, run_one, heading))
        if env.is_main:
            tables = write_report(point, studies[-1])
            report.alpha_plots(studies[-1].results, point.out, point.corruption_kind)
            report.credibility_plots(studies[-1].results, point.out)
    if not env.is_main:
        return None
    if args.corruption_sweep:
        tables = write_sweep_report(args, task, studies, time.perf_counter() - began)
    print(f"\n{tables}\nresults and plots in {args.out} ({time.perf_counter() - began:.0f} s); "
          f"{report.describe_checkpoints(args.out)}")
    return studies if args.corruption_sweep else studies[0]


def write_summary(args: argparse.Namespace, task: Task, study: Study, **extra: object) -> dict:
    """--out/results.json of a study: ``report.header``, ``extra`` and ``Study.record``. Returns it."""
    summary = {**report.header(args, task, time.perf_counter() - study.began), **extra, **study.record()}
    write_json(Path(args.out) / "results.json", summary)
    return summary


def write_sweep_report(args: argparse.Namespace, task: Task, studies: list[Study], seconds: float) -> str:
    """The sweep's results.json (``sweep``: ``{"metric", "fractions", "points": {str(fraction): {"out", **record}}}``),
    results.md (metric per fraction, fusion, level; differences), training_corruption_sweep.png; returns the table."""
    out, (key, label), fractions = Path(args.out), task.metric, args.corruption_sweep
    head = report.header(args, task, seconds)
    write_json(out / "results.json", {**head, "sweep": {"metric": key, "fractions": fractions, "points": {
        str(f): {"out": str(out / f"corruption{f:g}"), **s.record()} for f, s in zip(fractions, studies)}}})
    first, levels = studies[0], report.corruption_levels(studies[0].results)
    rows = []
    for fraction, study in zip(fractions, studies):
        rows += [[f"{fraction:.0%}", FUSION_LABELS[f]]
                 + [report.metric_cell(study.results, study.statistics, f, lv, key, task.floatfmt) for lv in levels]
                 for f in study.fusions]
        rows += [[f"{fraction:.0%}", report.difference_label(name)]
                 + [report.interval_cell(d["metrics"][lv][key], task.floatfmt, True) for lv in levels]
                 for name, d in (study.statistics or {"differences": {}})["differences"].items()]
    spread = ("mean ± 95 % CI half-width, differences: mean [95 % paired-t interval]" if len(first.seeds) > 1
              else "one seed")
    table = report.markdown_table(["Training corruption", "Fusion", *(f"{label} @ {float(lv):.0%}" for lv in levels)],
                                  rows)
    (out / "results.md").write_text(
        f"# {task.title}: sweep over the training data corruption ({head['data']}, "
        f"preset {args.preset}, {report.seeds_phrase(first.seeds)})\n\n{label} from RGB alone, by the fraction of "
        f"training samples corrupted (--data-corruption) and the test corruption (--test-corruption); {spread}. Each "
        f"fraction's full report is in its folder (corruption<X>/).\n\n{table}")
    series, errors = {}, {}
    for f, lv in itertools.product(first.fusions, [lv for lv in levels if float(lv) in SWEEP_LEVELS] or levels):
        cells = [report.metric_summary(study.results, study.statistics, f, lv, key) for study in studies]
        name = f"{FUSION_LABELS[f]} @ {float(lv):.0%} test corruption"
        series[name], errors[name] = [c["mean"] for c in cells], [c["half_width"] or 0.0 for c in cells]
    report.line_plot([100 * f for f in fractions], series, out / "training_corruption_sweep.png",
                     "training samples corrupted (%)", label,
                     report.fusions_title(f"{label} against training corruption", first.fusions, len(first.seeds)),
                     errors=errors if len(first.seeds) > 1 else None)
    return table
