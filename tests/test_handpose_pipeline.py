"""The RHD hand-pose pipeline end to end, at tiny sizes, on generated data in the real format."""

import json

import pytest
import torch

import handpose_rhd
import rhd.dataset
from common.cli import provenance
from common.training import setup
from pipeline_checks import check_credibility, check_joint_inference, check_kill_and_resume, check_torchrun

TINY = ["--num-train", "8", "--num-eval", "4", "--epochs", "2", "--batch-size", "4", "--crop-size", "32",
        "--num-points", "32", "--latent-dim", "8", "--test-corruption", "0", "0.5", "--test-point-noise", "0", "1",
        "--no-progress"]
# Narrower networks, for the runs that train several models.
SMALL = ["--rgb-width", "8", "--pel-width", "16", "--grid-size", "4", "--fold-hidden", "16", "--keypoint-hidden", "16"]


def tiny_args(rhd_root, out, *extra):
    return ["--data-root", str(rhd_root), "--out", str(out)] + TINY + list(extra)


@pytest.mark.parametrize("fusion, credibility", [("moe", "joint"), ("poe", "joint"), ("gpoe", "joint"),
                                                 ("gpoe", "entropy"), ("mopoe", "joint")])
def test_one_training_step_per_fusion(rhd_root, tmp_path, fusion, credibility):
    args = handpose_rhd.parse_args(tiny_args(rhd_root, tmp_path, "--fusion", fusion, "--credibility", credibility))
    args.grid_size, args.fold_hidden, args.pel_width, args.keypoint_hidden = 4, 16, 16, 16
    env = setup("cpu")
    train_set, _ = handpose_rhd.load_data(args, env)
    model = handpose_rhd.build_model(args)
    batch = {k: v[:4] for k, v in train_set.datasets.items()}
    out = model(batch, return_weights=True)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name in ("rgb", "points"):
        grads = [p.grad for p in model.encoders[name].parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)
    # Every fusion returns its experts' weights (gPoE's alpha, PoE's precision shares, MoE's and
    # MoPoE's mixture weights of the subsets holding each modality), summing to 1 over the modalities.
    torch.testing.assert_close(out.weights.float().sum(0), torch.ones(out.weights.shape[1:]))


