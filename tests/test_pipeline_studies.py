"""Studies over seeds (--seeds, the study preset) and the sweep over the training data corruption
(--corruption-sweep), end to end at tiny sizes on generated data in the real formats."""

import json

import pytest
import torch
import torchvision

import handpose_rhd
import surgical_seg
from common import study, training
from common.training import write_json
from common.cli import provenance, run_signature
from common.evaluation import group_levels

HANDPOSE = ["--num-train", "8", "--num-eval", "4", "--epochs", "1", "--batch-size", "4", "--crop-size", "32",
            "--num-points", "32", "--latent-dim", "8", "--rgb-width", "8", "--pel-width", "16", "--grid-size", "4",
            "--fold-hidden", "16", "--keypoint-hidden", "16", "--test-corruption", "0", "0.5", "--test-point-noise", "0",
            "1", "--no-progress"]
SURGICAL = ["--num-train", "8", "--num-eval", "2", "--epochs", "1", "--batch-size", "4", "--image-size", "16",
            "--num-points", "32", "--latent-dim", "8", "--rgb-width", "8", "--pel-width", "16", "--grid-size", "4",
            "--fold-hidden", "16", "--seg-base", "32", "--seg-min-channels", "8", "--test-corruption", "0", "0.5",
            "--test-point-noise", "0", "1", "--no-progress"]
REUSED = "its results loaded (not retrained)"


def handpose_args(root, out, *extra):
    return ["--data-root", str(root), "--out", str(out)] + HANDPOSE + list(extra)


def checkpoint_times(out) -> dict:
    return {str(path.relative_to(out)): path.stat().st_mtime_ns for path in sorted(out.rglob("checkpoint.pt"))}


def test_seeds_give_statistics_and_a_second_invocation_reuses_the_finished_seeds(rhd_root, tmp_path, capsys):
    argv = handpose_args(rhd_root, tmp_path, "--compare", "--fusions", "poe", "gpoe", "--seeds", "2")
    handpose_rhd.main(argv)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["seeds"] == [0, 1]
    for fusion in ("poe", "gpoe"):
        runs = results["fusions"][fusion]["runs"]
        assert set(runs) == {"0", "1"} and runs["0"]["metrics"] != runs["1"]["metrics"]  # seeds differ
        assert set(runs["1"]["credibility"]) == {"rgb", "points"} and "history" not in runs["1"]
        for seed in (0, 1):
            assert (tmp_path / fusion / f"seed{seed}" / "checkpoint.pt").is_file()
            assert json.loads((tmp_path / fusion / f"seed{seed}" / "results.json").read_text())["seed"] == seed
    statistics = results["statistics"]
    epe = statistics["metrics"]["gpoe"]["0.5"]["mean_epe_mm"]
    values = [results["fusions"]["gpoe"]["runs"][s]["metrics"]["0.5"]["mean_epe_mm"] for s in ("0", "1")]
    assert epe["n"] == 2 and epe["mean"] == pytest.approx(sum(values) / 2)
    assert epe["ci95"][0] < epe["mean"] < epe["ci95"][1]
    assert set(statistics["differences"]) == {"gpoe-poe"}  # no MoE trained
    difference = statistics["differences"]["gpoe-poe"]
    poe = [results["fusions"]["poe"]["runs"][s]["metrics"]["0.5"]["mean_epe_mm"] for s in ("0", "1")]
    assert difference["metrics"]["0.5"]["mean_epe_mm"]["per_seed"] == pytest.approx([g - p for g, p in zip(values, poe)])
    assert set(difference["credibility"]["rgb"]["auroc"]) >= {"per_seed", "mean", "ci95", "excludes_zero"}
    joint = [results["fusions"][f]["runs"][s]["metrics_joint_aux_corrupted"]["1.0"]["mean_epe_mm"]
             for f in ("gpoe", "poe") for s in ("0", "1")]
    assert difference["metrics_joint_aux_corrupted"]["1.0"]["mean_epe_mm"]["per_seed"] == pytest.approx(
        [joint[0] - joint[2], joint[1] - joint[3]])
    assert statistics["metrics_oracle"]["poe"]["0.5"]["mean_epe_mm"]["n"] == 2
    assert statistics["credibility"]["poe"]["points"]["auroc"]["n"] == 2
    markdown = (tmp_path / "results.md").read_text()
    assert "seeds 0-1" in markdown and " ± " in markdown and "Paired differences over the 2 seeds" in markdown
    assert markdown.count("Paired differences of the joint over the 2 seeds") == 2
    assert "exclude 0" in markdown or "No paired difference's 95 % interval excludes 0." in markdown
    for name in ("epe_vs_corruption.png", "credibility_poe.png", "credibility_gpoe.png", "qualitative.png"):
        assert (tmp_path / name).stat().st_size > 0

    times = checkpoint_times(tmp_path)
    capsys.readouterr()
    handpose_rhd.main(argv)
    printed = capsys.readouterr().out
    assert printed.count(REUSED) == 4 and "epoch 1/1" not in printed
    assert checkpoint_times(tmp_path) == times
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["statistics"] == statistics and again["fusions"] == results["fusions"]

    # Another configuration is another run: trained again, not loaded.
    handpose_rhd.main(argv + ["--fusions", "gpoe", "--lr", "1e-4"])
    printed = capsys.readouterr().out
    assert REUSED not in printed and printed.count("epoch 1/1") == 2


