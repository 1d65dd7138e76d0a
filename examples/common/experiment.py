"""What both pipelines' experiments share: the fusion choice, the training noise (Section 4.3),
test-time corruption, gPoE's alpha analysis, and the run of one fusion or the comparison of all
three with its results.json. The command-line options are in ``common.options``."""

from __future__ import annotations

import argparse
import gc
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import gpoe_fusion as gf
from gpoe_fusion.noise import CorruptedDataset, GaussianPointNoise, PixelCorruption

from . import distributed
from .checkpoint import write_json
from .cli import UsageError, exit_with
from .distributed import DistEnv
from .memory import pin_mmap_threshold
from .model import CrossModalVAE
from .options import FUSIONS, provenance, run_signature
from .report import FUSION_LABELS
from .training import CHECKPOINT, ConfigMismatch, TrainConfig, fit

__all__ = ["alpha_by_corruption", "describe_size", "eval_loader", "make_fusion", "mixture_kl", "run_experiment", "run_fusions",
           "test_corruption", "train_and_evaluate", "train_config", "training_noise", "write_summary"]

BuildModel = Callable[[argparse.Namespace, str], CrossModalVAE]
# evaluate(model, dataset, level, args, device) -> the metrics of one test-corruption level.
Evaluate = Callable[[CrossModalVAE, Dataset, float, argparse.Namespace, torch.device], dict]

# Seeds of the corruptions: distinct streams for the training RGB, training points and test RGB.
_SEED_RGB, _SEED_POINTS, _SEED_TEST = 1, 2, 3


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                       warmup_epochs=args.warmup_epochs, seed=args.seed, amp=not args.no_amp,
                       num_workers=args.workers, progress=not args.no_progress, max_steps=args.max_steps,
                       signature=run_signature(args))


def make_fusion(name: str, latent_dim: int, feature_dims: Sequence[int], credibility: str = "joint") -> nn.Module:
    """The fusion layer named ``name``; everything around it stays the same (paper Section 5.3)."""
    if name == "poe":
        return gf.PoE()
    if name == "moe":
        return gf.MoE()
    if name == "mopoe":
        return gf.MoPoE()
    if name == "gpoe":
        return gf.GPoE(len(feature_dims), latent_dim, feature_dims, credibility=credibility, hidden=(128,))
    raise ValueError(f"fusion: expected one of {FUSIONS}, got {name!r}")


def mixture_kl(fusion: str) -> str:
    """The KL term of a mixture fusion's objective: MoPoE's own, the mixture-weighted KL of its subset
    posteriors; MMVAE's estimate of the mixture's KL for MoE (``CrossModalObjective``'s ``kl``)."""
    return "components" if fusion == "mopoe" else "mixture"


def training_noise(dataset: Dataset, args: argparse.Namespace, rgb_key: str = "rgb", points_key: str = "points") -> Dataset:
    """Corrupt the RGB of a seeded fraction of the samples (pixel corruption) and, independently,
    the point cloud of another seeded fraction (Gaussian noise), as in Section 4.3."""
    if args.data_corruption <= 0:
        return dataset
    seed = args.seed * 10
    dataset = CorruptedDataset(dataset, rgb_key, args.data_corruption, PixelCorruption(args.train_pixel_corruption),
                               seed=seed + _SEED_RGB)
    if args.point_noise > 0:
        dataset = CorruptedDataset(dataset, points_key, args.data_corruption, GaussianPointNoise(args.point_noise),
                                   seed=seed + _SEED_POINTS)
    return dataset


def test_corruption(dataset: Dataset, level: float, seed: int, key: str = "rgb") -> Dataset:
    """Every sample's ``key`` pixel-corrupted at ``level`` (seeded), as the paper's test settings."""
    if level <= 0:
        return dataset
    return CorruptedDataset(dataset, key, 1.0, PixelCorruption(level), seed=seed * 10 + _SEED_TEST)


