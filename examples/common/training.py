"""The training loop both pipelines share: AdamW + warm-up/cosine schedule, optional bf16 autocast
on GPU, data parallelism under torchrun, a checkpoint after every epoch and exact resumption, and
an optional stop after a number of optimizer steps.

Data parallelism trains as one process does with the global batch (W ranks of batch b: one of
W * b), to float rounding: the ranks' batches of a step make up the single process's batch, the
gradients are averaged, and ``distributed.match_single_process`` makes batch statistics and
reparameterisation noise those of the global batch. So every rank seeds the global RNG alike.

Exact resumption: every source of randomness is a function of (seed, epoch) — the sampler's
shuffle (``set_epoch``), the global torch seed set at the start of each epoch (reparameterised
draws) and the datasets' own per-index seeds (per epoch too, where the dataset has ``set_epoch``)
— so a run resumed from the checkpoint of epoch e continues exactly as the uninterrupted run did
after epoch e. A checkpoint is resumed only by a
run of the same configuration (``TrainConfig`` and its ``signature``, less how the run executes).

``max_steps`` ends training after that many optimizer steps; the schedule stays that of
``epochs``, so the steps taken are exactly the first steps of the full run.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from gpoe_fusion import GPoE

from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import DistEnv, barrier, match_single_process

__all__ = ["ConfigMismatch", "TrainConfig", "fit", "make_loader", "start_epoch", "train_one_epoch"]

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    grad_clip: float = 10.0
    seed: int = 0
    amp: bool = True  # bf16 autocast, on GPU only
    num_workers: int = 0
    progress: bool = True
    max_steps: int | None = None  # stop after this many optimizer steps (None: all epochs)
    # What else defines the run (model sizes, data, fusion...): plain values, compared on resume.
    signature: dict = field(default_factory=dict)


# How a run executes, not what it computes: a run may resume with other values of these.
_RUN_ONLY = ("num_workers", "progress")


class ConfigMismatch(ValueError):
    """A checkpoint written by a run of another configuration. ``differences``: ``[(key, saved, current)]``."""

    def __init__(self, path: Path, differences: list[tuple[str, object, object]]):
        shown = "; ".join(f"{k}: {saved!r} there, {current!r} here" for k, saved, current in differences[:4])
        more = f" and {len(differences) - 4} more" if len(differences) > 4 else ""
        super().__init__(f"the checkpoint {path} was written by a run of another configuration ({shown}{more})")
        self.differences = differences


def _differences(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """Flattened (key, saved, current) of every setting that differs, signature entries included."""
    def flat(config: dict) -> dict:
        out = {k: v for k, v in config.items() if k != "signature" and k not in _RUN_ONLY}
        out.update(config.get("signature", {}))
        return out

    saved, current = flat(saved), flat(current)
    return [(k, saved.get(k), current.get(k)) for k in sorted(saved.keys() | current.keys())
            if saved.get(k) != current.get(k)]


def make_loader(dataset: Dataset, cfg: TrainConfig, env: DistEnv, shuffle: bool = True) -> DataLoader:
    """Each rank's shard of ``dataset``; its order is a function of (seed, epoch) via ``set_epoch``."""
    sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=shuffle,
                                 seed=cfg.seed, drop_last=shuffle)
    # Workers hold copies of the dataset: one that changes with the epoch (set_epoch) needs new ones.
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                      pin_memory=env.device.type == "cuda", drop_last=shuffle,
                      persistent_workers=cfg.num_workers > 0 and not hasattr(dataset, "set_epoch"))


def start_epoch(loader: DataLoader, epoch: int) -> None:
    """Set ``epoch`` on make_loader's sampler (its shuffle) and on its dataset where that draws per
    epoch (``set_epoch``: e.g. noise drawn anew every epoch)."""
    loader.sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)