def test_a_killed_seed_resumes_from_its_checkpoint(rhd_root, tmp_path, monkeypatch, capsys):
    argv = handpose_args(rhd_root, tmp_path, "--fusion", "gpoe", "--seeds", "2", "--epochs", "2")
    original = training.train_one_epoch

    def killed_in_seed_1(*args, **kwargs):
        if args[5].seed == 1 and args[4] == 1:  # (..., epoch, args, ...): seed 1's second epoch
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "train_one_epoch", killed_in_seed_1)
    with pytest.raises(KeyboardInterrupt):
        handpose_rhd.main(argv)
    monkeypatch.setattr(training, "train_one_epoch", original)
    assert (tmp_path / "seed0" / "results.json").is_file() and not (tmp_path / "seed1" / "results.json").exists()
    capsys.readouterr()
    handpose_rhd.main(argv + ["--resume"])
    printed = capsys.readouterr().out
    assert f"gPoE, seed 0 (run 1 of 2): finished in {tmp_path / 'seed0'}, {REUSED}" in printed
    assert f"resumed from {tmp_path / 'seed1' / 'checkpoint.pt'} after epoch 1" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert [h["epoch"] for h in json.loads((tmp_path / "seed1" / "results.json").read_text())["history"]] == [1, 2]
    assert results["statistics"]["metrics"]["gpoe"]["0.0"]["mean_epe_mm"]["n"] == 2
    assert results["statistics"]["differences"] == {}  # one fusion: nothing to pair


def test_corruption_sweep_trains_each_fraction_and_plots_the_metric_against_it(rhd_root, tmp_path):
    handpose_rhd.main(handpose_args(rhd_root, tmp_path, "--compare", "--fusions", "poe", "gpoe",
                                    "--corruption-sweep", "0", "0.5", "--seeds", "2"))
    results = json.loads((tmp_path / "results.json").read_text())
    sweep = results["sweep"]
    assert sweep["metric"] == "mean_epe_mm" and sweep["fractions"] == [0.0, 0.5]
    assert set(sweep["points"]) == {"0.0", "0.5"}
    for fraction, folder in (("0.0", "corruption0"), ("0.5", "corruption0.5")):
        point = sweep["points"][fraction]
        assert point["out"] == str(tmp_path / folder) and point["seeds"] == [0, 1]
        assert set(point["statistics"]["differences"]) == {"gpoe-poe"}
        own = json.loads((tmp_path / folder / "results.json").read_text())
        assert own["config"]["data_corruption"] == float(fraction)
        assert "data_corruption" in own["provenance"]["command_line"]  # set by --corruption-sweep
        for fusion in ("poe", "gpoe"):
            assert (tmp_path / folder / fusion / "seed1" / "checkpoint.pt").is_file()
        assert (tmp_path / folder / "epe_vs_corruption.png").stat().st_size > 0
    # The fraction reaches training: without corrupted samples gPoE's history has no corrupted group.
    history = json.loads((tmp_path / "corruption0" / "gpoe" / "seed0" / "results.json").read_text())["history"]
    assert not any("corrupted_rgb=1" in key for key in history[0])
    history = json.loads((tmp_path / "corruption0.5" / "gpoe" / "seed0" / "results.json").read_text())["history"]
    assert any("corrupted_rgb=1" in key for key in history[0])
    markdown = (tmp_path / "results.md").read_text()
    assert "sweep over the training data corruption" in markdown
    assert "| 0% | PoE |" in markdown and "| 50% | gPoE − PoE |" in markdown
    assert (tmp_path / "training_corruption_sweep.png").stat().st_size > 0


