"""Datasets held in memory: decode once, then every epoch indexes tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

__all__ = ["TensorDictDataset", "materialize"]


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


def materialize(dataset: Dataset, desc: str = "loading", progress: bool = True,
                keys: Sequence[str] | None = None) -> TensorDictDataset:
    """Read every item of ``dataset`` (dicts of tensors) once and stack them.

    keys: the entries kept (default: all); items may hold other, non-tensor entries that are dropped.
    """
    if len(dataset) == 0:
        raise ValueError("dataset: is empty")
    items = [dataset[i] for i in tqdm(range(len(dataset)), desc=desc, disable=not progress, leave=False)]
    names = list(items[0]) if keys is None else list(keys)
    missing = [name for name in names if name not in items[0]]
    if missing:
        raise KeyError(f"keys: {missing} are not in the dataset's items (they have {sorted(items[0])})")
    return TensorDictDataset({name: torch.stack([item[name] for item in items]) for name in names})