def eval_loader(dataset: Dataset, args: argparse.Namespace) -> DataLoader:
    """Batches of ``dataset`` in order, --eval-batch-size at a time, decoded by --workers processes."""
    return DataLoader(dataset, batch_size=args.eval_batch_size, num_workers=args.workers)


@torch.no_grad()
def alpha_by_corruption(model: nn.Module, dataset: Dataset, args: argparse.Namespace,
                        device: torch.device) -> dict[str, dict[str, float]] | None:
    """gPoE's mean alpha per modality when the test RGB is corrupted at each --test-corruption level
    (None without gPoE). Returns {level: {modality: mean alpha}}: does the model trust RGB less as
    it gets noisier?
    """
    if not isinstance(model.objective.fusion, gf.GPoE):
        return None
    model.eval()
    out = {}
    for level in args.test_corruption:
        sums = torch.zeros(len(model.modalities), dtype=torch.float64)
        count = 0
        for batch in eval_loader(test_corruption(dataset, level, args.seed), args):
            batch = {k: v.to(device) for k, v in batch.items()}
            alpha: Tensor = model.credibility(batch)
            sums += alpha.double().mean(-1).sum(1).cpu()
            count += alpha.shape[1]
        out[str(level)] = {name: float(s / count) for name, s in zip(model.modalities, sums)}
    return out


def train_and_evaluate(args: argparse.Namespace, fusion: str, build_model: BuildModel, evaluate: Evaluate,
                       train_set: Dataset, eval_set: Dataset, env: DistEnv,
                       out_dir: Path) -> tuple[CrossModalVAE, dict | None]:
    """Train ``build_model(args, fusion)`` on the noisy ``train_set`` (checkpoints in ``out_dir``),
    then, on the main process, evaluate it at every ``args.test_corruption`` level and write
    ``out_dir/results.json``. Returns the model and its result (None on the other ranks):
    ``{"fusion", "metrics": {str(level): evaluate(...)}, "alpha", "train_seconds", "history"}``.
    """
    model = build_model(args, fusion)
    began = time.perf_counter()
    try:
        history = fit(model, training_noise(train_set, args), train_config(args), env, out_dir, resume=args.resume,
                      log=print if env.is_main else (lambda _: None))
    except ConfigMismatch as error:
        raise UsageError("--resume", f"{error}; resume with the options of that run, or choose another --out")
    except RuntimeError as error:  # load_checkpoint refuses a file that is no safe checkpoint
        if args.resume and str(error).startswith(f"checkpoint {out_dir / CHECKPOINT}"):
            raise UsageError("--resume", str(error))
        raise
    if not env.is_main:
        return model, None
    metrics = {str(level): evaluate(model, eval_set, level, args, env.device) for level in args.test_corruption}
    result = {"fusion": fusion, "metrics": metrics, "alpha": alpha_by_corruption(model, eval_set, args, env.device),
              "train_seconds": time.perf_counter() - began, "history": history}
    write_json(out_dir / "results.json", result)
    return model, result


def _setup(args: argparse.Namespace) -> DistEnv:
    try:
        return distributed.setup(args.device)
    except (ValueError, RuntimeError) as error:
        raise UsageError("--device", str(error).removeprefix("device: ")) from None


def _check_batch(args: argparse.Namespace, train_set: Dataset, env: DistEnv) -> None:
    per_rank = len(train_set) // env.world_size
    if per_rank < args.batch_size:
        raise UsageError("--batch-size", f"{args.batch_size} is more than the {per_rank} training samples of each of "
                                         f"the {env.world_size} process(es); lower it or raise --num-train")


