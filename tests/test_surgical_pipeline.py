"""The surgical segmentation pipeline end to end, at tiny sizes, on generated data in the real format."""

import json
import math

import numpy as np
import pytest
import torch

import surgical_seg
from common.cli import UsageError
from common.training import setup
from pipeline_checks import check_credibility, check_joint_inference, check_kill_and_resume, check_torchrun
from common.networks import DCGANDecoder
from sim2real.dataset import NUM_CLASSES, Sim2RealDataset

# 7 scenes x 2 views: 8 training views (scenes 1-4) and 2 test views (scene 7).
TINY = ["--split", "scene", "--num-train", "8", "--num-eval", "2", "--epochs", "2", "--batch-size", "4", "--image-size", "16",
        "--num-points", "32", "--latent-dim", "8", "--test-corruption", "0", "0.5", "--test-point-noise", "0", "1",
        "--no-progress"]


def tiny_args(root, out, *extra):
    return ["--data-root", str(root), "--out", str(out)] + TINY + list(extra)


@pytest.mark.parametrize("fusion, credibility", [("moe", "joint"), ("poe", "joint"), ("gpoe", "joint"),
                                                 ("gpoe", "entropy"), ("mopoe", "joint")])
def test_one_training_step_per_fusion(sim2real_root, tmp_path, fusion, credibility):
    args = surgical_seg.parse_args(tiny_args(sim2real_root, tmp_path, "--fusion", fusion, "--credibility", credibility))
    args.grid_size, args.fold_hidden, args.pel_width, args.seg_base = 4, 16, 16, 32
    env = setup("cpu")
    train_set, eval_set = surgical_seg.load_data(args, env)
    assert len(train_set) == 8 and len(eval_set) == 2
    model = surgical_seg.build_model(args)
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
    assert any(key.endswith("->mask") for key in out.terms) and any(key.endswith("->points") for key in out.terms)
    model.eval()
    assert model.predict(batch["rgb"], "mask").shape == (4, NUM_CLASSES, 16, 16)
    convolutions = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert convolutions and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convolutions)


