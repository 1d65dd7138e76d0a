"""Streamed data (decoded from disk per item, in the loader's worker processes) gives exactly what
the in-memory path gives, sample for sample and batch for batch; --max-steps stops training after
that many optimizer steps, as the first steps of the full run."""

import argparse
import json

import pytest
import torch

import handpose_rhd
import surgical_seg
from torch.utils.data import StackDataset

from common import data, training
from common.data import eval_loader
from common.training import load_checkpoint, make_loader, start_epoch
from rhd.synthetic import generate_rhd
from sim2real.synthetic import generate_sim2real

TINY = ["--epochs", "2", "--batch-size", "4", "--num-points", "32", "--latent-dim", "8", "--grid-size", "4",
        "--fold-hidden", "16", "--pel-width", "16", "--test-corruption", "0", "0.5", "--no-progress"]
SIZES = {handpose_rhd: ["--num-train", "8", "--num-eval", "4", "--crop-size", "32", "--keypoint-hidden", "16"],
         surgical_seg: ["--num-train", "8", "--num-eval", "2", "--image-size", "16", "--seg-base", "32"]}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return {handpose_rhd: generate_rhd(tmp_path_factory.mktemp("rhd"), 8, 4, seed=0, progress=False),
            surgical_seg: generate_sim2real(tmp_path_factory.mktemp("sim2real"), 7, 2, progress=False)}


def assert_same_items(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("noise", ["fixed", "fresh"])
@pytest.mark.parametrize("script", [handpose_rhd, surgical_seg], ids=["rhd", "sim2real"])
def test_streamed_data_equals_the_in_memory_data(script, noise, roots, tmp_path):
    env = training.setup("cpu")
    argv = (["--data-root", str(roots[script]), "--out", str(tmp_path), "--training-noise", noise]
            + TINY + SIZES[script])
    args = script.parse_args(argv + ["--no-in-memory", "--workers", "2"])
    streamed = script.load_data(args, env)
    in_memory = script.load_data(script.parse_args(argv + ["--in-memory", "--workers", "0"]), env)
    assert not isinstance(streamed[0], StackDataset) and isinstance(in_memory[0], StackDataset)
    for s, m in zip(streamed, in_memory):
        assert len(s) == len(m) > 0
        for i in range(len(s)):
            assert_same_items(s[i], m[i])

    # Batch for batch through the training loader (noise applied per item, in the workers; fresh noise
    # drawn per epoch there too) and the evaluation loader: two worker processes reading from disk give
    # what one process reads from memory.
    loaders = [make_loader(data.training_noise(sets[0], args), argparse.Namespace(batch_size=4, seed=5, workers=workers),
                           env) for sets, workers in ((streamed, 2), (in_memory, 0))]
    for epoch in (0, 1):
        for loader in loaders:
            start_epoch(loader, epoch)
        pairs = list(zip(*loaders))
        assert len(pairs) == 2
        for a, b in pairs:
            assert_same_items(a, b)
            assert "corrupted_rgb" in a and "corrupted_points" in a
    # --training-noise: a corrupted sample's noise is the same in every epoch, or drawn anew.
    noisy = data.training_noise(in_memory[0], args)
    i = int(noisy.dataset.corrupted.nonzero()[0])  # the first sample with corrupted RGB
    by_epoch = []
    for epoch in (0, 1):
        noisy.set_epoch(epoch)
        by_epoch.append(noisy[i]["rgb"])
    assert torch.equal(*by_epoch) == (noise == "fixed")
    args_memory = script.parse_args(argv + ["--workers", "0"])
    pairs = list(zip(eval_loader(data.test_corruption(streamed[1], 0.5, 0), args),
                     eval_loader(data.test_corruption(in_memory[1], 0.5, 0), args_memory)))
    assert pairs
    for a, b in pairs:
        assert_same_items(a, b)


def test_max_steps_stops_training_as_the_first_steps_of_the_full_run(roots, tmp_path):
    argv = ["--data-root", str(roots[handpose_rhd])] + TINY + SIZES[handpose_rhd]  # 2 steps per epoch, 2 epochs
    handpose_rhd.main(argv + ["--out", str(tmp_path / "full")])
    handpose_rhd.main(argv + ["--out", str(tmp_path / "cut"), "--max-steps", "3", "--no-in-memory", "--workers", "1"])
    full, cut = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("full", "cut"))
    full_history, cut_history = full["fusions"]["gpoe"]["history"], cut["fusions"]["gpoe"]["history"]
    assert [h["steps"] for h in full_history] == [2, 4]
    assert [h["steps"] for h in cut_history] == [2, 3]
    # The schedule is that of --epochs: the first epoch of both runs is the same, to the last bit.
    assert cut_history[0]["loss"] == full_history[0]["loss"]
    assert cut_history[1]["loss"] != full_history[1]["loss"]
    state = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert state["scheduler"]["last_epoch"] == 3 and state["epoch"] == 1
    # Evaluated and reported as usual.
    assert set(cut["fusions"]["gpoe"]["metrics"]) == {"0.0", "0.5"} and cut["config"]["max_steps"] == 3
    assert (tmp_path / "cut" / "results.md").is_file()
