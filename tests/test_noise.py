"""Noise simulation: exact corrupted fractions, seeded reproducibility."""

import pytest
import torch
from torch.utils.data import Dataset

from gpoe_fusion.noise import (CorruptedDataset, Desynchronisation, GaussianPointNoise, PixelCorruption, gaussian_point_noise,
                               other_index, pixel_corruption)


@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 0.7, 1.0])
def test_pixel_corruption_replaces_exactly_p_of_the_pixels(p):
    image = torch.full((2, 3, 20, 30), -1.0)  # outside [0, 1]: every replaced value shows
    out = pixel_corruption(image, p, torch.Generator().manual_seed(0))
    changed = (out != -1.0)
    assert (changed.all(dim=1) == changed.any(dim=1)).all()  # all channels of a pixel together
    per_image = changed.any(dim=1).flatten(1).sum(1)
    assert per_image.tolist() == [round(p * 600)] * 2
    assert ((out[changed] >= 0) & (out[changed] <= 1)).all()
    assert (image == -1.0).all()  # the input is untouched


def test_pixel_corruption_uint8_and_seeds():
    image = torch.zeros(3, 16, 16, dtype=torch.uint8)
    a = pixel_corruption(image, 0.5, torch.Generator().manual_seed(3))
    b = pixel_corruption(image, 0.5, torch.Generator().manual_seed(3))
    c = pixel_corruption(image, 0.5, torch.Generator().manual_seed(4))
    assert a.dtype == torch.uint8 and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="p: expected a fraction"):
        pixel_corruption(image, 1.5)


def test_gaussian_point_noise_statistics():
    points = torch.zeros(50000, 3)
    noisy = gaussian_point_noise(points, 0.1, torch.Generator().manual_seed(0))
    assert abs(noisy.std().item() - 0.1) < 2e-3 and abs(noisy.mean().item()) < 2e-3
    torch.testing.assert_close(GaussianPointNoise(0.1)(points, torch.Generator().manual_seed(0)), noisy)


class Toy(Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, i):
        return {"rgb": torch.full((3, 8, 8), -1.0), "index": torch.tensor(i)}


def test_corrupted_dataset_fraction_and_reproducibility():
    data = CorruptedDataset(Toy(), "rgb", 0.25, PixelCorruption(0.5), seed=7)
    flags = torch.stack([data[i]["corrupted_rgb"] for i in range(40)])
    assert int(flags.sum()) == 10
    again = CorruptedDataset(Toy(), "rgb", 0.25, PixelCorruption(0.5), seed=7)
    for i in reversed(range(40)):  # any access order gives the same samples
        torch.testing.assert_close(again[i]["rgb"], data[i]["rgb"])
    for i in range(40):
        changed = (data[i]["rgb"] != -1.0).any(0).sum().item()
        assert changed == (32 if flags[i] else 0)
    other = CorruptedDataset(Toy(), "rgb", 0.25, PixelCorruption(0.5), seed=8)
    assert not torch.equal(other.corrupted, data.corrupted)


def test_redrawn_noise_changes_with_the_epoch_only():
    fixed = CorruptedDataset(Toy(), "rgb", 0.25, PixelCorruption(0.5), seed=7)
    fresh = CorruptedDataset(Toy(), "rgb", 0.25, PixelCorruption(0.5), seed=7, redraw=True)
    assert torch.equal(fresh.corrupted, fixed.corrupted)  # the same samples are corrupted
    i = int(fresh.corrupted.nonzero()[0])
    first = fresh[i]["rgb"]
    fixed.set_epoch(1)
    fresh.set_epoch(1)
    second = fresh[i]["rgb"]
    assert not torch.equal(first, second)
    assert torch.equal(fixed[i]["rgb"], CorruptedDataset(Toy(), "rgb", 0.25, PixelCorruption(0.5), seed=7)[i]["rgb"])
    fresh.set_epoch(0)  # an epoch's noise is a function of (seed, epoch, index): a resumed run sees it again
    assert torch.equal(fresh[i]["rgb"], first)
    clean = int((~fresh.corrupted).nonzero()[0])
    assert torch.equal(fresh[clean]["rgb"], torch.full((3, 8, 8), -1.0))


