"""No training step waits for the device: the training loop reads no tensor value per step (each read
is a host synchronisation on a GPU); its statistics stay on the device until the epoch ends."""

import sys
from pathlib import Path

import pytest
import torch

import gpoe_fusion as gf
import handpose_rhd
from common import data, training
from common.training import setup

# Every way Python code reads a tensor's value.
READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__format__")
TORCH = str(Path(torch.__file__).parent)


@pytest.fixture
def count_reads(monkeypatch):
    """The number of tensor reads so far by code outside torch, as a one-element list. (torch reads its own
    host-side bookkeeping, e.g. AdamW's step counts, which stay on the host with the model on a GPU.)"""
    count = [0]
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            count[0] += not sys._getframe(1).f_code.co_filename.startswith(TORCH)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return count


def test_the_training_loop_reads_the_device_once_per_epoch_not_once_per_step(rhd_root, tmp_path, count_reads):
    args = handpose_rhd.parse_args(["--data-root", str(rhd_root), "--out", str(tmp_path), "--num-train", "8",
                                    "--num-eval", "4", "--batch-size", "2", "--crop-size", "32", "--num-points", "32",
                                    "--latent-dim", "8", "--rgb-width", "8", "--pel-width", "16", "--grid-size", "4",
                                    "--fold-hidden", "16", "--keypoint-hidden", "16", "--data-corruption", "0.5"])
    env = setup("cpu")
    train_set, _ = handpose_rhd.load_data(args, env)
    loader = training.make_loader(data.training_noise(train_set, args), args, env)
    batches = list(loader)  # the loader's own reads (the noise flags of each sample) are not the loop's
    model = handpose_rhd.build_model(args)  # gPoE: the loop also sums alpha per modality and corruption flag
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    gf.set_validation(False)  # the library's value checks read the fused output, by default on CPU tensors only
    try:
        reads = []
        for steps in (1, 4):
            count_reads[0] = 0
            stats = training.train_one_epoch(model, batches, optimizer, scheduler, 0, args, env, steps)
            reads.append(count_reads[0])
    finally:
        gf.set_validation(None)
    assert reads[0] == reads[1] <= 2, reads  # the epoch's statistics, and the progress bar's first loss
    assert {"loss", "alpha/rgb", "alpha/rgb|corrupted_rgb=1"} <= set(stats)
