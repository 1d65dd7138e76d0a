"""The training loop both pipelines share: AdamW + warm-up/cosine schedule, optional bf16 autocast
on GPU, data parallelism under torchrun, a checkpoint after every epoch and exact resumption.

Exact resumption: every source of randomness is a function of (seed, epoch) — the sampler's
shuffle (``set_epoch``), the global torch seed set at the start of each epoch (reparameterised
draws) and the datasets' own per-index seeds — so a run resumed from the checkpoint of epoch e
continues exactly as the uninterrupted run did after epoch e.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
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
from .distributed import DistEnv, barrier

__all__ = ["TrainConfig", "fit", "make_loader", "train_one_epoch"]

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


def make_loader(dataset: Dataset, cfg: TrainConfig, env: DistEnv, shuffle: bool = True) -> DataLoader:
    """Each rank's shard of ``dataset``; its order is a function of (seed, epoch) via ``set_epoch``."""
    sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=shuffle,
                                 seed=cfg.seed, drop_last=shuffle)
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                      pin_memory=env.device.type == "cuda", drop_last=shuffle,
                      persistent_workers=cfg.num_workers > 0)


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
                    cfg: TrainConfig) -> dict[str, float]:
    """One pass over ``loader``. Returns the epoch means of the objective's terms and of alpha."""
    model.train()
    core = model.module if isinstance(model, DistributedDataParallel) else model
    sums: dict[str, float] = defaultdict(float)
    use_amp = cfg.amp and env.device.type == "cuda"
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and env.is_main),
               leave=False, dynamic_ncols=True)
    for batch in bar:
        batch = {k: v.to(env.device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = model(batch)
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
        if isinstance(core.objective.fusion, GPoE):  # credibility alpha (other fusions' weights are not)
            _alpha_stats(out.alpha, batch, core.modalities, sums)
        bar.set_postfix(loss=f"{out.terms['loss'].item():.3f}")
    return _reduce(sums, env)


def fit(model: nn.Module, train_set: Dataset, cfg: TrainConfig, env: DistEnv, out_dir: str | Path,
        resume: bool = False, log: Callable[[str], None] = print) -> list[dict[str, float]]:
    """Train ``model`` for cfg.epochs, checkpointing to ``out_dir/checkpoint.pt`` after every epoch.

    resume: continue from that checkpoint (exactly; see the module docstring). Without it a run
    starts from scratch and overwrites an older checkpoint. Returns the per-epoch history.
    """
    out_dir = Path(out_dir)
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
            if state["config"] != asdict(cfg):
                raise ValueError(f"resume: the checkpoint in {out_dir} was trained with {state['config']}, "
                                 f"not {asdict(cfg)}")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            history = state["history"]
            start = state["epoch"] + 1
            log(f"resumed from {out_dir / CHECKPOINT} after epoch {start}")
    ddp = DistributedDataParallel(model) if env.distributed else model
    for epoch in range(start, cfg.epochs):
        torch.manual_seed(cfg.seed * 100_003 + epoch * 1_009 + env.rank)
        loader.sampler.set_epoch(epoch)
        began = time.perf_counter()
        stats = train_one_epoch(ddp, loader, optimizer, scheduler, env, epoch, cfg)
        stats["epoch"] = epoch + 1
        stats["seconds"] = time.perf_counter() - began
        history.append(stats)
        if env.is_main:
            save_checkpoint(out_dir / CHECKPOINT, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                                   "scheduler": scheduler.state_dict(), "epoch": epoch,
                                                   "history": history, "config": asdict(cfg)})
            log(f"epoch {epoch + 1}/{cfg.epochs}: loss {stats['loss']:.4f} ({stats['seconds']:.1f} s)")
        barrier(env)
    return history