def test_sweep_of_one_run_keeps_each_runs_results_apart_from_the_fractions(rhd_root, tmp_path, capsys):
    # One fusion, one seed: the run's results.json must not be the fraction's study summary, or a rerun trains again.
    argv = handpose_args(rhd_root, tmp_path, "--corruption-sweep", "0", "0.5")
    handpose_rhd.main(argv)
    for folder in ("corruption0", "corruption0.5"):
        own = json.loads((tmp_path / folder / "gpoe" / "results.json").read_text())
        assert own["signature"] and (tmp_path / folder / "gpoe" / "checkpoint.pt").is_file()
        assert set(json.loads((tmp_path / folder / "results.json").read_text())["fusions"]) == {"gpoe"}
    capsys.readouterr()
    handpose_rhd.main(argv)
    printed = capsys.readouterr().out
    assert printed.count(REUSED) == 2, printed


def test_surgical_tables_over_seeds_carry_intervals(sim2real_root, tmp_path):
    surgical_seg.main(["--data-root", str(sim2real_root), "--out", str(tmp_path)] + SURGICAL
                      + ["--compare", "--fusions", "poe", "gpoe", "--seeds", "2"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["statistics"]["metrics"]) == {"poe", "gpoe"}
    for name in ("table1.json", "table4.json"):
        rows = json.loads((tmp_path / name).read_text())["rows"]
        assert rows and all(row["seeds"] == 2 and len(row["iou_ci95"]) == 2 for row in rows)
        gpoe = next(row for row in rows if row["fusion"] == "gpoe" and row["corruption"] == 0.5)
        assert gpoe["iou"] == results["statistics"]["metrics"]["gpoe"]["0.5"]["iou"]["mean"]
    assert " ± " in (tmp_path / "table1.md").read_text()
    markdown = (tmp_path / "results.md").read_text()
    assert "Paired differences over the 2 seeds" in markdown and "Per class (seed 0)" in markdown


@pytest.mark.parametrize("script", [handpose_rhd, surgical_seg], ids=["handpose", "surgical"])
def test_the_study_preset_is_the_demo_compared_over_seeds(script, tmp_path):
    args = script.parse_args(["--preset", "study", "--out", str(tmp_path)])
    demo = script.parse_args(["--out", str(tmp_path)])
    assert args.compare and args.seeds == script.PRESETS["study"]["seeds"] > 1 and not demo.compare and demo.seeds == 1
    for key, value in script.PRESETS["demo"].items():
        if key != "seeds":
            assert getattr(args, key) == value, key
    record = provenance(args, script.PRESETS, script.FROM_PAPER["study"])
    assert {"seeds", "compare"} <= set(record["project_choice"]) and record["command_line"] == []
    args = script.parse_args(["--preset", "study", "--seeds", "3", "--no-compare", "--out", str(tmp_path)])
    assert args.seeds == 3 and not args.compare
    assert set(provenance(args, script.PRESETS, script.FROM_PAPER["study"])["command_line"]) == {"seeds", "compare"}


def test_a_run_trained_from_other_start_weights_is_not_reused(rhd_root, tmp_path):
    """The RGB encoder's start weights define the model: a finished run of random initialisation is not
    taken for a run with --rgb-weights in the same --out (nor resumed by one), and results.json says where
    the weights came from; the same weights in another file are the same start."""
    weights, copy = tmp_path / "resnet18.pth", tmp_path / "copy.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    copy.write_bytes(weights.read_bytes())

    def args_of(*extra):
        return handpose_rhd.parse_args(handpose_args(rhd_root, tmp_path / "out", "--rgb-width", "64", *extra))

    random_init, from_file, from_copy = args_of(), args_of("--rgb-weights", str(weights)), args_of("--rgb-weights", str(copy))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "checkpoint.pt").write_bytes(b"")
    groups = {group: {str(lv): {} for lv in levels} for group, levels in group_levels(from_file).items()}
    write_json(tmp_path / "out" / "results.json", {"signature": run_signature(from_file), **groups})
    assert study.finished_run(from_file) is not None and study.finished_run(from_copy) is not None
    assert study.finished_run(random_init) is None
    # A result without joint inference (of an older version), or at other levels of it, is evaluated again.
    write_json(tmp_path / "out" / "results.json", {"signature": run_signature(from_file), "metrics": groups["metrics"]})
    assert study.finished_run(from_file) is None
    assert study.finished_run(args_of("--rgb-weights", str(weights), "--test-point-noise", "0", "2")) is None
    assert run_signature(random_init) != run_signature(from_file) == run_signature(from_copy)
    assert provenance(from_file, handpose_rhd.PRESETS, {})["rgb_init"].startswith(f"weights from --rgb-weights {weights}")
