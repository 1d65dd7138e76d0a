"""benchmarks/when_gpoe_helps.py at a tiny size: the results' structure, and properties of the faults that hold from
the first steps of training: the oracle bound beats a desynchronised fusion, desynchronisation is invisible to PoE's
precision shares, and visible noise seen in training is not invisible to gPoE's alpha."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SEEDS = [0, 1]
FRACTIONS = [0.0, 0.4]
FUSIONS = ("poe", "gpoe-joint")


def load():
    spec = importlib.util.spec_from_file_location("when_gpoe_helps", ROOT / "benchmarks" / "when_gpoe_helps.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["when_gpoe_helps"] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load()


@pytest.fixture(scope="module")
def tiny(bench):
    return bench.Settings(train_samples=1024, test_samples=256, steps=80, batch_size=256)


@pytest.fixture(scope="module")
def results(bench, tiny):
    torch_threads = torch.get_num_threads()
    try:
        return bench.run(SEEDS, FRACTIONS, FUSIONS, tiny, workers=1, progress=False)
    finally:
        torch.set_num_threads(torch_threads)  # run_task keeps to one thread, as a worker process does


def metrics(results, seed, kind, fraction):
    return next(r["metrics"] for r in results if (r["seed"], r["kind"], r["fraction"]) == (seed, kind, fraction))


def test_every_condition_trains_every_fusion_and_reports_it(bench, results, tmp_path):
    # Clean training once per seed (tested with both faults), each fault at each other fraction.
    assert [(r["seed"], r["kind"], r["fraction"]) for r in results] == [
        (s, k, f) for s in SEEDS for f, kinds in ((0.0, [None]), (0.4, ["noise", "desync"])) for k in kinds]
    clean_run = metrics(results, 0, None, 0.0)
    assert set(clean_run) == set(FUSIONS)
    assert set(clean_run["poe"]) == {"clean", "clean_weights"} | {f"{k}/{m}" for k in bench.FAULTS
                                                                  for m in ("error", "oracle", "auroc", "single")}
    for fusion in FUSIONS:  # every fusion's weights share out a whole
        assert sum(clean_run[fusion]["clean_weights"]) == pytest.approx(1.0, abs=1e-6)
    assert "noise/single" not in clean_run["gpoe-joint"]  # the single sensor is read from PoE's model only
    assert set(metrics(results, 0, "desync", 0.4)["poe"]) == {"clean", "clean_weights", "desync/error", "desync/oracle",
                                                              "desync/auroc", "desync/single"}
    stats = bench.statistics(results, SEEDS, FRACTIONS, FUSIONS)
    assert set(stats) == {"noise@0", "noise@0.4", "desync@0", "desync@0.4"}
    cell = stats["desync@0.4"]
    per_seed = [metrics(results, s, "desync", 0.4) for s in SEEDS]
    difference = [m["gpoe-joint"]["desync/error"] - m["poe"]["desync/error"] for m in per_seed]
    assert cell["fusions"]["gpoe-joint"]["error_minus_poe"]["per_seed"] == pytest.approx(difference)
    assert cell["fusions"]["poe"]["error"]["n"] == 2 and "error_minus_poe" not in cell["fusions"]["poe"]
    first_sensor = [m["poe"]["clean_weights"][0] for m in per_seed]
    assert cell["fusions"]["poe"]["clean_weights"][0]["mean"] == pytest.approx(sum(first_sensor) / 2)
    # Clean training is one model per seed: its two faults' cells share its clean error.
    assert stats["noise@0"]["fusions"]["poe"]["clean"] == stats["desync@0"]["fusions"]["poe"]["clean"]
    table = bench.markdown(stats, FRACTIONS, FUSIONS, SEEDS)
    assert table.count("| 0.4 | gPoE joint |") == 2 and table.count("best single sensor") == 4
    bench.plot(stats, FRACTIONS, FUSIONS, tmp_path / "plot.png", len(SEEDS))
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    json.dumps(stats)  # results.json holds them as they are


def test_the_same_seed_gives_the_same_numbers(bench, tiny, results):
    again = bench.run_task(bench.Task(1, "desync", 0.4, FUSIONS, tiny))
    assert again["metrics"] == metrics(results, 1, "desync", 0.4)


def test_the_oracle_bound_beats_a_desynchronised_fusion(results):
    # A desynchronised sensor is confidently wrong; masking it out from the flags leaves two clean sensors.
    for seed in SEEDS:
        for fusion in FUSIONS:
            run = metrics(results, seed, None, 0.0)[fusion]
            assert run["desync/oracle"] < 0.8 * run["desync/error"]


def test_desynchronisation_is_invisible_to_the_precision_share(results):
    # The replaced reading is a real one: the encoder's variance, hence PoE's weight, cannot tell it apart.
    for seed in SEEDS:
        for fraction, kind in ((0.0, None), (0.4, "desync")):
            assert abs(metrics(results, seed, kind, fraction)["poe"]["desync/auroc"] - 0.5) < 0.1


def test_visible_noise_seen_in_training_lowers_alpha(results):
    # Trained with heavy noise on 40 % of each sensor's samples, the joint credibility network reads it off the features
    # within a few dozen steps (the encoders' variances take longer: PoE's share is left out at this size).
    for seed in SEEDS:
        assert metrics(results, seed, "noise", 0.4)["gpoe-joint"]["noise/auroc"] > 0.75


def test_unknown_fault_and_fusion_are_named(bench, tiny):
    with pytest.raises(ValueError, match="kind: expected one of"):
        bench.fault("pixels")
    with pytest.raises(ValueError, match="fusion: expected one of"):
        bench.make_fusion("product", tiny)
