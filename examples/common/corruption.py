"""The corruptions of the experiments (paper Section 4.3), each drawn from the run's seed: the noise
on the training samples, the test-time pixel corruption, and the held-out credibility set, on which
per-sample flags measure whether a fusion's weights track the noise (nothing in training sees them).
"""

from __future__ import annotations

import argparse

from torch.utils.data import Dataset

from gpoe_fusion.noise import CorruptedDataset, GaussianPointNoise, PixelCorruption

__all__ = ["CREDIBILITY_FRACTION", "credibility_set", "test_corruption", "training_noise"]

# Distinct random streams of one seed: the training RGB and points, the test RGB, and the
# credibility set's RGB and points.
_SEED_RGB, _SEED_POINTS, _SEED_TEST, _SEED_CREDIBILITY_RGB, _SEED_CREDIBILITY_POINTS = 1, 2, 3, 4, 5
# Share of the credibility set's samples with each modality corrupted: the two groups of equal size
# that an AUROC compares best.
CREDIBILITY_FRACTION = 0.5


def training_noise(dataset: Dataset, args: argparse.Namespace, rgb_key: str = "rgb", points_key: str = "points") -> Dataset:
    """Corrupt the RGB of a seeded fraction of the samples (pixel corruption) and, independently,
    the point cloud of another seeded fraction (Gaussian noise), as in Section 4.3; with
    --training-noise fresh their noise is drawn anew every epoch (the training loop's ``set_epoch``)."""
    if args.data_corruption <= 0:
        return dataset
    seed = args.seed * 10
    redraw = args.training_noise == "fresh"
    dataset = CorruptedDataset(dataset, rgb_key, args.data_corruption, PixelCorruption(args.train_pixel_corruption),
                               seed=seed + _SEED_RGB, redraw=redraw)
    if args.point_noise > 0:
        dataset = CorruptedDataset(dataset, points_key, args.data_corruption, GaussianPointNoise(args.point_noise),
                                   seed=seed + _SEED_POINTS, redraw=redraw)
    return dataset


def test_corruption(dataset: Dataset, level: float, seed: int, key: str = "rgb") -> Dataset:
    """Every sample's ``key`` pixel-corrupted at ``level`` (seeded), as the paper's test settings."""
    if level <= 0:
        return dataset
    return CorruptedDataset(dataset, key, 1.0, PixelCorruption(level), seed=seed * 10 + _SEED_TEST)


def credibility_set(dataset: Dataset, args: argparse.Namespace, rgb_key: str = "rgb",
                    points_key: str = "points") -> dict[str, tuple[Dataset, dict[str, float]]]:
    """Held-out samples with known corruption, one set per corrupted modality: the RGB of a seeded half
    of ``dataset`` pixel-corrupted at the training strength (--train-pixel-corruption), or the point
    cloud of a seeded half noised at --point-noise, with the training noise's corruptions, every other
    modality clean. Each item flags its own (``corrupted_<key>``, bool).

    One modality at a time, because a fusion's weights share out a whole: with both modalities
    corrupted the weight of neither needs to fall, so a set corrupting both would blur what each
    modality's weight does when that modality alone is corrupted.

    Returns modality -> (its set, its corruption: ``{"pixel_corruption": p}`` or ``{"point_noise": sigma}``).
    A modality whose training strength is 0 is left out: its "corrupted" samples would equal the clean ones.
    """
    seed = args.seed * 10
    sets = {}
    if args.train_pixel_corruption > 0:
        sets[rgb_key] = (CorruptedDataset(dataset, rgb_key, CREDIBILITY_FRACTION,
                                          PixelCorruption(args.train_pixel_corruption), seed=seed + _SEED_CREDIBILITY_RGB),
                         {"pixel_corruption": args.train_pixel_corruption})
    if args.point_noise > 0:
        sets[points_key] = (CorruptedDataset(dataset, points_key, CREDIBILITY_FRACTION,
                                             GaussianPointNoise(args.point_noise), seed=seed + _SEED_CREDIBILITY_POINTS),
                            {"point_noise": args.point_noise})
    return sets
