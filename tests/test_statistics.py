"""Statistics over seeds (examples/common/study.py) against hand-computed values."""

import math

import pytest

from common.study import DIFFERENCES, paired_difference, study_statistics, t_interval

# Student-t quantiles t(0.975, df) from the printed tables.
T_975 = {2: 4.302653, 3: 3.182446}


def test_t_interval_of_known_numbers():
    summary = t_interval([1.0, 2.0, 3.0, 4.0])
    std = math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3)  # sample std, n - 1 = 3
    half = T_975[3] * std / 2  # / sqrt(4)
    assert summary["n"] == 4 and summary["mean"] == 2.5
    assert summary["std"] == pytest.approx(std, rel=1e-12)
    assert summary["half_width"] == pytest.approx(half, rel=1e-6)
    assert summary["ci95"] == pytest.approx([2.5 - half, 2.5 + half], rel=1e-6)
    assert summary["ci95"] == pytest.approx([0.445740, 4.554260], abs=1e-5)


def test_t_interval_leaves_out_missing_values_and_needs_two():
    assert t_interval([3.0, None, float("nan"), 5.0])["mean"] == 4.0
    assert t_interval([3.0, None, float("nan"), 5.0])["n"] == 2
    single = t_interval([7.0])
    assert single == {"mean": 7.0, "std": None, "n": 1, "ci95": None, "half_width": None}
    assert t_interval([])["mean"] is None


def test_paired_difference_of_known_numbers():
    # Differences 1, 2, 0: mean 1, sample std 1, half-width t(0.975, 2) / sqrt(3).
    d = paired_difference([10.0, 12.0, 11.0], [9.0, 10.0, 11.0])
    assert d["per_seed"] == [1.0, 2.0, 0.0]
    assert (d["mean"], d["std"], d["n"]) == (1.0, 1.0, 3)
    assert d["half_width"] == pytest.approx(T_975[2] / math.sqrt(3), rel=1e-6)
    assert d["ci95"] == pytest.approx([-1.484138, 3.484138], abs=1e-5)
    assert not d["excludes_zero"]
    # Differences 1.0, 1.2, 0.9, 1.1: mean 1.05, std sqrt(0.05 / 3); the interval lies above 0.
    d = paired_difference([2.0, 2.2, 1.9, 2.1], [1.0, 1.0, 1.0, 1.0])
    half = T_975[3] * math.sqrt(0.05 / 3) / 2
    assert d["mean"] == pytest.approx(1.05) and d["ci95"] == pytest.approx([1.05 - half, 1.05 + half], rel=1e-6)
    assert d["excludes_zero"]
    assert paired_difference([-2.0, -2.2, -1.9, -2.1], [0.0] * 4)["excludes_zero"]  # below 0 too


def test_paired_difference_pairs_only_seeds_with_both_values():
    d = paired_difference([1.0, None, 3.0], [0.5, 1.0, float("nan")])
    assert d["per_seed"] == [0.5, None, None] and d["n"] == 1 and d["ci95"] is None and not d["excludes_zero"]
    with pytest.raises(ValueError, match="b: expected 3 values"):
        paired_difference([1.0, 2.0, 3.0], [1.0])


def run(epe: float, auroc: float) -> dict:
    return {"metrics": {"0.0": {"mean_epe_mm": epe, "pck_curve": [0.1, 0.2], "num_samples": 4}},
            "credibility": {"rgb": {"auroc": auroc, "auroc_alpha": auroc, "auroc_share": 0.5, "weight_clean": 0.6,
                                    "weight_corrupted": 0.4, "effective_experts": 1.9, "samples": 4}}}


def test_study_statistics_summarises_float_metrics_and_pairs_gpoe_with_each_other_fusion():
    runs = {"moe": {0: run(50.0, 0.5), 1: run(52.0, 0.5)},
            "poe": {0: run(48.0, 0.6), 1: run(51.0, 0.7)},
            "gpoe": {0: run(47.0, 0.9), 1: run(49.0, 0.8)}}
    stats = study_statistics(runs, [0, 1])
    assert stats["seeds"] == [0, 1] and stats["confidence"] == 0.95
    assert set(stats["metrics"]["gpoe"]["0.0"]) == {"mean_epe_mm"}  # no lists, no counts
    assert stats["metrics"]["poe"]["0.0"]["mean_epe_mm"]["mean"] == 49.5
    assert set(stats["differences"]) == {f"{a}-{b}" for a, b in DIFFERENCES} == {"gpoe-poe", "gpoe-moe"}
    epe = stats["differences"]["gpoe-poe"]["metrics"]["0.0"]["mean_epe_mm"]
    assert epe["per_seed"] == [-1.0, -2.0] and epe["mean"] == -1.5
    auroc = stats["differences"]["gpoe-moe"]["credibility"]["rgb"]["auroc"]
    assert auroc["per_seed"] == pytest.approx([0.4, 0.3]) and stats["credibility"]["poe"]["rgb"]["auroc"]["n"] == 2
    # Without gPoE there is nothing to pair.
    assert study_statistics({"poe": runs["poe"], "moe": runs["moe"]}, [0, 1])["differences"] == {}


def test_study_statistics_summarises_and_pairs_every_metric_group_the_runs_hold():
    def joint_run(epe: float, joint: float) -> dict:
        return {**run(epe, 0.5), "metrics_joint": {"0.0": {"mean_epe_mm": joint}, "0.5": {"mean_epe_mm": joint + 3}}}

    runs = {"poe": {0: joint_run(48.0, 30.0), 1: joint_run(51.0, 33.0)},
            "gpoe": {0: joint_run(47.0, 29.0), 1: joint_run(49.0, 30.5)}}
    stats = study_statistics(runs, [0, 1])
    assert stats["metrics_joint"]["gpoe"]["0.5"]["mean_epe_mm"]["mean"] == 32.75
    joint = stats["differences"]["gpoe-poe"]["metrics_joint"]
    assert joint["0.0"]["mean_epe_mm"]["per_seed"] == [-1.0, -2.5] == joint["0.5"]["mean_epe_mm"]["per_seed"]
    assert stats["differences"]["gpoe-poe"]["metrics"]["0.0"]["mean_epe_mm"]["per_seed"] == [-1.0, -2.0]
    assert "metrics_aux" not in stats  # a group no run holds
