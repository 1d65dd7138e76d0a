"""Training one run, the same for both pipelines: AdamW with a linear warm-up and cosine decay, gradient
clipping, bf16 autocast on GPU, data parallelism under torchrun, a checkpoint after every epoch, exact
resumption, and a stop after --max-steps optimizer steps; then the run's results.json.

``train`` is the epoch loop (as torchvision's references write it in ``main``) and ``train_one_epoch``
the step loop. No step waits for the device: the epoch's statistics are summed on it and read once
when the epoch ends (the progress bar reads the loss every PROGRESS_EVERY steps).

Data parallelism trains as one process does with the global batch (W ranks of batch b: one of W * b),
to float rounding: the ranks' batches of a step make up the single process's batch, the gradients are
averaged, and ``gpoe_fusion.distributed.match_single_process`` makes batch statistics and reparameterisation noise
those of the global batch; so every rank seeds the global RNG alike. Exact resumption: every source of
randomness is a function of (seed, epoch), the sampler's shuffle, the global torch seed set at the start
of each epoch and the datasets' own per-index (and, with ``set_epoch``, per-epoch) seeds, so a run
resumed from the checkpoint of epoch e continues as the uninterrupted run did. ``--max-steps`` keeps the
schedule of --epochs: the steps taken are the first steps of the full run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import itertools
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

import gpoe_fusion as gf
from gpoe_fusion.distributed import match_single_process

from . import distributed
from .checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint, write_json
from .cli import UsageError, exit_with, run_signature
from .distributed import DistEnv, barrier

GRAD_CLIP = 10.0  # the largest gradient norm a step applies
PROGRESS_EVERY = 20  # steps between the progress bar's readings of the loss (each waits for the device)


def pin_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """--low-memory: fix glibc's mmap threshold at ``nbytes`` for this process and those it forks (loader
    workers). glibc maps a block over its threshold afresh and unmaps it when freed, but raises the
    threshold (up to 32 MiB) to every mapped block freed, so after the first step the activations come
    from the heap, which fragments: a full-size step of 8 at 256x256 peaked at 1.88 GB in the first step
    and 2.29 GB by the third; with the threshold fixed, 1.93 GB, four steps in 10.5 s instead of 8.4 s
    (a page fault per fresh page). Returns whether it took effect (False without glibc)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(-3, nbytes))  # -3: M_MMAP_THRESHOLD, glibc's malloc.h


@contextlib.contextmanager
def session(args: argparse.Namespace) -> Iterator[DistEnv]:
    """The process's part in the command: --low-memory, the process group (under torchrun) and the device;
    a value found wrong on the way (UsageError) ends the program with one line and exit status 2."""
    if args.low_memory:
        pin_mmap_threshold()
    try:
        env = distributed.setup(args.device)
        if env.is_main and args.rgb_weights is None:
            print("note: the RGB encoder (ResNet-18) starts from random weights; the paper starts from ImageNet "
                  "weights (give torchvision's resnet18 checkpoint file with --rgb-weights)")
        yield env
    except UsageError as error:
        exit_with(str(error))
    distributed.cleanup(env)


def make_loader(dataset: Dataset, args: argparse.Namespace, env: DistEnv, shuffle: bool = True) -> DataLoader:
    """Each rank's shard of ``dataset`` in batches of --batch-size; its order is a function of (--seed, epoch)."""
    sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=shuffle,
                                 seed=args.seed, drop_last=shuffle)
    # Workers hold copies of the dataset: one that changes with the epoch (set_epoch) needs new ones.
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                      pin_memory=env.device.type == "cuda", drop_last=shuffle,
                      persistent_workers=args.workers > 0 and not hasattr(dataset, "set_epoch"))


def start_epoch(loader: DataLoader, epoch: int) -> None:
    """Set ``epoch`` on make_loader's sampler (its shuffle) and on its dataset where that draws per epoch."""
    loader.sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)


