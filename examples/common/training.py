"""The engine: the process group under torchrun, checkpoints and results written atomically and loaded safely, and one
run of either pipeline (``runner``). The ranks train as one process with their global batch (``match_single_process``);
all randomness is a function of (seed, epoch), so a resumed run continues as the uninterrupted one did."""

import argparse
import contextlib
import ctypes.util
import gc
import itertools
import json
import math
import os
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

import gpoe_fusion as gf
from gpoe_fusion.distributed import match_single_process

from .cli import UsageError, exit_with, run_signature
from .data import describe_size, training_noise

CHECKPOINT = "checkpoint.pt"  # a run's checkpoint in its folder
GRAD_CLIP = 10.0  # the largest gradient norm a step applies
PROGRESS_EVERY = 20  # steps between the progress bar's readings of the loss (each waits for the device)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run: rank of world_size processes, on device."""

    rank: int
    world_size: int
    device: torch.device
    launched: bool = False  # by torchrun: a process group exists, also for one process (the same collective path)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.launched


def setup(device: str = "auto") -> DistEnv:
    """Join the process group that torchrun describes (if any) and pick the device: "auto", "cpu" or "cuda"."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    launched = "WORLD_SIZE" in os.environ  # torchrun sets it for every process it starts
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = (int(os.environ.get(name, "0")) for name in ("RANK", "LOCAL_RANK"))
    dev = torch.device("cpu")
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UsageError("--device", f"process {local_rank} of this node needs CUDA device {local_rank}, but only "
                                         f"{torch.cuda.device_count()} are visible")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    if launched and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world_size)
    return DistEnv(rank, world_size, dev, launched)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def builtin_root(ensure: Callable[[bool], Path], progress: bool, env: DistEnv) -> Path:
    """The built-in dataset ``ensure(progress)`` finds or makes: the main process first (printing it), then the rest."""
    if env.is_main:
        root = ensure(progress)
        print(f"built-in data: {root} {describe_size(root)}")
    barrier(env)
    return ensure(False)


@contextlib.contextmanager
def _atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A temporary file by ``path``, flushed and renamed over it at the block's end, removed if it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # still there only if the block raised


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """torch.save ``state`` (tensors, numbers, strings, None and lists/tuples/dicts of them: what ``load_checkpoint``
    accepts) to ``path`` atomically, streamed to the file, not serialised in memory first (160 MB at full size)."""
    with _atomic_file(path) as f:
        torch.save(state, f)


def _unsafe_reason(exc: Exception) -> str:
    """The line of a torch.load error that says what was wrong, without torch's general advice."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip()
    specific = [line for line in lines if "weights_only" not in line and "documentation" not in line]
    return f"{type(exc).__name__}: {(specific or lines or ['no detail'])[0]}"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The state ``save_checkpoint`` wrote at ``path``, or None if there is none yet. Loaded ``weights_only``, so a
    tampered or foreign file cannot run code: anything but tensors and plain values is a RuntimeError naming it."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; this also catches truncated files
            reason = "not a torch zip archive: truncated, or another kind of file"
        else:
            state = torch.load(path, map_location=map_location, weights_only=True)
            if isinstance(state, dict):
                return state
            reason = f"it holds a {type(state).__name__}, not a dict"
    except OSError as exc:
        raise RuntimeError(f"checkpoint {path}: cannot be read ({exc})") from exc
    except Exception as exc:
        reason = _unsafe_reason(exc)
    raise RuntimeError(f"checkpoint {path}: not a gpoe_fusion checkpoint or unsafe to load ({reason}); delete it to "
                       f"start over")


def write_json(path: str | Path, obj: Any) -> None:
    """JSON-dump ``obj`` (indented) to ``path`` atomically."""
    with _atomic_file(path) as f:
        f.write((json.dumps(obj, indent=2) + "\n").encode())


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc malloc.h's parameter numbers for mallopt


