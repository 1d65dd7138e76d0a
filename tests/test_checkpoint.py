"""Checkpoints: what the training loop saves loads back exactly; a tampered, foreign, garbage or
truncated file is refused with an error naming it, and never runs code."""

import argparse
import os
import pickle
import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from common import training
from common.training import CHECKPOINT, load_checkpoint, save_checkpoint


class Tiny(nn.Module):
    """The smallest model ``training.train`` accepts."""

    modalities = ["x"]
    objective = SimpleNamespace(fusion=None)  # no credibility weights to log

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.norm = nn.BatchNorm1d(2)  # buffers, including an integer one

    def forward(self, batch, return_weights=False):
        loss = self.norm(self.lin(batch["x"])).pow(2).mean()
        return SimpleNamespace(loss=loss, terms={"loss": loss.detach()})


def tiny_fit(out_dir, resume=False):
    torch.manual_seed(0)
    model = Tiny()
    data = [{"x": x} for x in torch.randn(8, 3, generator=torch.Generator().manual_seed(1))]
    args = argparse.Namespace(epochs=2, batch_size=4, lr=1e-3, weight_decay=1e-4, warmup_epochs=0.5, seed=0, no_amp=True,
                              workers=0, no_progress=True, max_steps=None, out=out_dir, resume=resume)
    history = training.train(model, data, args, training.setup("cpu"), log=lambda _: None)
    return model, history


class RunsCommand:
    """Pickles to a call of os.system, as a tampered checkpoint would."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def assert_refused(path):
    with pytest.raises(RuntimeError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert f"checkpoint {path}:" in message
    assert "not a gpoe_fusion checkpoint or unsafe to load" in message and "delete it to start over" in message
    return message


def test_what_the_training_loop_saves_round_trips(tmp_path):
    model, history = tiny_fit(tmp_path)
    state = load_checkpoint(tmp_path / CHECKPOINT)
    assert set(state) == {"model", "optimizer", "scheduler", "epoch", "history", "signature"}
    assert state["epoch"] == 1 and state["history"] == history
    for key, value in model.state_dict().items():
        assert torch.equal(state["model"][key], value), key
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert all(torch.is_tensor(s["exp_avg"]) for s in state["optimizer"]["state"].values())
    assert state["scheduler"]["last_epoch"] == 4

    resumed, resumed_history = tiny_fit(tmp_path, resume=True)  # all epochs done: loads, trains no more
    assert resumed_history == history
    for key, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_plain_rng_states_round_trip(tmp_path):
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numbers": [1, 2.5, None, "a", (3, 4)]}
    save_checkpoint(tmp_path / "rng.pt", state)
    loaded = load_checkpoint(tmp_path / "rng.pt")
    assert torch.equal(loaded["torch"], state["torch"])
    assert loaded["python"] == state["python"] and loaded["numbers"] == state["numbers"]
    random.setstate(loaded["python"])


def test_a_checkpoint_that_would_run_a_command_is_refused_and_the_command_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    model, _ = tiny_fit(tmp_path / "real")
    torch.save({"model": model.state_dict(), "epoch": 0, "history": [RunsCommand(f"echo pwned > {marker}")]}, path)

    message = assert_refused(path)
    assert "system" in message
    assert not marker.exists()
    # The file is a working exploit: an unrestricted load runs the command.
    torch.load(path, weights_only=False)
    assert marker.read_text().strip() == "pwned"


@pytest.mark.parametrize("content", [b"", b"not a checkpoint\n" * 20, pickle.dumps({"epoch": 0})])
def test_a_file_that_is_no_torch_checkpoint_is_refused(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    assert_refused(path)


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_a_truncated_checkpoint_is_refused(tmp_path, keep):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": Tiny().state_dict(), "epoch": 0})
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    assert_refused(path)


def test_a_torch_file_that_holds_no_dict_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save(torch.zeros(3), path)
    assert "Tensor" in assert_refused(path)


def test_a_missing_checkpoint_is_none(tmp_path):
    assert load_checkpoint(tmp_path / "missing.pt") is None
