"""Noise simulation of the paper (Section 4.3), reproducible from a seed.

- Pixel corruption: exactly round(p * H * W) pixels of an image replaced by uniform random values.
- Point-cloud noise: i.i.d. Gaussian noise added to every coordinate.
- Desynchronisation: a sample's modality replaced by the same modality of another sample, as a sensor
  out of step delivers it. Both noises above are visible in the input, so an encoder can learn to
  answer them with a larger variance; a desynchronised input looks like a clean one, so the encoder
  stays as confident as on clean data, and only the disagreement with the other modalities shows it.
- ``CorruptedDataset``: a fixed, seeded subset of a dataset's samples has one modality corrupted;
  sample i's corruption depends only on (seed, i), or with ``redraw`` on (seed, epoch, i), so it does
  not change with worker count or access order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["CorruptedDataset", "Desynchronisation", "GaussianPointNoise", "PixelCorruption", "gaussian_point_noise",
           "other_index", "pixel_corruption"]


def pixel_corruption(image: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Replace a fraction ``p`` of the pixels of each image by uniform random values.

    image: [..., C, H, W], float in [0, 1] or uint8 (random values then span 0..255).
    Exactly round(p * H * W) pixels of every image are replaced, all channels of a pixel at once.
    Returns a new tensor of the same shape and dtype.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: expected a fraction in [0, 1], got {p}")
    if image.dim() < 3:
        raise ValueError(f"image: expected [..., C, H, W], got shape {tuple(image.shape)}")
    *lead, c, h, w = image.shape
    count = round(p * h * w)
    out = image.clone()
    if count == 0 or out.numel() == 0:
        return out
    flat = out.reshape(-1, c, h * w)
    n = flat.shape[0]
    # The first `count` entries of a random permutation: an exact, uniformly chosen pixel set (randperm: a tenth of
    # the time of sorting random keys, which took half of a demo's data loading).
    chosen = torch.stack([torch.randperm(h * w, generator=generator, device=image.device)[:count] for _ in range(n)])
    if image.dtype == torch.uint8:
        values = torch.randint(0, 256, (n, c, count), generator=generator, device=image.device, dtype=torch.uint8)
    elif image.is_floating_point():
        values = torch.rand((n, c, count), generator=generator, device=image.device).to(image.dtype)
    else:
        raise TypeError(f"image: expected a float tensor in [0, 1] or uint8, got {image.dtype}")
    flat.scatter_(2, chosen.unsqueeze(1).expand(n, c, count), values)
    return flat.reshape(image.shape)


def gaussian_point_noise(points: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """points + N(0, sigma^2) on every coordinate. points: [..., P, 3] float -> same shape."""
    if sigma < 0:
        raise ValueError(f"sigma: expected >= 0, got {sigma}")
    if not points.is_floating_point():
        raise TypeError(f"points: expected a float tensor, got {points.dtype}")
    noise = torch.randn(points.shape, generator=generator, device=points.device, dtype=points.dtype)
    return points + sigma * noise


class PixelCorruption:
    """``pixel_corruption`` with a fixed fraction, as a corruption for ``CorruptedDataset``."""

    def __init__(self, p: float):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p: expected a fraction in [0, 1], got {p}")
        self.p = p

    def __call__(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return pixel_corruption(image, self.p, generator)

    def __repr__(self) -> str:
        return f"PixelCorruption(p={self.p})"


class GaussianPointNoise:
    """``gaussian_point_noise`` with a fixed sigma, as a corruption for ``CorruptedDataset``."""

    def __init__(self, sigma: float):
        if sigma < 0:
            raise ValueError(f"sigma: expected >= 0, got {sigma}")
        self.sigma = sigma

    def __call__(self, points: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return gaussian_point_noise(points, self.sigma, generator)

    def __repr__(self) -> str:
        return f"GaussianPointNoise(sigma={self.sigma})"


def other_index(index: int, size: int, generator: torch.Generator | None = None) -> int:
    """An index in [0, size) other than ``index``, uniform over the size - 1 others."""
    if size < 2:
        raise ValueError(f"size: expected at least 2 samples to take another one from, got {size}")
    if not 0 <= index < size:
        raise IndexError(f"index: expected 0 <= index < {size}, got {index}")
    # A shift of 1..size-1 from index: every other index once, index itself never.
    shift = 1 + int(torch.randint(size - 1, (), generator=generator))
    return (index + shift) % size


class Desynchronisation:
    """A corruption for ``CorruptedDataset`` that reads other samples: the corrupted sample's modality is the
    same modality of another sample of the wrapped dataset (``other_index``: uniform over the others, never
    itself), as a sensor out of step delivers it. The replacement is a real input of that modality, so it looks
    clean to its encoder.

    ``CorruptedDataset`` calls ``corrupt(dataset, key, index, generator)`` for it instead of
    ``f(tensor, generator)``; with ``redraw`` the other sample is drawn anew every epoch.
    """

    def corrupt(self, dataset: Dataset, key: str, index: int, generator: torch.Generator | None = None) -> Tensor:
        """Modality ``key`` of another sample of ``dataset`` than ``index``."""
        other = dataset[other_index(int(index), len(dataset), generator)]
        if not isinstance(other, Mapping) or key not in other:
            raise KeyError(f"key: dataset items must be mappings holding {key!r}")
        return other[key]

    def __repr__(self) -> str:
        return "Desynchronisation()"


class CorruptedDataset(Dataset):
    """Corrupts modality ``key`` in a seeded fraction of the samples of ``dataset``.

    dataset: items are mappings of name -> tensor; key: the modality to corrupt;
    fraction: share of samples corrupted (exactly round(fraction * len) of them);
    corruption: ``f(tensor, generator) -> tensor`` (e.g. ``PixelCorruption(0.5)``), or a corruption that
    reads other samples, with a method ``corrupt(dataset, key, index, generator) -> tensor`` given this
    dataset's ``dataset`` (e.g. ``Desynchronisation()``); seed: fixes both which samples are corrupted and
    how. Each item gains ``"corrupted_<key>"``: a bool tensor.

    redraw: the corrupted samples stay the same, but their noise is drawn anew for every epoch
    (``set_epoch``, which also reaches a CorruptedDataset inside this one), as a noisy sensor draws
    it anew at every capture. Without it a sample's noise never changes, and a model that sees it
    many times can learn the noise pattern itself as that sample's signature.
    """

    def __init__(self, dataset: Dataset, key: str, fraction: float, corruption: Callable[[Tensor, torch.Generator], Tensor],
                 seed: int = 0, redraw: bool = False):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction: expected a fraction in [0, 1], got {fraction}")
        self.dataset = dataset
        self.key = key
        self.fraction = fraction
        self.corruption = corruption
        self.seed = seed
        self.redraw = redraw
        self.epoch = 0
        n = len(dataset)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        self.corrupted = torch.zeros(n, dtype=torch.bool)
        self.corrupted[order[: round(fraction * n)]] = True

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose noise ``redraw`` draws (of this dataset and of any CorruptedDataset inside)."""
        self.epoch = int(epoch)
        if isinstance(self.dataset, CorruptedDataset):
            self.dataset.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample = self.dataset[index]
        if not isinstance(sample, Mapping) or self.key not in sample:
            raise KeyError(f"key: dataset items must be mappings holding {self.key!r}")
        sample = dict(sample)
        flag = bool(self.corrupted[index])
        if flag:
            # A generator per sample, seeded by (seed, index), with redraw by (seed, epoch, index):
            # reproducible in any worker and order.
            stream = self.seed * 1_000_003 + self.epoch + 1 if self.redraw else self.seed
            generator = torch.Generator().manual_seed((stream * 1_000_003 + int(index) + 1) % 2**63)
            if hasattr(self.corruption, "corrupt"):
                sample[self.key] = self.corruption.corrupt(self.dataset, self.key, index, generator)
            else:
                sample[self.key] = self.corruption(sample[self.key], generator)
        sample[f"corrupted_{self.key}"] = torch.tensor(flag)
        return sample