def test_tiny_end_to_end_run_writes_results(rhd_root, tmp_path):
    handpose_rhd.main(tiny_args(rhd_root, tmp_path, "--fusion", "gpoe", "--epochs", "1"))
    results = json.loads((tmp_path / "results.json").read_text())
    metrics = results["fusions"]["gpoe"]["metrics"]
    assert set(metrics) == {"0.0", "0.5"}
    for m in metrics.values():
        assert m["mean_epe_mm"] > 0 and 0 <= m["auc_20_50"] <= 1 and m["num_samples"] == 4
    assert results["seed"] == 0 and results["config"]["epochs"] == 1
    provenance = results["provenance"]
    assert {"num_train", "epochs", "crop_size", "test_corruption"} <= set(provenance["command_line"])
    assert "lr" in provenance["project_choice"] and provenance["paper"] == {}  # the demo's sizes are ours
    assert provenance["rgb_init"].startswith("random")
    assert set(results["fusions"]["gpoe"]["alpha"]["0.5"]) == {"rgb", "points"}
    check_credibility(results["fusions"]["gpoe"], "gpoe", samples=4)
    check_joint_inference(results["fusions"]["gpoe"], "mean_epe_mm", ["0.0", "0.5"], ["0.0", "1.0"])
    assert {"test_point_noise"} <= set(provenance["command_line"]) and results["config"]["test_point_noise"] == [0, 1]
    markdown = (tmp_path / "results.md").read_text()
    assert "| gPoE, joint |" in markdown and "| gPoE, points alone |" in markdown and "@ σ 1 |" in markdown
    assert "signature" not in results["fusions"]["gpoe"] and "credibility_samples" not in results["fusions"]["gpoe"]
    assert "statistics" not in results and "seeds" not in results  # one seed
    assert "Credibility on held-out samples" in (tmp_path / "results.md").read_text()
    for name in ("results.md", "epe_vs_corruption.png", "pck_gpoe.png", "alpha_gpoe.png", "credibility_gpoe.png",
                 "qualitative.png", "joint_vs_rgb_corruption.png", "joint_vs_points_corruption.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_desync_corrupts_training_test_and_held_out_samples(rhd_root, tmp_path):
    handpose_rhd.main(tiny_args(rhd_root, tmp_path, "--fusion", "gpoe", "--epochs", "1", "--corruption-kind", "desync",
                                "--data-corruption", "0.5", "--test-corruption", "0", "1", *SMALL))
    results = json.loads((tmp_path / "results.json").read_text())
    result = results["fusions"]["gpoe"]
    assert results["config"]["corruption_kind"] == "desync"
    assert any("corrupted_points=1" in key for key in result["history"][0])  # desync corrupts the points in training
    check_credibility(result, "gpoe", samples=4, kind="desync")
    # A level of the points is then a fraction desynchronised, as the RGB's: --test-corruption's.
    check_joint_inference(result, "mean_epe_mm", ["0.0", "1.0"], ["0.0", "1.0"])
    markdown = (tmp_path / "results.md").read_text()
    assert "@ 100% desync |" in markdown and "RGB desynchronised, points clean" in markdown
    assert "rgb: desynchronised, points: desynchronised" in markdown


def test_kill_and_resume_equals_an_uninterrupted_run(rhd_root, tmp_path, monkeypatch):
    check_kill_and_resume(handpose_rhd.main, lambda out, *extra: tiny_args(rhd_root, out, *extra), tmp_path, monkeypatch)


def test_two_process_torchrun_on_cpu(rhd_root, tmp_path):
    check_torchrun("handpose_rhd.py", tiny_args(rhd_root, tmp_path), tmp_path)


def test_results_say_which_settings_come_from_the_paper(tmp_path):
    args = handpose_rhd.parse_args(["--preset", "full", "--epochs", "3", "--out", str(tmp_path)])
    record = provenance(args, handpose_rhd.PRESETS, handpose_rhd.FROM_PAPER["full"])
    assert set(record["paper"]) == {"num_train", "num_eval", "test_corruption"}
    assert "41258" in record["paper"]["num_train"] and "Table 3" in record["paper"]["test_corruption"]
    assert record["command_line"] == ["epochs"]
    assert {"lr", "batch_size", "latent_dim", "crop_size", "num_points", "beta", "test_point_noise"} <= set(
        record["project_choice"])
    parts = [set(record["paper"]), set(record["command_line"]), set(record["project_choice"])]
    assert set().union(*parts) == set(handpose_rhd.PRESETS["full"]) | {"test_corruption", "test_point_noise"}
    assert sum(map(len, parts)) == len(handpose_rhd.PRESETS["full"]) + 2  # each setting in one place
    assert args.eval_batch_size == args.batch_size == 64 and not args.in_memory


def test_compare_can_include_mopoe_and_records_each_fusions_credibility(rhd_root, tmp_path):
    handpose_rhd.main(tiny_args(rhd_root, tmp_path, "--compare", "--fusions", "poe", "gpoe", "mopoe", "--epochs", "1",
                                *SMALL))
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["fusions"]) == {"poe", "gpoe", "mopoe"}
    assert results["fusions"]["mopoe"]["metrics"]["0.0"]["mean_epe_mm"] > 0
    assert "MoPoE" in (tmp_path / "results.md").read_text()
    for fusion, result in results["fusions"].items():
        check_credibility(result, fusion, samples=4)
        check_joint_inference(result, "mean_epe_mm", ["0.0", "0.5"], ["0.0", "1.0"])
        assert (tmp_path / f"credibility_{fusion}.png").stat().st_size > 0
        # Each run's own results.json keeps what its study's reuse and figure need.
        own = json.loads((tmp_path / fusion / "results.json").read_text())
        assert own["signature"]["fusion"] == fusion and own["seed"] == 0
        assert len(own["credibility_samples"]["rgb"]["weight"]) == 4
    # MoPoE's weights are its subsets': a modality's is the share of the subsets holding it.
    assert results["fusions"]["mopoe"]["credibility"]["rgb"]["weight_clean"] == pytest.approx(0.5)


def test_the_first_run_of_the_built_in_data_loads_what_a_later_run_decodes(tmp_path, monkeypatch):
    """The first run takes its samples from the processes that render the built-in frames; a run finding them cached
    decodes the files. Both must train on the very same tensors."""
    decoded_frames = []
    real_read_frame = rhd.dataset.read_frame

    def counting_read_frame(*args, **kwargs):
        decoded_frames.append(args[1:3])
        return real_read_frame(*args, **kwargs)

    monkeypatch.setattr(rhd.dataset, "read_frame", counting_read_frame)
    args = handpose_rhd.parse_args(["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), *TINY])
    env = setup("cpu")
    first = handpose_rhd.load_data(args, env)
    assert len(list((tmp_path / "cache").glob("rhd_builtin*"))) == 1 and decoded_frames == []
    later = handpose_rhd.load_data(args, env)
    # The 8 training and 4 evaluation samples (TINY), and each split's first once more (load_splits' check).
    assert len(decoded_frames) == 8 + 4 + 2
    for made, decoded in zip(first, later):
        assert made.datasets.keys() == decoded.datasets.keys()
        for key, value in decoded.datasets.items():
            assert torch.equal(made.datasets[key], value), key