def test_tiny_compare_run_writes_results_and_tables(sim2real_root, tmp_path):
    surgical_seg.main(tiny_args(sim2real_root, tmp_path, "--compare", "--epochs", "1",
                                "--test-corruption", "0", "0.25", "0.7"))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["seed"] == 0 and results["config"]["epochs"] == 1 and results["task"] == "surgical_seg"
    assert set(results["fusions"]) == {"moe", "poe", "gpoe"}
    for fusion, result in results["fusions"].items():
        assert set(result["metrics"]) == {"0.0", "0.25", "0.7"}
        for m in result["metrics"].values():
            assert 0 <= m["iou"] <= m["f1"] <= 1 and m["num_samples"] == 2 and m["pixels"] == 2 * 16 * 16
            present = [v for v in m["iou_per_class"] if v is not None]
            assert len(m["iou_per_class"]) == NUM_CLASSES and math.isclose(m["iou"], sum(present) / len(present))
        assert (result["alpha"] is not None) == (fusion == "gpoe")
        assert (tmp_path / fusion / "checkpoint.pt").is_file()
        check_credibility(result, fusion, samples=2)
        # IoU of two views, from a decoder trained one epoch: predictions of different latents may well agree.
        check_joint_inference(result, "iou", ["0.0", "0.25", "0.7"], ["0.0", "1.0"], distinct=False)
        assert result["metrics_joint"]["0.7"]["num_samples"] == 2
        assert len(result["metrics_aux"]["1.0"]["iou_per_class"]) == NUM_CLASSES
        assert (tmp_path / f"credibility_{fusion}.png").stat().st_size > 0
    assert set(results["fusions"]["gpoe"]["alpha"]["0.7"]) == {"rgb", "points"}
    table4 = json.loads((tmp_path / "table4.json").read_text())["rows"]
    assert len(table4) == 3 * 3
    for row in table4:
        assert row["iou"] == results["fusions"][row["fusion"]]["metrics"][str(row["corruption"])]["iou"]
    table1 = json.loads((tmp_path / "table1.json").read_text())["rows"]
    expected = [(0.0, "poe"), (0.0, "gpoe"), (0.7, "poe"), (0.7, "gpoe")]  # 25 % is no Table 1 level
    assert [(r["corruption"], r["fusion"]) for r in table1] == expected
    assert "| 70% | PoE |" in (tmp_path / "table1.md").read_text()
    assert "| PoE, oracle |" in (tmp_path / "results.md").read_text()
    for name in ("results.md", "table4.md", "iou_vs_corruption.png", "f1_vs_corruption.png", "alpha_gpoe.png",
                 "qualitative.png", "joint_vs_rgb_corruption.png", "joint_vs_points_corruption.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_desync_runs_end_to_end_without_the_papers_pixel_table(sim2real_root, tmp_path):
    surgical_seg.main(tiny_args(sim2real_root, tmp_path, "--compare", "--fusions", "poe", "gpoe", "--epochs", "1",
                                "--max-steps", "1", "--corruption-kind", "desync", "--test-corruption", "0", "1"))
    results = json.loads((tmp_path / "results.json").read_text())
    for fusion, result in results["fusions"].items():
        check_credibility(result, fusion, samples=2, kind="desync")
        check_joint_inference(result, "iou", ["0.0", "1.0"], ["0.0", "1.0"], distinct=False)
    assert not (tmp_path / "table1.md").exists()  # paper Table 1 is of pixel corruption
    assert "IoU @ 100% desync" in (tmp_path / "table4.md").read_text()


def test_kill_and_resume_equals_an_uninterrupted_run(sim2real_root, tmp_path, monkeypatch):
    check_kill_and_resume(surgical_seg.main, lambda out, *extra: tiny_args(sim2real_root, out, *extra), tmp_path, monkeypatch)


def test_more_views_than_the_split_has_is_a_clear_error(sim2real_root, tmp_path):
    args = surgical_seg.parse_args(tiny_args(sim2real_root, tmp_path, "--num-train", "9"))
    with pytest.raises(UsageError, match=r"--num-train: 9 views requested, but the train split \(scenes 1, 2, 3, 4\)"):
        surgical_seg.load_data(args, setup("cpu"))


def test_random_split_tests_on_views_of_every_scene(sim2real_root, tmp_path):
    def args_of(*extra):
        return surgical_seg.parse_args(tiny_args(sim2real_root, tmp_path, "--split", "random", "--num-train", "10",
                                                 "--num-eval", "3", *extra))

    args = args_of()
    parts = surgical_seg.split_indices(14, args)
    assert len(parts["test"]) == 3 and len(parts["train"]) == 10 and not set(parts["test"]) & set(parts["train"])
    for other in (surgical_seg.split_indices(14, args_of("--seed", "3")), surgical_seg.split_indices(14, args)):
        assert all(np.array_equal(parts[k], other[k]) for k in parts)  # every seed of a study tests the same views
    assert surgical_seg.builtin_views_per_scene(args) == 2  # 13 views over 7 scenes
    train_set, eval_set = surgical_seg.load_data(args, setup("cpu"))
    every = Sim2RealDataset(sim2real_root, scenes=range(1, 8), image_size=16, num_points=32)
    for dataset, split in ((train_set, "train"), (eval_set, "test")):
        assert len(dataset) == len(parts[split])
        for i, j in enumerate(parts[split]):
            assert torch.equal(dataset.datasets["mask"][i], every[j]["mask"])
    assert len({every.views[j][0] for j in parts["train"]}) >= 5  # 10 of 14 views reach 5 scenes at least
    with pytest.raises(UsageError, match="--num-train: 12 views requested, but the 7 scenes have 11 besides the 3 test"):
        surgical_seg.split_indices(14, args_of("--num-train", "12"))
    with pytest.raises(UsageError, match="--num-eval: 15 views requested, but the 7 scenes have 14"):
        surgical_seg.split_indices(14, args_of("--num-eval", "15"))
    defaults = surgical_seg.parse_args(["--data-root", str(sim2real_root), "--split", "random"])
    defaults.num_train = defaults.num_eval = None
    assert [len(v) for v in surgical_seg.split_indices(14, defaults).values()] == [1, 13]  # a tenth tests


def test_unseen_scenes_are_left_out_of_training_and_tested_as_well(sim2real_root, tmp_path, capsys):
    extra = ["--split", "random", "--unseen-scenes", "7", "--num-train", "8", "--num-eval", "2"]
    args = surgical_seg.parse_args(tiny_args(sim2real_root, tmp_path, *extra))
    train_set, eval_set, unseen_set = surgical_seg.load_data(args, setup("cpu"))
    seen = Sim2RealDataset(sim2real_root, scenes=range(1, 7), image_size=16, num_points=32)
    parts = surgical_seg.split_indices(len(seen), args)
    for dataset, split in ((train_set, "train"), (eval_set, "test")):
        assert [seen.views[j][0] for j in parts[split]] and all(seen.views[j][0] != 7 for j in parts[split])
        for i, j in enumerate(parts[split]):
            assert torch.equal(dataset.datasets["mask"][i], seen[j]["mask"])
    scene7 = Sim2RealDataset(sim2real_root, scenes=[7], image_size=16, num_points=32)
    assert all(torch.equal(unseen_set.datasets["mask"][i], scene7[i]["mask"]) for i in range(2))
    surgical_seg.main(tiny_args(sim2real_root, tmp_path, *extra, "--compare", "--fusions", "poe", "gpoe", "--seeds",
                                "2", "--epochs", "1"))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["splits"]["unseen"] == [7] and 7 not in results["splits"]["scenes"]
    run = results["fusions"]["gpoe"]["runs"]["1"]
    for group in ("metrics", "metrics_joint", "metrics_oracle", "metrics_aux", "metrics_joint_aux_corrupted"):
        assert list(run[f"{group}_unseen"]) == list(run[group])
        assert all(m["num_samples"] == 2 for m in run[f"{group}_unseen"].values())
    assert run["metrics_unseen"] != run["metrics"]  # other views
    difference = results["statistics"]["differences"]["gpoe-poe"]["metrics_joint_unseen"]["0.5"]["iou"]
    assert len(difference["per_seed"]) == 2
    assert "Scenes never seen in training (scene 7, 2 views" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "iou_unseen_vs_corruption.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        surgical_seg.parse_args(tiny_args(sim2real_root, tmp_path, "--unseen-scenes", "7"))
    assert "--unseen-scenes: expected some of the 7 scenes with --split random" in capsys.readouterr().err


def test_image_size_must_suit_the_segmentation_decoder(sim2real_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        surgical_seg.parse_args(tiny_args(sim2real_root, tmp_path, "--image-size", "48"))
    assert info.value.code == 2
    assert "argument --image-size: expected a power of two >= 8" in capsys.readouterr().err


def test_intrinsics_are_recorded_with_their_source(sim2real_root, tmp_path):
    surgical_seg.main(tiny_args(sim2real_root, tmp_path / "default", "--epochs", "1", "--max-steps", "1"))
    surgical_seg.main(tiny_args(sim2real_root, tmp_path / "given", "--epochs", "1", "--max-steps", "1",
                                "--intrinsics", "300", "310", "250", "120"))
    default = json.loads((tmp_path / "default" / "results.json").read_text())["intrinsics"]
    given = json.loads((tmp_path / "given" / "results.json").read_text())["intrinsics"]
    assert [default[k] for k in ("fx", "fy", "cx", "cy")] == pytest.approx([256.0, 256.0, 255.5, 127.5])
    assert default["source"].startswith("assumed: a pinhole with a 90 degree horizontal field of view")
    assert (given["fx"], given["fy"], given["cx"], given["cy"], given["source"]) == (300, 310, 250, 120, "--intrinsics")


def test_fewer_views_are_spread_over_the_split(sim2real_root, tmp_path):
    args = surgical_seg.parse_args(tiny_args(sim2real_root, tmp_path, "--num-train", "4"))
    train_set, _ = surgical_seg.load_data(args, setup("cpu"))
    full = Sim2RealDataset(sim2real_root, "train", image_size=16, num_points=32)
    # Views 0, 2, 5, 7 of the 8: one of every scene, not the first two scenes.
    for i, j in enumerate([0, 2, 5, 7]):
        assert torch.equal(train_set.datasets["mask"][i], full[j]["mask"])


def test_intrinsics_option_reaches_the_point_clouds(sim2real_root, tmp_path):
    args = surgical_seg.parse_args(tiny_args(sim2real_root, tmp_path, "--intrinsics", "300", "310", "250", "120"))
    K = np.array([[300.0, 0, 250], [0, 310, 120], [0, 0, 1]])
    assert np.array_equal(surgical_seg.intrinsics_matrix(args), K)
    train_set, _ = surgical_seg.load_data(args, setup("cpu"))
    expected = Sim2RealDataset(sim2real_root, "train", image_size=16, num_points=32, intrinsics=K)[0]["points"]
    default = Sim2RealDataset(sim2real_root, "train", image_size=16, num_points=32)[0]["points"]
    assert torch.equal(train_set.datasets["points"][0], expected) and not torch.equal(expected, default)


def test_segmentation_decoder_shapes_and_channel_floor():
    decoder = DCGANDecoder(8, NUM_CLASSES, out_size=32, base=64, min_channels=16)
    convs = [m for m in decoder.net if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [c.out_channels for c in convs] == [32, 16, NUM_CLASSES]
    assert decoder.net[-1] is convs[-1]  # the logits come straight from the last transposed convolution
    assert decoder(torch.randn(2, 8)).shape == (2, NUM_CLASSES, 32, 32)
    with pytest.raises(ValueError, match="out_size: expected a power of two"):
        DCGANDecoder(8, NUM_CLASSES, out_size=48)


def test_two_process_torchrun_on_cpu(sim2real_root, tmp_path):
    check_torchrun("surgical_seg.py", tiny_args(sim2real_root, tmp_path), tmp_path)