def _schedule(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = max(1, int(cfg.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _alpha_stats(alpha: torch.Tensor, batch: dict[str, torch.Tensor], modalities: list[str], sums: dict[str, float]) -> None:
    """Accumulate mean alpha per modality, overall and split by each ``corrupted_<x>`` flag."""
    per_sample = alpha.float().mean(-1)  # [M, B]
    flags = {k: v.bool() for k, v in batch.items() if k.startswith("corrupted_")}
    for i, name in enumerate(modalities):
        sums[f"alpha/{name}"] += per_sample[i].sum().item()
        sums[f"alpha/{name}#n"] += per_sample.shape[1]
        for key, flag in flags.items():
            for value, select in (("1", flag), ("0", ~flag)):
                stat = f"alpha/{name}|{key}={value}"
                sums[stat] += per_sample[i][select].sum().item()
                sums[f"{stat}#n"] += int(select.sum())


def _reduce(sums: dict[str, float], env: DistEnv) -> dict[str, float]:
    """Sum the accumulators over ranks, then divide each statistic by its count."""
    keys = sorted(sums)
    if env.distributed:
        values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=env.device)
        dist.all_reduce(values)
        sums = dict(zip(keys, values.tolist()))
    out = {}
    for k in keys:
        if k.endswith("#n") or k == "#samples":
            continue
        n = sums.get(f"{k}#n", sums["#samples"])
        out[k] = sums[k] / n if n else float("nan")
    return out


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, env: DistEnv, epoch: int,
                    cfg: TrainConfig, max_batches: int | None = None) -> dict[str, float]:
    """One pass over ``loader`` (its first ``max_batches`` batches if given). Returns the epoch means
    of the objective's terms and of alpha."""
    model.train()
    core = model.module if isinstance(model, DistributedDataParallel) else model
    sums: dict[str, float] = defaultdict(float)
    use_amp = cfg.amp and env.device.type == "cuda"
    log_alpha = isinstance(core.objective.fusion, GPoE)  # credibility alpha (other fusions' weights are not)
    total = len(loader) if max_batches is None else min(max_batches, len(loader))
    bar = tqdm(itertools.islice(loader, total), total=total, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=not (cfg.progress and env.is_main), leave=False, dynamic_ncols=True)
    for batch in bar:
        batch = {k: v.to(env.device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = model(batch, return_weights=log_alpha)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        n = next(iter(batch.values())).shape[0]
        sums["#samples"] += n
        for key, value in out.terms.items():
            sums[key] += value.item() * n
        if log_alpha:
            _alpha_stats(out.weights, batch, core.modalities, sums)
        bar.set_postfix(loss=f"{out.terms['loss'].item():.3f}")
    return _reduce(sums, env)


def fit(model: nn.Module, train_set: Dataset, cfg: TrainConfig, env: DistEnv, out_dir: str | Path,
        resume: bool = False, log: Callable[[str], None] = print) -> list[dict[str, float]]:
    """Train ``model`` for cfg.epochs (or cfg.max_steps optimizer steps), checkpointing to
    ``out_dir/checkpoint.pt`` after every epoch and when stopping at max_steps.

    resume: continue from that checkpoint (exactly; see the module docstring); raises
    ConfigMismatch if it was written by a run of another configuration. Without it a run starts
    from scratch and overwrites an older checkpoint. Returns the per-epoch history; each entry
    holds ``steps``, the optimizer steps taken by the end of that epoch. With more than one process
    the model trains as one process with the global batch would (``match_single_process``, which
    changes ``model`` in place: its batch norms become synchronised ones).
    """
    out_dir = Path(out_dir)
    model = match_single_process(model, env)
    model.to(env.device)
    loader = make_loader(train_set, cfg, env)
    if len(loader) == 0:
        raise ValueError(f"train_set: {len(train_set)} samples give no full batch of {cfg.batch_size} per rank")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, len(loader)))
    history: list[dict[str, float]] = []
    start = 0
    if resume:
        state = load_checkpoint(out_dir / CHECKPOINT, map_location=env.device)
        if state is None:
            log(f"resume: no checkpoint in {out_dir}, starting from scratch")
        else:
            differences = _differences(state["config"], asdict(cfg))
            if differences:
                raise ConfigMismatch(out_dir / CHECKPOINT, differences)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            history = state["history"]
            start = state["epoch"] + 1
            log(f"resumed from {out_dir / CHECKPOINT} after epoch {start}")
    ddp = DistributedDataParallel(model) if env.distributed else model
    for epoch in range(start, cfg.epochs):
        done = epoch * len(loader)  # optimizer steps before this epoch
        if cfg.max_steps is not None and done >= cfg.max_steps:
            break
        limit = None if cfg.max_steps is None else cfg.max_steps - done
        torch.manual_seed(cfg.seed * 100_003 + epoch * 1_009)  # alike on every rank: see GlobalBatchNoise
        start_epoch(loader, epoch)
        began = time.perf_counter()
        stats = train_one_epoch(ddp, loader, optimizer, scheduler, env, epoch, cfg, max_batches=limit)
        stats["epoch"] = epoch + 1
        stats["steps"] = done + min(len(loader), limit or len(loader))
        stats["seconds"] = time.perf_counter() - began
        history.append(stats)
        if env.is_main:
            save_checkpoint(out_dir / CHECKPOINT, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                                   "scheduler": scheduler.state_dict(), "epoch": epoch,
                                                   "history": history, "config": asdict(cfg)})
            stopped = f", stopped at --max-steps {cfg.max_steps}" if stats["steps"] == cfg.max_steps else ""
            log(f"epoch {epoch + 1}/{cfg.epochs}: loss {stats['loss']:.4f} ({stats['seconds']:.1f} s, "
                f"{stats['steps']} steps{stopped})")
        barrier(env)
    return history