def _mallopt(settings: dict[int, int]) -> bool:
    """glibc's mallopt(parameter, value) for each of ``settings``, also for forked workers: whether all took effect."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all([bool(mallopt(parameter, value)) for parameter, value in settings.items()])


def pin_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """--low-memory: fix glibc's mmap threshold at ``nbytes``, as glibc raises it to every freed mapped block and the
    heap then fragments (a full-size step peaked at 2.29 GB by the third step instead of 1.93 GB)."""
    return _mallopt({_M_MMAP_THRESHOLD: nbytes})


def reuse_freed_memory() -> bool:
    """Without --low-memory: glibc keeps freed blocks in its heap for reuse, not mapping each large block afresh and
    page-faulting it in on first write (1-2.5 us per 4 KiB page; docs/kernels.md, "Memory"): faster, peak kept."""
    return _mallopt({_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1})


@contextlib.contextmanager
def session(args: argparse.Namespace) -> Iterator[DistEnv]:
    """The process's part in the command: the allocator (--low-memory or not), the process group (under torchrun) and
    the device; a value found wrong on the way (UsageError) ends the program with one line and exit status 2."""
    (pin_mmap_threshold if args.low_memory else reuse_freed_memory)()
    try:
        env = setup(args.device)
        if env.is_main and args.rgb_weights is None:
            print("note: the RGB encoder (ResNet-18) starts from random weights; the paper starts from ImageNet "
                  "weights (give torchvision's resnet18 checkpoint file with --rgb-weights)")
        yield env
    except UsageError as error:
        exit_with(str(error))
    cleanup(env)


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
    """The learning-rate factor of each step: a linear warm-up over --warmup-epochs, then a cosine decay to 0."""
    total, warmup = max(1, args.epochs * steps_per_epoch), max(1, int(args.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return factor


def _add(sums: dict[str, list], key: str, total: Tensor, count: Tensor | int) -> None:
    """sums[key] += (total, count), without reading either."""
    sums[key] = [a + b for a, b in zip(sums.get(key, (0.0, 0)), (total.detach().double(), count))]


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
    """One pass over ``loader`` (its first ``steps`` batches if given), a clipped AdamW step per batch. Returns the
    epoch means of the objective's terms and, for gPoE, of alpha per modality and corruption flag."""
    model.train()
    core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
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
    """Train ``model`` for --epochs (or --max-steps), checkpointing to --out after every epoch; --resume continues a
    run of the same signature exactly. Returns per epoch ``train_one_epoch``'s means, epoch, steps and seconds."""
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
    # fused: one kernel over all parameters, not ten ops per tensor (2.5-3 ms of a 60-80 ms demo step on 2 CPU cores).
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(args, len(loader)))
    history, start = _resume(path, model, optimizer, scheduler, args, env, log) if args.resume else ([], 0)
    ddp = nn.parallel.DistributedDataParallel(model) if env.distributed else model
    # Forked loader workers share this process's pages until written; the garbage collector writes to every object
    # it visits, so unfrozen the workers soon copy the heap (two workers added 240 MB at full size; frozen, 50-100).
    gc.collect()
    gc.freeze()
    try:
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
    finally:
        gc.unfreeze()
    return history


def runner(build_model: Callable[[argparse.Namespace], nn.Module], evaluate: Callable[..., dict], train_set: Dataset,
           eval_set: Dataset, env: DistEnv) -> Callable[[argparse.Namespace], dict | None]:
    """A pipeline's run, ``run(args)``: ``build_model(args)`` trained with ``data.training_noise``, then on the main
    process its result (``evaluate``'s metric groups and the run's record) written to --out/results.json, returned."""
    def run(args: argparse.Namespace) -> dict | None:
        model = build_model(args)
        history = train(model, training_noise(train_set, args), args, env)
        if not env.is_main:
            return None
        result = {"fusion": args.fusion, "seed": args.seed, **evaluate(model, eval_set, args, env.device),
                  "train_seconds": sum(h["seconds"] for h in history), "history": history, "dir": str(args.out),
                  "signature": run_signature(args)}
        write_json(Path(args.out) / "results.json", result)
        return result
    return run