def _schedule(args: argparse.Namespace, steps_per_epoch: int) -> Callable[[int], float]:
    total, warmup = max(1, args.epochs * steps_per_epoch), max(1, int(args.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor


def _add(sums: dict[str, list], key: str, total: Tensor, count: Tensor | int) -> None:
    """sums[key] += (total, count), without reading either."""
    value = sums.setdefault(key, [0.0, 0])
    value[0], value[1] = value[0] + total.detach().double(), value[1] + count


def _alpha_statistics(sums: dict[str, list], alpha: Tensor, batch: dict[str, Tensor], modalities: list[str]) -> None:
    """gPoE's alpha [M, B, D] of a batch: its mean per modality, overall and split by each ``corrupted_<x>`` flag."""
    per_sample = alpha.float().mean(-1)  # [M, B]
    flags = {key: value.bool() for key, value in batch.items() if key.startswith("corrupted_")}
    for i, name in enumerate(modalities):
        _add(sums, f"alpha/{name}", per_sample[i].sum(), per_sample.shape[1])
        for key, flag in flags.items():
            for value, select in (("1", flag), ("0", ~flag)):
                _add(sums, f"alpha/{name}|{key}={value}", (per_sample[i] * select).sum(), select.sum())


def _means(sums: dict[str, list], env: DistEnv) -> dict[str, float]:
    """Every statistic's sum over the ranks divided by its count (NaN without any): one transfer."""
    keys = sorted(sums)
    pairs = torch.stack([torch.stack([torch.as_tensor(v, dtype=torch.float64, device=env.device) for v in sums[k]])
                         for k in keys])
    if env.distributed:
        dist.all_reduce(pairs)
    return {k: total / count if count else float("nan") for k, (total, count) in zip(keys, pairs.tolist())}


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int, args: argparse.Namespace,
                    env: DistEnv, steps: int | None = None) -> dict[str, float]:
    """One pass over ``loader`` (its first ``steps`` batches if given): each batch's loss
    (``CrossModalVAE.forward``, the library's objective), its gradient, one clipped AdamW step and one
    step of the schedule. Returns the epoch means of the objective's terms and, for gPoE, of alpha per
    modality, overall and by corruption flag (the fusion returns its weights only then)."""
    model.train()
    core = model.module if isinstance(model, DistributedDataParallel) else model
    log_alpha = isinstance(core.objective.fusion, gf.GPoE)
    use_amp = not args.no_amp and env.device.type == "cuda"
    steps = len(loader) if steps is None else min(steps, len(loader))
    bar = tqdm(itertools.islice(loader, steps), total=steps, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
               disable=args.no_progress or not env.is_main, dynamic_ncols=True)
    sums: dict[str, list] = {}
    for step, batch in enumerate(bar):
        batch = {k: v.to(env.device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = model(batch, return_weights=log_alpha)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        scheduler.step()
        n = len(next(iter(batch.values())))
        for key, value in out.terms.items():
            _add(sums, key, value * n, n)
        if log_alpha:
            _alpha_statistics(sums, out.weights, batch, core.modalities)
        if not bar.disable and step % PROGRESS_EVERY == 0:
            bar.set_postfix(loss=f"{out.terms['loss'].item():.3f}")
    return _means(sums, env)


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """The garbage collector leaves the objects that exist now alone. Loader workers are forked from this
    process and share its pages until they write to them; the cyclic collector writes to every object it
    visits, so without this the workers soon hold private copies of the interpreter's heap (at the
    full-size preset two workers added 240 MB to the process tree; frozen, 50-100 MB)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _resume(path: Path, model: nn.Module, optimizer, scheduler, args: argparse.Namespace, env: DistEnv,
            log: Callable[[str], None]) -> tuple[list[dict], int]:
    """The history and the next epoch of the run checkpointed at ``path``, its state loaded; ([], 0) without one."""
    try:
        state = load_checkpoint(path, map_location=env.device)
    except RuntimeError as error:  # a file that is no safe checkpoint
        raise UsageError("--resume", str(error)) from None
    if state is None:
        log(f"resume: no checkpoint in {path.parent}, starting from scratch")
        return [], 0
    saved, current = state["signature"], run_signature(args)
    differences = [(k, saved.get(k), current.get(k)) for k in sorted(saved.keys() | current.keys())
                   if saved.get(k) != current.get(k)]
    if differences:
        shown = "; ".join(f"{k}: {a!r} there, {b!r} here" for k, a, b in differences[:4])
        more = f" and {len(differences) - 4} more" if len(differences) > 4 else ""
        raise UsageError("--resume", f"the checkpoint {path} was written by a run of another configuration ({shown}"
                                     f"{more}); resume with the options of that run, or choose another --out")
    for name, part in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler)):
        part.load_state_dict(state[name])
    log(f"resumed from {path} after epoch {state['epoch'] + 1}")
    return state["history"], state["epoch"] + 1


def train(model: nn.Module, train_set: Dataset, args: argparse.Namespace, env: DistEnv,
          log: Callable[[str], None] | None = None) -> list[dict[str, float]]:
    """Train ``model`` on ``train_set`` for --epochs (or --max-steps optimizer steps), checkpointing to
    --out/checkpoint.pt after every epoch; with --resume, continue from that checkpoint (exactly), which
    a run of another signature may not. With more than one process ``model`` is changed in place to
    train as one process with the global batch would (``match_single_process``). Returns the history:
    per epoch, ``train_one_epoch``'s means, ``epoch``, ``steps`` (taken by its end) and ``seconds``.
    """
    log = log or (print if env.is_main else lambda _: None)
    per_rank = len(train_set) // env.world_size
    if per_rank < args.batch_size:
        raise UsageError("--batch-size", f"{args.batch_size} is more than the {per_rank} training samples of each of "
                                         f"the {env.world_size} process(es); lower it or raise --num-train")
    steps = f", at most {args.max_steps} steps" if args.max_steps else ""
    log(f"{len(train_set)} training samples, {args.epochs} epochs{steps}, on {env.device} x{env.world_size} "
        f"(kernels: {'on' if gf.extension_available() else 'off'})")
    model = match_single_process(model, env.rank, env.world_size, env.device).to(env.device)
    path = Path(args.out) / CHECKPOINT
    loader = make_loader(train_set, args, env)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(args, len(loader)))
    history, start = _resume(path, model, optimizer, scheduler, args, env, log) if args.resume else ([], 0)
    ddp = DistributedDataParallel(model) if env.distributed else model
    with _frozen_heap():
        for epoch in range(start, args.epochs):
            done = epoch * len(loader)  # optimizer steps before this epoch
            if args.max_steps is not None and done >= args.max_steps:
                break
            torch.manual_seed(args.seed * 100_003 + epoch * 1_009)  # alike on every rank: see GlobalBatchNoise
            start_epoch(loader, epoch)
            began = time.perf_counter()
            left = None if args.max_steps is None else args.max_steps - done
            stats = train_one_epoch(ddp, loader, optimizer, scheduler, epoch, args, env, left)
            stats.update(epoch=epoch + 1, steps=done + min(len(loader), left or len(loader)),
                         seconds=time.perf_counter() - began)
            history.append(stats)
            if env.is_main:
                save_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                       "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history,
                                       "signature": run_signature(args)})
                stopped = f", stopped at --max-steps {args.max_steps}" if stats["steps"] == args.max_steps else ""
                log(f"epoch {epoch + 1}/{args.epochs}: loss {stats['loss']:.4f} ({stats['seconds']:.1f} s, "
                    f"{stats['steps']} steps{stopped})")
            barrier(env)
    return history


def write_results(args: argparse.Namespace, history: list[dict], evaluation: dict) -> dict:
    """The run's record in --out/results.json, returned: ``{"fusion", "seed", **evaluation (the
    pipeline's metric groups), "train_seconds", "history", "dir", "signature"}``."""
    result = {"fusion": args.fusion, "seed": args.seed, **evaluation,
              "train_seconds": sum(h["seconds"] for h in history), "history": history, "dir": str(args.out),
              "signature": run_signature(args)}
    write_json(Path(args.out) / "results.json", result)
    return result
