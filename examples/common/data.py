"""The two ways a pipeline holds its data, behind the same ``Dataset`` interface.

- Streamed (the default at full size): the dataset decodes sample i from disk when it is asked for,
  so memory does not grow with the dataset; the DataLoader's worker processes do the decoding
  (each reads only the indices its rank's sampler hands it).
- In memory (``materialize``): every sample decoded once, by the very same dataset, into one
  stacked tensor per field; fast when the whole set fits easily (the demo).

Either way an item is the same dict of tensors, so training, noise and evaluation do not know which.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from .cli import UsageError
from .parallel import default_workers

__all__ = ["Fields", "TensorDictDataset", "eval_loader", "load_splits", "materialize", "nbytes"]


class TensorDictDataset(Dataset):
    """Items ``{name: tensors[name][i]}`` of a dict of tensors that share their first dimension."""

    def __init__(self, tensors: dict[str, Tensor]):
        lengths = {name: len(t) for name, t in tensors.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"tensors: first dimensions differ: {lengths}")
        self.tensors = tensors
        self.length = next(iter(lengths.values())) if lengths else 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {name: t[index] for name, t in self.tensors.items()}


class Fields(Dataset):
    """The entries ``keys`` of every item of ``dataset`` (what the model and the evaluation read)."""

    def __init__(self, dataset: Dataset, keys: Sequence[str]):
        self.dataset = dataset
        self.keys = tuple(keys)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        missing = [key for key in self.keys if key not in item]
        if missing:
            raise KeyError(f"keys: {missing} are not in the dataset's items (they have {sorted(item)})")
        return {key: item[key] for key in self.keys}


def materialize(dataset: Dataset, desc: str = "loading", progress: bool = True,
                keys: Sequence[str] | None = None, workers: int | None = None) -> TensorDictDataset:
    """Read every item of ``dataset`` (dicts of tensors) once into one tensor per field.

    keys: the entries kept (default: every tensor entry); items may hold other, non-tensor entries
    that are dropped. The stacked tensors are allocated up front from the first item, so the peak
    memory is the result's size (not twice that, as stacking a list of items would need).
    workers: processes decoding items (default: one per core; 0 decodes here), in order.
    """
    if len(dataset) == 0:
        raise ValueError("dataset: is empty")
    first = dataset[0]
    names = [name for name, v in first.items() if isinstance(v, Tensor)] if keys is None else list(keys)
    missing = [name for name in names if name not in first]
    if missing:
        raise KeyError(f"keys: {missing} are not in the dataset's items (they have {sorted(first)})")
    tensors = {name: torch.empty((len(dataset), *first[name].shape), dtype=first[name].dtype) for name in names}
    workers = default_workers() if workers is None else workers
    # Worker processes pay off only beyond a few items (each costs a fork and a pickled item per sample).
    rest = DataLoader(Subset(dataset, range(1, len(dataset))), batch_size=None,
                      num_workers=workers if len(dataset) > 64 * workers else 0)
    items = itertools.chain([first], rest)
    for i, item in enumerate(tqdm(items, total=len(dataset), desc=desc, disable=not progress, leave=False)):
        for name in names:
            tensors[name][i] = item[name]
    return TensorDictDataset(tensors)


def load_splits(make: Callable[[str, int | None, str], Dataset], splits: Sequence[tuple[str, int | None, str]],
                in_memory: bool, progress: bool,
                errors: tuple[type[BaseException], ...] = (OSError, ValueError)) -> list[Dataset]:
    """``make(split, count, option)`` for every (split, count, option) in ``splits``: the dataset of
    that split, streamed, or with ``in_memory`` decoded once into memory.

    Its first sample is decoded here, so that a folder of the wrong layout or a damaged one fails
    now, with one line naming --data-root (``errors``: what reading such a folder raises), not later
    in a loader worker. ``make`` raises UsageError itself for a count the split cannot serve.
    """
    sets = []
    for split, count, option in splits:
        try:
            dataset = make(split, count, option)
            dataset[0]  # noqa: B018 (decoded for its errors)
        except errors as error:
            raise UsageError("--data-root", str(error)) from None
        if in_memory:
            dataset = materialize(dataset, desc=f"decoding {split}", progress=progress)
        sets.append(dataset)
    return sets


def nbytes(dataset: TensorDictDataset) -> int:
    """Bytes held by an in-memory dataset's tensors."""
    return sum(t.numel() * t.element_size() for t in dataset.tensors.values())


def eval_loader(dataset: Dataset, args: argparse.Namespace) -> DataLoader:
    """Batches of ``dataset`` in order, --eval-batch-size at a time, decoded by --workers processes."""
    return DataLoader(dataset, batch_size=args.eval_batch_size, num_workers=args.workers)
