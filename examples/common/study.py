"""A study: the runs of one experiment at one training data corruption, every fusion at every seed,
and what results.json keeps of them; a point of the sweep over the training data corruption."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from .model import CrossModalVAE
from .statistics import study_statistics

__all__ = ["Study", "SweepPoint"]

# What a run's own results.json holds that the study's does not: the settings it was trained with
# (the study's config says them) and the per-sample credibility weights (only the figure needs them).
_RUN_ONLY_KEYS = ("signature", "credibility_samples")


@dataclass
class Study:
    """fusions, seeds: in the order trained. runs: fusion -> seed -> the run's result
    (``experiment.train_and_evaluate``), on the main process. models: fusion -> the first seed's
    trained model, the only ones kept (for the figures)."""

    fusions: list[str]
    seeds: list[int]
    runs: dict[str, dict[int, dict]] = field(default_factory=dict)
    models: dict[str, CrossModalVAE] = field(default_factory=dict)

    @property
    def results(self) -> dict[str, dict]:
        """fusion -> the first seed's result: the single run's, or the one the figures show."""
        return {f: self.runs[f][self.seeds[0]] for f in self.fusions}

    @cached_property
    def statistics(self) -> dict | None:
        """``statistics.study_statistics`` over the seeds (of the runs as they are when first asked
        for, once all have run); None with one seed."""
        return study_statistics(self.runs, self.seeds) if len(self.seeds) > 1 else None

    def record(self) -> dict:
        """What results.json holds of the study. One seed: ``{"fusions": {fusion: result}}``. More:
        ``{"seeds": [...], "fusions": {fusion: {"runs": {seed: result without its history}}},
        "statistics": ...}``; each run's own results.json (in its folder, ``dir``) has the rest."""
        def kept(result: dict, *dropped: str) -> dict:
            return {k: v for k, v in result.items() if k not in _RUN_ONLY_KEYS + dropped}

        if len(self.seeds) == 1:
            return {"fusions": {f: kept(r) for f, r in self.results.items()}}
        return {"seeds": list(self.seeds),
                "fusions": {f: {"runs": {str(s): kept(self.runs[f][s], "history") for s in self.seeds}}
                            for f in self.fusions},
                "statistics": self.statistics}


@dataclass
class SweepPoint:
    """One training data corruption of the sweep (``--corruption-sweep``): the fraction, the folder
    its study was written to, and the study (its models already released)."""

    fraction: float
    out: Path
    study: Study