def run_experiment(args: argparse.Namespace, load_data: Callable, build_model: BuildModel, evaluate: Evaluate,
                   write_report: Callable) -> dict | None:
    """The body of both pipelines' ``main``: join the process group, load the data, train and
    evaluate the fusion(s), and on the main process write the report and print its tables.

    load_data(args, env) -> (train_set, eval_set); write_report(args, results, models, eval_set,
    seconds) -> the tables as markdown. Returns {fusion: result} on the main process, else None.
    A value found wrong on the way (UsageError) ends the program with one line and exit status 2.
    """
    if args.low_memory:
        pin_mmap_threshold()
    try:
        env = _setup(args)
        began = time.perf_counter()
        if env.is_main and args.rgb_weights is None:
            print("note: the RGB encoder (ResNet-18) starts from random weights; the paper starts from ImageNet "
                  "weights (give torchvision's resnet18 checkpoint file with --rgb-weights)")
        train_set, eval_set = load_data(args, env)
        _check_batch(args, train_set, env)
        # Loader workers are forked from this process and share its pages until they write to them;
        # the cyclic garbage collector writes to every object it visits, so without freezing them the
        # workers soon hold private copies of the interpreter's heap (at the full-size preset, two
        # workers added 240 MB to the process tree when they started; frozen, 50-100 MB).
        gc.collect()
        gc.freeze()
        try:
            results, models = run_fusions(args, env, build_model, evaluate, train_set, eval_set)
        finally:
            gc.unfreeze()
    except UsageError as error:
        exit_with(str(error))
    summary = None
    if env.is_main:
        tables = write_report(args, results, models, eval_set, time.perf_counter() - began)
        print(f"\n{tables}\nresults and plots in {args.out} ({time.perf_counter() - began:.0f} s); "
              + "; ".join(f"{path} {describe_size(path)}" for path in sorted(Path(args.out).rglob(CHECKPOINT))))
        summary = results
    distributed.cleanup(env)
    return summary


def run_fusions(args: argparse.Namespace, env: DistEnv, build_model: BuildModel, evaluate: Evaluate,
                train_set: Dataset, eval_set: Dataset) -> tuple[dict[str, dict | None], dict[str, CrossModalVAE]]:
    """``args.fusion`` trained into ``args.out``, or with ``--compare`` MoE, PoE and gPoE trained alike,
    each into ``args.out/<fusion>``. Returns ({fusion: result}, {fusion: model})."""
    fusions = tuple(args.fusions) if args.compare else (args.fusion,)
    results, models = {}, {}
    for fusion in fusions:
        run_dir = Path(args.out) / fusion if args.compare else Path(args.out)
        if env.is_main:
            steps = f", at most {args.max_steps} steps" if args.max_steps else ""
            print(f"== {FUSION_LABELS[fusion]}: {len(train_set)} training samples, {args.epochs} epochs{steps}, "
                  f"on {env.device} x{env.world_size} (kernels: {'on' if gf.extension_available() else 'off'})")
        models[fusion], results[fusion] = train_and_evaluate(args, fusion, build_model, evaluate, train_set, eval_set,
                                                             env, run_dir)
    return results, models


def describe_size(path: str | Path) -> str:
    """The disk space a file or folder takes, e.g. ``"(172 MB)"``."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return f"({sum(os.path.getsize(p) for p in files) / 1e6:.0f} MB)"


def write_summary(args: argparse.Namespace, task: str, data: str, results: Mapping[str, dict], seconds: float,
                  presets: Mapping[str, Mapping[str, object]], from_paper: Mapping[str, str],
                  **extra: object) -> dict:
    """Write ``args.out/results.json``: the task, preset, seed, data, time, machine, the full config,
    where each setting comes from (``provenance``), any ``extra`` entries, and the results of
    every fusion. Returns what was written."""
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "given"}
    summary = {"task": task, "preset": args.preset, "seed": args.seed, "data": data, "seconds": seconds,
               "machine": platform.platform(), "torch": torch.__version__,
               "kernel_extension": gf.extension_available(), "config": config,
               "provenance": provenance(args, presets, from_paper), **extra, "fusions": dict(results)}
    write_json(Path(args.out) / "results.json", summary)
    return summary