def test_set_epoch_reaches_a_corrupted_dataset_inside():
    inner = CorruptedDataset(Toy(), "rgb", 0.5, PixelCorruption(0.5), seed=1, redraw=True)
    outer = CorruptedDataset(inner, "index", 0.0, PixelCorruption(0.5), seed=2)
    outer.set_epoch(3)
    assert inner.epoch == 3 and outer.epoch == 3


def test_other_index_is_uniform_over_the_others_and_never_itself():
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor([other_index(2, 5, generator) for _ in range(8000)])
    assert not (draws == 2).any()
    counts = torch.bincount(draws, minlength=5).tolist()
    assert counts[2] == 0 and all(abs(c - 2000) < 150 for i, c in enumerate(counts) if i != 2)  # 2000 +- 4 sigma
    assert other_index(0, 2) == 1 and other_index(1, 2) == 0
    with pytest.raises(ValueError, match="size: expected at least 2"):
        other_index(0, 1)
    with pytest.raises(IndexError, match="index: expected 0 <= index < 5"):
        other_index(5, 5)


class Stream(Dataset):
    """Sample i's modalities both hold i, as synchronised sensors would."""

    def __len__(self):
        return 30

    def __getitem__(self, i):
        return {"rgb": torch.full((2, 3), float(i)), "depth": torch.full((4,), float(i))}


def test_desynchronised_modality_comes_from_another_sample():
    data = CorruptedDataset(Stream(), "rgb", 0.5, Desynchronisation(), seed=3)
    flags = torch.stack([data[i]["corrupted_rgb"] for i in range(30)])
    assert flags.dtype == torch.bool and int(flags.sum()) == 15 and torch.equal(flags, data.corrupted)
    sources = set()
    for i in range(30):
        item = data[i]
        rgb = item["rgb"]
        assert rgb.shape == (2, 3) and (rgb == rgb[0, 0]).all()  # a whole sample's modality, as delivered
        source = int(rgb[0, 0])
        assert torch.equal(item["depth"], torch.full((4,), float(i)))  # the other modality stays in step
        assert (source != i) == bool(flags[i])  # corrupted samples never get their own, clean ones always do
        if flags[i]:
            sources.add(source)
    assert len(sources) > 5  # drawn over the dataset, not one fixed partner


def test_desynchronisation_is_reproducible_and_redrawn_per_epoch():
    def sources(data):
        return [int(data[i]["rgb"][0, 0]) for i in range(30)]

    first = CorruptedDataset(Stream(), "rgb", 0.5, Desynchronisation(), seed=3, redraw=True)
    again = CorruptedDataset(Stream(), "rgb", 0.5, Desynchronisation(), seed=3, redraw=True)
    assert sources(first) == sources(again)
    assert [int(again[i]["rgb"][0, 0]) for i in reversed(range(30))] == sources(first)[::-1]  # any access order
    other_seed = CorruptedDataset(Stream(), "rgb", 0.5, Desynchronisation(), seed=4, redraw=True)
    assert sources(other_seed) != sources(first)
    epoch0 = sources(first)
    first.set_epoch(1)
    epoch1 = sources(first)
    corrupted = first.corrupted.nonzero().flatten().tolist()
    assert [epoch0[i] for i in corrupted] != [epoch1[i] for i in corrupted]  # a new partner every epoch
    assert all(epoch1[i] != i for i in corrupted)
    first.set_epoch(0)
    assert sources(first) == epoch0


class Single(Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        return {"rgb": torch.zeros(3)}


def test_desynchronisation_composes_with_the_other_corruptions():
    # Depth noised in some samples, then RGB desynchronised: the replacement is the other sample's RGB as the
    # wrapped dataset delivers it, and each flag speaks of its own modality.
    noised = CorruptedDataset(Stream(), "depth", 0.5, GaussianPointNoise(0.1), seed=1)
    data = CorruptedDataset(noised, "rgb", 1.0, Desynchronisation(), seed=2)
    for i in range(30):
        item = data[i]
        assert bool(item["corrupted_rgb"]) and int(item["rgb"][0, 0]) != i
        assert bool(item["corrupted_depth"]) == bool(noised.corrupted[i])
        assert torch.equal(item["depth"], noised[i]["depth"])
    assert repr(Desynchronisation()) == "Desynchronisation()"
    with pytest.raises(ValueError, match="size: expected at least 2"):
        CorruptedDataset(Single(), "rgb", 1.0, Desynchronisation())[0]  # no other sample to take
