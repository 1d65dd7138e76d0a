"""What both pipelines' experiments share: command-line options, presets, the fusion choice, the
training noise (Section 4.3), test-time corruption levels, gPoE's alpha analysis, and the run of
one fusion or the comparison of all three with its results.json."""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import gpoe_fusion as gf
from gpoe_fusion.noise import CorruptedDataset, GaussianPointNoise, PixelCorruption

from .checkpoint import write_json
from . import distributed
from .distributed import DistEnv
from .model import CrossModalVAE
from .report import FUSION_LABELS
from .training import TrainConfig, fit

__all__ = ["FUSIONS", "TEST_CORRUPTION", "add_common_arguments", "alpha_by_corruption", "apply_preset",
           "make_fusion", "run_fusions", "test_corruption", "train_and_evaluate", "train_config", "training_noise",
           "write_summary"]

BuildModel = Callable[[argparse.Namespace, str], CrossModalVAE]
# evaluate(model, dataset, level, args, device) -> the metrics of one test-corruption level.
Evaluate = Callable[[CrossModalVAE, Dataset, float, argparse.Namespace, torch.device], dict]

FUSIONS = ("moe", "poe", "gpoe")
TEST_CORRUPTION = (0.0, 0.25, 0.5, 0.7)
# Seeds of the corruptions: distinct streams for the training RGB, training points and test RGB.
_SEED_RGB, _SEED_POINTS, _SEED_TEST = 1, 2, 3


