"""Data parallelism with streamed data, on CPU: two gloo processes, each reading only its shard,
train as one process does with the same global batch (the pipelines' own training loop, sampler,
checkpointing and --max-steps; a per-sample loss, so that the comparison is exact up to float
rounding — see docs/handpose.md, "Data parallelism", for what differs with the pipelines' networks)."""

import os
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import Dataset

from common import distributed
from common.checkpoint import load_checkpoint
from common.distributed import DistEnv
from common.training import TrainConfig, fit, make_loader

NUM_SAMPLES, BATCH = 32, 4  # per-rank batch of the 2-process run; the single process takes 2 x BATCH


class OnDisk(Dataset):
    """Sample i read from its own file when asked for; every read is logged per rank and process."""

    def __init__(self, root: Path):
        self.root = root

    def __len__(self) -> int:
        return NUM_SAMPLES

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        with open(self.root / "reads" / f"rank{os.environ.get('RANK', 'single')}_{os.getpid()}.txt", "a") as log:
            log.write(f"{index}\n")
        x, y = np.load(self.root / f"{index:03d}.npy")
        return {"x": torch.from_numpy(x), "y": torch.from_numpy(y[:2])}


class Regression(nn.Module):
    """A small MLP with a per-sample mean squared error: its gradient on a batch is the mean of its
    gradients on the batch's halves, which is what data parallelism relies on."""

    modalities = ["x"]
    objective = SimpleNamespace(fusion=None)  # no credibility weights to log

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, batch):
        loss = (self.net(batch["x"]) - batch["y"]).pow(2).mean()
        return SimpleNamespace(loss=loss, terms={"loss": loss.detach()}, alpha=None)


def write_samples(root: Path) -> None:
    rng = np.random.default_rng(0)
    (root / "reads").mkdir(parents=True)
    for i in range(NUM_SAMPLES):
        np.save(root / f"{i:03d}.npy", rng.standard_normal((2, 8)).astype(np.float32))


def train(rank: int, world_size: int, root: Path, out: Path, port: int) -> None:
    """One rank of a run: the global batch is 2 * BATCH whatever the world size."""
    if world_size > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = distributed.setup("cpu")
    torch.manual_seed(0)
    model = Regression()
    # 4 steps per epoch; --max-steps 6 stops in the middle of the second epoch.
    cfg = TrainConfig(epochs=3, batch_size=2 * BATCH // world_size, lr=0.05, warmup_epochs=0.5, seed=3, amp=False,
                      num_workers=1, progress=False, max_steps=6)
    history = fit(model, OnDisk(root), cfg, env, out, log=lambda _: None)
    if env.is_main:
        with torch.no_grad():
            held_out = torch.from_numpy(np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32))
            metric = model.net(held_out).pow(2).mean().item()
        torch.save({"history": history, "metric": metric}, out / "final.pt")
    distributed.cleanup(env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_train_as_one_process_with_the_same_global_batch(tmp_path):
    root = tmp_path / "data"
    write_samples(root)
    train(0, 1, root, tmp_path / "single", 0)
    single_reads = [int(i) for f in (root / "reads").iterdir() for i in f.read_text().split()]
    for f in (root / "reads").iterdir():
        f.unlink()
    mp.spawn(train, args=(2, root, tmp_path / "two", free_port()), nprocs=2)

    one, two = (torch.load(tmp_path / run / "final.pt", weights_only=True) for run in ("single", "two"))
    assert [h["steps"] for h in one["history"]] == [h["steps"] for h in two["history"]] == [4, 6]
    for a, b in zip(one["history"], two["history"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"])
    assert abs(one["metric"] - two["metric"]) <= 1e-5 * abs(one["metric"])
    models = [load_checkpoint(tmp_path / run / "checkpoint.pt")["model"] for run in ("single", "two")]
    for key in models[0]:
        torch.testing.assert_close(models[1][key], models[0][key], rtol=1e-5, atol=1e-6)

    # Each rank read only its shard of each epoch (its loader may read ahead within it).
    reads = {r: [int(i) for f in (root / "reads").glob(f"rank{r}_*.txt") for i in f.read_text().split()]
             for r in (0, 1)}
    cfg = TrainConfig(batch_size=BATCH, seed=3)
    for rank in (0, 1):
        loader = make_loader(list(range(NUM_SAMPLES)), cfg, DistEnv(rank, 2, torch.device("cpu")))
        shards = set()
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            shards |= set(loader.sampler)
        assert reads[rank] and set(reads[rank]) <= shards
    assert len(single_reads) >= 6 * 2 * BATCH


def test_the_ranks_batches_make_up_the_single_process_batches():
    data = list(range(NUM_SAMPLES))
    single = make_loader(data, TrainConfig(batch_size=2 * BATCH, seed=7), DistEnv(0, 1, torch.device("cpu")))
    ranks = [make_loader(data, TrainConfig(batch_size=BATCH, seed=7), DistEnv(r, 2, torch.device("cpu")))
             for r in (0, 1)]
    for epoch in (0, 1, 2):
        for loader in [single, *ranks]:
            loader.sampler.set_epoch(epoch)
        batches = list(zip(single, *ranks))
        assert len(batches) == NUM_SAMPLES // (2 * BATCH)
        for whole, first, second in batches:
            assert not set(first.tolist()) & set(second.tolist())
            assert sorted(whole.tolist()) == sorted(first.tolist() + second.tolist())
