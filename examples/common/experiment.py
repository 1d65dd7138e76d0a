"""What both pipelines' experiments share: command-line options, presets, the fusion choice, the
training noise (Section 4.3), test-time corruption levels, and gPoE's alpha analysis."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import gpoe_fusion as gf
from gpoe_fusion.noise import CorruptedDataset, GaussianPointNoise, PixelCorruption

from .training import TrainConfig

__all__ = ["FUSIONS", "TEST_CORRUPTION", "add_common_arguments", "alpha_by_corruption", "apply_preset",
           "make_fusion", "test_corruption", "train_config", "training_noise"]

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