def add_common_arguments(parser: argparse.ArgumentParser, presets: Mapping[str, Mapping[str, object]]) -> None:
    """Options both pipelines take. Unset options (None) are filled from the preset."""
    parser.add_argument("--preset", choices=sorted(presets), default="demo", help="sizes and schedule (default: demo)")
    parser.add_argument("--data-root", default=None, help="the real dataset's folder; default: built-in data")
    parser.add_argument("--cache-dir", default="data", help="where built-in data is generated (once)")
    parser.add_argument("--out", default=None, help="output folder (results.json, checkpoints, plots)")
    parser.add_argument("--fusion", choices=FUSIONS, default="gpoe", help="the fusion layer (default: gpoe)")
    parser.add_argument("--credibility", choices=("joint", "independent", "global"), default="joint",
                        help="gPoE's credibility network (default: joint, paper Fig. 2)")
    parser.add_argument("--compare", action="store_true", help="train MoE, PoE and gPoE alike and compare them")
    parser.add_argument("--resume", action="store_true", help="continue a killed run from its checkpoints")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--beta", type=float, default=None, help="KL weight (paper Eq. 15)")
    parser.add_argument("--latent-dim", type=int, default=None)
    parser.add_argument("--num-train", type=int, default=None, help="training samples used (default: preset)")
    parser.add_argument("--num-eval", type=int, default=None, help="evaluation samples used (default: preset)")
    parser.add_argument("--data-corruption", type=float, default=None,
                        help="fraction of training samples whose RGB is pixel-corrupted (and, independently, "
                             "whose point cloud gets Gaussian noise)")
    parser.add_argument("--train-pixel-corruption", type=float, default=None,
                        help="share of pixels replaced in a corrupted training image")
    parser.add_argument("--point-noise", type=float, default=None,
                        help="std of the Gaussian noise on a corrupted training point cloud (normalised units)")
    parser.add_argument("--test-corruption", type=float, nargs="+", default=list(TEST_CORRUPTION),
                        help="test-time pixel-corruption levels (default: 0 0.25 0.5 0.7)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    parser.add_argument("--no-amp", action="store_true", help="no bf16 autocast on GPU")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def apply_preset(args: argparse.Namespace, presets: Mapping[str, Mapping[str, object]]) -> argparse.Namespace:
    """Fill every option left unset (None) from the chosen preset."""
    for key, value in presets[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for name in ("data_corruption", "train_pixel_corruption"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise SystemExit(f"--{name.replace('_', '-')}: expected a fraction in [0, 1], got {getattr(args, name)}")
    for level in args.test_corruption:
        if not 0.0 <= level <= 1.0:
            raise SystemExit(f"--test-corruption: expected fractions in [0, 1], got {level}")
    return args


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                       warmup_epochs=args.warmup_epochs, seed=args.seed, amp=not args.no_amp,
                       num_workers=args.workers, progress=not args.no_progress)


def make_fusion(name: str, latent_dim: int, feature_dims: Sequence[int], credibility: str = "joint") -> nn.Module:
    """The fusion layer named ``name``; everything around it stays the same (paper Section 5.3)."""
    if name == "poe":
        return gf.PoE()
    if name == "moe":
        return gf.MoE()
    if name == "gpoe":
        return gf.GPoE(len(feature_dims), latent_dim, feature_dims, credibility=credibility, hidden=(128,))
    raise ValueError(f"fusion: expected one of {FUSIONS}, got {name!r}")


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


@torch.no_grad()
def alpha_by_corruption(model: nn.Module, dataset: Dataset, levels: Sequence[float], seed: int,
                        device: torch.device, batch_size: int = 64) -> dict[str, dict[str, float]] | None:
    """gPoE's mean alpha per modality when the test RGB is corrupted at each level (None without gPoE).

    Returns {level: {modality: mean alpha}}: does the model trust RGB less as it gets noisier?
    """
    if not isinstance(model.objective.fusion, gf.GPoE):
        return None
    model.eval()
    out = {}
    for level in levels:
        loader = DataLoader(test_corruption(dataset, level, seed), batch_size=batch_size)
        sums = torch.zeros(len(model.modalities), dtype=torch.float64)
        count = 0
        for batch in loader:
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
    history = fit(model, training_noise(train_set, args), train_config(args), env, out_dir, resume=args.resume,
                  log=print if env.is_main else (lambda _: None))
    if not env.is_main:
        return model, None
    metrics = {str(level): evaluate(model, eval_set, level, args, env.device) for level in args.test_corruption}
    result = {"fusion": fusion, "metrics": metrics,
              "alpha": alpha_by_corruption(model, eval_set, args.test_corruption, args.seed, env.device),
              "train_seconds": time.perf_counter() - began, "history": history}
    write_json(out_dir / "results.json", result)
    return model, result


def run_experiment(args: argparse.Namespace, load_data: Callable, build_model: BuildModel, evaluate: Evaluate,
                   write_report: Callable) -> dict | None:
    """The body of both pipelines' ``main``: join the process group, load the data, train and
    evaluate the fusion(s), and on the main process write the report and print its tables.

    load_data(args, env) -> (train_set, eval_set); write_report(args, results, models, eval_set,
    seconds) -> the tables as markdown. Returns {fusion: result} on the main process, else None.
    """
    env = distributed.setup(args.device)
    began = time.perf_counter()
    train_set, eval_set = load_data(args, env)
    results, models = run_fusions(args, env, build_model, evaluate, train_set, eval_set)
    summary = None
    if env.is_main:
        tables = write_report(args, results, models, eval_set, time.perf_counter() - began)
        print(f"\n{tables}\nresults, plots and checkpoints in {args.out} ({time.perf_counter() - began:.0f} s)")
        summary = results
    distributed.cleanup(env)
    return summary


def run_fusions(args: argparse.Namespace, env: DistEnv, build_model: BuildModel, evaluate: Evaluate,
                train_set: Dataset, eval_set: Dataset) -> tuple[dict[str, dict | None], dict[str, CrossModalVAE]]:
    """``args.fusion`` trained into ``args.out``, or with ``--compare`` MoE, PoE and gPoE trained alike,
    each into ``args.out/<fusion>``. Returns ({fusion: result}, {fusion: model})."""
    fusions = FUSIONS if args.compare else (args.fusion,)
    results, models = {}, {}
    for fusion in fusions:
        run_dir = Path(args.out) / fusion if args.compare else Path(args.out)
        if env.is_main:
            print(f"== {FUSION_LABELS[fusion]}: {len(train_set)} training samples, {args.epochs} epochs, "
                  f"on {env.device} x{env.world_size} (kernels: {'on' if gf.extension_available() else 'off'})")
        models[fusion], results[fusion] = train_and_evaluate(args, fusion, build_model, evaluate, train_set, eval_set,
                                                             env, run_dir)
    return results, models


def write_summary(args: argparse.Namespace, task: str, data: str, results: Mapping[str, dict], seconds: float,
                  **extra: object) -> dict:
    """Write ``args.out/results.json``: the task, preset, seed, data, time, machine, the full config,
    any ``extra`` entries, and the results of every fusion. Returns what was written."""
    summary = {"task": task, "preset": args.preset, "seed": args.seed, "data": data, "seconds": seconds,
               "machine": platform.platform(), "torch": torch.__version__,
               "kernel_extension": gf.extension_available(), "config": vars(args), **extra, "fusions": dict(results)}
    write_json(Path(args.out) / "results.json", summary)
    return summary
