"""How both pipelines get their data: built-in data cached once; splits streamed from disk or decoded once into memory
(``materialize``), the same dict of tensors either way; the corruptions; point-cloud and parallel helpers."""

import argparse
import fcntl
import functools
import itertools
import multiprocessing
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, StackDataset, Subset
from tqdm import tqdm

from gpoe_fusion.noise import CorruptedDataset, Desynchronisation, GaussianPointNoise, PixelCorruption

from .cli import UsageError


def backproject(depth: np.ndarray, K: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Camera-frame points [P, 3] float32 ``z * K^-1 [u, v, 1]`` of the (masked) pixels with depth > 0 of a z-depth map
    [H, W], K [3, 3]; pixel (u, v) at integer coordinates, as RHD's ``uv = (xyz @ K.T)[:, :2] / z``."""
    v, u = np.nonzero(depth > 0 if mask is None else (depth > 0) & mask)
    z = depth[v, u].astype(np.float64)
    return np.stack([(u - K[0, 2]) * z / K[0, 0], (v - K[1, 2]) * z / K[1, 1], z], axis=1).astype(np.float32)


def resample_points(points: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` of ``points`` [P, 3]: a random subset, or all plus random repeats; none: ``count`` at the origin."""
    n = len(points)
    if n == 0:
        return np.zeros((count, 3), dtype=points.dtype)
    if n >= count:
        return points[rng.choice(n, size=count, replace=False)]
    return points[np.concatenate([np.arange(n), rng.choice(n, size=count - n, replace=True)])]


def write_png(path: str | Path, pixels: np.ndarray, palette: np.ndarray | None = None) -> None:
    """pixels uint8 [H, W] (grey; with palette uint8 [<= 256, 3] its indices) or [H, W, 3] (RGB) as an 8-bit PNG, rows
    "Up"-filtered (minus the row above) at zlib level 1: as small as Pillow's, in half its time (it tries 5 filters)."""
    rows = pixels.reshape(pixels.shape[0], -1)
    filtered = np.concatenate([np.full((len(rows), 1), 2, np.uint8), np.diff(rows, axis=0, prepend=np.uint8(0))], 1)
    colour_type = 2 if pixels.ndim == 3 else 0 if palette is None else 3
    chunks = [(b"IHDR", struct.pack(">IIBBBBB", *pixels.shape[1::-1], 8, colour_type, 0, 0, 0)),
              *([] if palette is None else [(b"PLTE", np.asarray(palette, np.uint8).tobytes())]),
              (b"IDAT", zlib.compress(filtered.tobytes(), 1)), (b"IEND", b"")]
    framed = (struct.pack(">I", len(d)) + kind + d + struct.pack(">I", zlib.crc32(kind + d)) for kind, d in chunks)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + b"".join(framed))


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def ordered_map(function: Callable, jobs: Iterable, workers: int | None = None, chunksize: int = 8) -> Iterator:
    """``function(job)`` (module-level) of each job in order, on ``workers`` processes (default: per core; 1: here)."""
    workers = default_workers() if workers is None else workers
    if workers <= 1:
        yield from map(function, jobs)
        return
    # fork: the workers inherit sys.path (the examples import their packages relative to the script's folder).
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with context.Pool(workers) as pool:
        yield from pool.imap(function, jobs, chunksize=chunksize)


def build_once(folder: Path, generate: Callable[[Path], None]) -> Path:
    """``folder``, made unless it exists by ``generate(staging)`` in a sibling renamed into place once complete, under a
    lock that torchrun ranks wait on; a finished folder is never changed (a job may be reading it)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not folder.is_dir():
            for leftover in folder.parent.glob(f".{folder.name}.*"):
                shutil.rmtree(leftover, ignore_errors=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
            try:
                generate(staging)
                os.rename(staging, folder)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    return folder


def describe_size(path: str | Path) -> str:
    """The disk space a file or folder takes, e.g. ``"(172 MB)"``."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return f"({sum(os.path.getsize(p) for p in files) / 1e6:.0f} MB)"


class Fields(Dataset):
    """The items ``indices`` of ``dataset``, of them the entries ``keys`` (what the model and evaluation read)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], keys: Sequence[str]):
        self.dataset, self.indices, self.keys = dataset, list(indices), tuple(keys)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return {key: value for key, value in self.dataset[self.indices[index]].items() if key in self.keys}


def _stack_fields(names: Sequence[str], items: list[dict]) -> dict[str, Tensor]:
    """The fields ``names`` of ``items``, each stacked into one tensor [len(items), ...]."""
    return {name: torch.stack([item[name] for item in items]) for name in names}


MATERIALIZE_BATCH = 64  # items per handover of a materializing worker: sharing a tensor costs about a frame's decoding


def materialize(dataset: Dataset, desc: str = "loading", progress: bool = True,
                workers: int | None = None) -> StackDataset:
    """Every item of ``dataset`` (dicts; tensor entries kept) read once into a tensor per field (``datasets``) allocated
    from the first item: the peak memory is the result's. workers: decoding processes (default: per core; 0: here)."""
    if len(dataset) == 0:
        raise ValueError("dataset: is empty")
    first = dataset[0]
    tensors = {k: v.new_empty((len(dataset), *v.shape)) for k, v in first.items() if isinstance(v, Tensor)}
    workers = default_workers() if workers is None else workers
    # Worker processes pay off only beyond a few batches (each costs a fork).
    rest = DataLoader(Subset(dataset, range(1, len(dataset))), batch_size=MATERIALIZE_BATCH,
                      num_workers=workers if len(dataset) > MATERIALIZE_BATCH * workers else 0,
                      collate_fn=functools.partial(_stack_fields, list(tensors)))
    with tqdm(total=len(dataset), desc=desc, disable=not progress, leave=False) as bar:
        start = 0
        for block in itertools.chain([_stack_fields(list(tensors), [first])], rest):
            count = len(next(iter(block.values())))
            for name, t in tensors.items():
                t[start:start + count] = block[name]
            start += count
            bar.update(count)
    return StackDataset(**tensors)  # items {name: tensors[name][i]}


def load_splits(make: Callable[[str, int | None, str], Dataset], splits: Sequence[tuple[str, int | None, str]],
                in_memory: bool, progress: bool,
                errors: tuple[type[BaseException], ...] = (OSError, ValueError)) -> list:
    """``make(split, count, option)`` for every (split, count, option), streamed or decoded into memory. Its first
    sample is decoded here, so that a bad folder fails now with UsageError naming --data-root (on ``errors``)."""
    sets = []
    for split, count, option in splits:
        try:
            dataset = make(split, count, option)
            dataset[0]  # noqa: B018 (decoded for its errors)
        except errors as error:
            raise UsageError("--data-root", str(error)) from None
        sets.append(materialize(dataset, desc=f"decoding {split}", progress=progress) if in_memory else dataset)
    return sets


def eval_loader(dataset: Dataset, args: argparse.Namespace) -> DataLoader:
    """Batches of ``dataset`` in order, --eval-batch-size at a time, decoded by --workers processes."""
    return DataLoader(dataset, batch_size=args.eval_batch_size, num_workers=args.workers)


# The corruptions of the experiments (paper Section 4.3), each drawn from its own stream of the run's seed.
_SEED_RGB, _SEED_POINTS, _SEED_TEST, _SEED_CREDIBILITY_RGB, _SEED_CREDIBILITY_POINTS, _SEED_TEST_POINTS = range(1, 7)
CREDIBILITY_FRACTION = 0.5  # share of the credibility set with a modality corrupted: equal groups, best for an AUROC


def corruption(modality: str, strength: float, kind: str) -> object:
    """A corruption of ``modality`` of --corruption-kind ``kind``: "pixels", visible noise of ``strength`` (a share of
    the RGB's pixels, the points' std), or "desync", another sample's modality (``strength`` does not apply)."""
    if kind == "desync":
        return Desynchronisation()
    return PixelCorruption(strength) if modality == "rgb" else GaussianPointNoise(strength)


def training_noise(dataset: Dataset, args: argparse.Namespace) -> Dataset:
    """The RGB and, independently, the points of a seeded --data-corruption of the samples corrupted (``corruption``, at
    --train-pixel-corruption, --point-noise unless 0), drawn anew every epoch with --training-noise fresh. Items gain
    ``corrupted_rgb`` / ``corrupted_points``."""
    if args.data_corruption <= 0:
        return dataset
    fraction, kind, redraw = args.data_corruption, args.corruption_kind, args.training_noise == "fresh"
    dataset = CorruptedDataset(dataset, "rgb", fraction, corruption("rgb", args.train_pixel_corruption, kind),
                               seed=args.seed * 10 + _SEED_RGB, redraw=redraw)
    if args.point_noise > 0 or kind == "desync":
        dataset = CorruptedDataset(dataset, "points", fraction, corruption("points", args.point_noise, kind),
                                   seed=args.seed * 10 + _SEED_POINTS, redraw=redraw)
    return dataset


def test_corruption(dataset: Dataset, level: float, seed: int, modality: str = "rgb", kind: str = "pixels") -> Dataset:
    """``modality`` at test ``level`` (seeded): every sample at strength ``level``, or with desync a share ``level``."""
    if level <= 0:
        return dataset
    return CorruptedDataset(dataset, modality, level if kind == "desync" else 1.0, corruption(modality, level, kind),
                            seed=seed * 10 + (_SEED_TEST if modality == "rgb" else _SEED_TEST_POINTS))


def credibility_set(dataset: Dataset, args: argparse.Namespace) -> dict[str, tuple[Dataset, dict[str, object]]]:
    """Held-out samples with known corruption: per modality, a seeded half of ``dataset`` with that modality corrupted
    as in training, flagged ``corrupted_<modality>``, the other clean (weights share out a whole, so with both corrupted
    neither need fall). Returns modality -> (its set, its corruption); with pixels, a strength of 0 is left out."""
    kind, sets = args.corruption_kind, {}
    strengths = (("rgb", args.train_pixel_corruption, "pixel_corruption", _SEED_CREDIBILITY_RGB),
                 ("points", args.point_noise, "point_noise", _SEED_CREDIBILITY_POINTS))
    for modality, strength, key, seed in strengths:
        if strength > 0 or kind == "desync":
            sets[modality] = (CorruptedDataset(dataset, modality, CREDIBILITY_FRACTION,
                                               corruption(modality, strength, kind), seed=args.seed * 10 + seed),
                              {"desync": True} if kind == "desync" else {key: strength})
    return sets
