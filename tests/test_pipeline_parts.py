"""The pipelines' building blocks that carry no pipeline of their own: the narrow ResNet-18 family,
FoldingNet's factorised first layer, and the parallel generation and decoding of built-in data."""

import argparse

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import StackDataset

from common import data
from common.data import credibility_set, materialize, ordered_map, training_noise, write_png
from common.networks import FoldingNetDecoder, ResNet18Encoder


@pytest.mark.parametrize("width, stem_pool", [(16, True), (8, False)])
def test_a_narrow_resnet18_has_resnet18s_blocks_with_fewer_channels(width, stem_pool):
    encoder = ResNet18Encoder(latent_dim=6, width=width, stem_pool=stem_pool)
    reference = torchvision.models.resnet18(weights=None)
    reference.fc = torch.nn.Identity()
    # The same layers (names), each with width/64 of ResNet-18's channels.
    names = [n for n, _ in encoder.trunk.named_parameters()]
    assert names == [n for n, _ in reference.named_parameters()]
    for (name, got), (_, full) in zip(encoder.trunk.named_parameters(), reference.named_parameters()):
        expected = [s * width // 64 if s in (64, 128, 256, 512) else s for s in full.shape]
        assert list(got.shape) == expected, name
    mu, logvar, features = encoder(torch.rand(3, 3, 64, 64))
    assert mu.shape == logvar.shape == (3, 6) and features.shape == (3, 8 * width) == (3, encoder.feature_dim)
    assert isinstance(encoder.trunk.maxpool, torch.nn.MaxPool2d) == stem_pool


def test_resnet18_weights_fit_width_64_with_the_stem_pool_only(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    assert ResNet18Encoder(4, weights=path).feature_dim == 512
    with pytest.raises(ValueError, match="weights: ResNet-18 weights fit width 64"):
        ResNet18Encoder(4, weights=path, width=16)
    with pytest.raises(ValueError, match="without it"):
        ResNet18Encoder(4, weights=path, stem_pool=False)
    with pytest.raises(ValueError, match="width: expected a positive"):
        ResNet18Encoder(4, width=0)


def test_foldingnet_is_its_two_mlps_on_the_concatenated_code_and_points():
    """The factorised first layer against the definition: each fold's MLP on [z, point] per point."""
    torch.manual_seed(0)
    decoder = FoldingNetDecoder(latent_dim=5, grid_size=3, hidden=7).double()
    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    code = z.unsqueeze(1).expand(4, 9, 5)
    folded = decoder.fold1(torch.cat([code, decoder.grid.double().expand(4, 9, 2)], dim=-1))
    expected = decoder.fold2(torch.cat([code, folded], dim=-1))
    got = decoder(z)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got.square().sum(), z)[0],
                               torch.autograd.grad(expected.square().sum(), z)[0])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.sampled_from(["L", "RGB", "P"]), st.integers(1, 256),
       st.integers(0, 2**32 - 1))
def test_write_png_decodes_to_its_pixels(tmp_path_factory, height, width, mode, colours, seed):
    """Grey, RGB and palette images of random pixels: Pillow reads back the mode, the values and the colours."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256 if mode != "P" else colours, (height, width, 3) if mode == "RGB" else (height, width),
                          np.uint8)
    palette = rng.integers(0, 256, (colours, 3), np.uint8) if mode == "P" else None
    path = tmp_path_factory.mktemp("png") / "image.png"
    write_png(path, pixels, palette)
    with Image.open(path) as image:
        assert image.mode == mode
        np.testing.assert_array_equal(np.asarray(image), pixels)
        if palette is not None:
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), palette[pixels])


def _square(x: int) -> int:
    return x * x


def test_ordered_map_keeps_the_jobs_order_in_worker_processes():
    jobs = list(range(50))
    assert list(ordered_map(_square, jobs, workers=2, chunksize=3)) == [j * j for j in jobs]
    assert list(ordered_map(_square, jobs, workers=1)) == [j * j for j in jobs]


def test_materialize_decodes_alike_with_worker_processes():
    generator = torch.Generator().manual_seed(0)
    source = StackDataset(x=torch.randn(300, 4, generator=generator), y=torch.arange(300))
    serial = materialize(source, progress=False, workers=0)
    parallel = materialize(source, progress=False, workers=2)
    for name in ("x", "y"):
        torch.testing.assert_close(parallel.datasets[name], serial.datasets[name], rtol=0, atol=0)


def test_credibility_sets_corrupt_one_modality_each():
    class Clean(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return {"rgb": torch.zeros(3, 4, 4), "points": torch.zeros(8, 3)}

    args = argparse.Namespace(seed=0, train_pixel_corruption=0.9, point_noise=1.0, corruption_kind="pixels")
    sets = credibility_set(Clean(), args)
    assert {name: corruption for name, (_, corruption) in sets.items()} == {
        "rgb": {"pixel_corruption": 0.9}, "points": {"point_noise": 1.0}}
    for name, (dataset, _) in sets.items():
        items = [dataset[i] for i in range(10)]
        assert sum(bool(item[f"corrupted_{name}"]) for item in items) == 5  # a half
        for item in items:
            assert bool(item[name].abs().sum() > 0) == bool(item[f"corrupted_{name}"])
            other = "points" if name == "rgb" else "rgb"
            assert f"corrupted_{other}" not in item and not item[other].abs().sum()  # the other stays clean
    args.point_noise = 0.0
    assert set(credibility_set(Clean(), args)) == {"rgb"}


class Numbered(torch.utils.data.Dataset):
    """Sample i's RGB and points are all i: what a desynchronised modality holds says whose it is."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"rgb": torch.full((3, 4, 4), float(i)), "points": torch.full((8, 3), float(i))}


def test_desync_replaces_a_modality_by_another_samples_in_training_test_and_credibility():
    args = argparse.Namespace(seed=0, train_pixel_corruption=0.9, point_noise=0.0, corruption_kind="desync",
                              data_corruption=0.3, training_noise="fixed")

    def check(dataset, modality, corrupted):
        items = [dataset[i] for i in range(10)]
        assert sum(bool(item[f"corrupted_{modality}"]) for item in items) == corrupted
        for i, item in enumerate(items):
            owner = item[modality].flatten()[0].item()
            assert torch.equal(item[modality], torch.full_like(item[modality], owner))  # a whole sample's, unchanged
            assert (owner != i) == bool(item[f"corrupted_{modality}"])

    trained = training_noise(Numbered(), args)  # desync corrupts the points whatever --point-noise is
    for modality in ("rgb", "points"):
        check(trained, modality, 3)
        check(data.test_corruption(Numbered(), 0.5, 0, modality, "desync"), modality, 5)  # a level: a fraction desynced
    sets = credibility_set(Numbered(), args)
    assert {name: corruption for name, (_, corruption) in sets.items()} == {"rgb": {"desync": True},
                                                                             "points": {"desync": True}}
    for modality, (dataset, _) in sets.items():
        check(dataset, modality, 5)
        other = "rgb" if modality == "points" else "points"
        assert all(dataset[i][other].flatten()[0] == i for i in range(10))  # the other modality its own
