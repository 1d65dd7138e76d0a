"""Argument checking for the public fusion functions: every error names the argument at fault.

Structural checks (shape, dtype, device) are free and always run. Value checks (NaN among present
experts, rows with every expert masked) read the data, which synchronises a GPU and cannot be traced,
so they run only while validation is enabled and never inside ``torch.compile``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["as_experts", "check_logits", "check_mask", "check_values", "set_validation", "validation_enabled"]

_validate = os.environ.get("GPOE_FUSION_VALIDATE", "1") != "0"


def set_validation(enabled: bool) -> None:
    """Turn the value checks (NaN, fully masked rows) on or off for every later call.

    They are on by default; ``GPOE_FUSION_VALIDATE=0`` in the environment starts with them off.
    """
    global _validate
    _validate = bool(enabled)


def validation_enabled(override: bool | None = None) -> bool:
    """Whether value checks run now: ``override`` if given, else the global switch; never when compiling."""
    if torch.compiler.is_compiling():
        return False
    return _validate if override is None else override


def _stack(x: Tensor | Sequence[Tensor], name: str) -> Tensor:
    if isinstance(x, Tensor):
        if x.dim() < 2:
            raise ValueError(f"{name}: expected a stacked tensor [M, *batch, D] with at least 2 dims, got shape {tuple(x.shape)}")
        return x
    if not isinstance(x, Sequence) or isinstance(x, (str, bytes)):
        raise TypeError(f"{name}: expected a tensor [M, *batch, D] or a sequence of M tensors [*batch, D], got {type(x).__name__}")
    if len(x) == 0:
        raise ValueError(f"{name}: expected at least one expert, got an empty sequence")
    first = x[0]
    for i, t in enumerate(x):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}]: expected a tensor, got {type(t).__name__}")
        if t.dim() < 1:
            raise ValueError(f"{name}[{i}]: expected shape [*batch, D], got a 0-dim tensor")
        if t.shape != first.shape:
            raise ValueError(f"{name}[{i}]: shape {tuple(t.shape)} differs from {name}[0] shape {tuple(first.shape)}")
        if t.dtype != first.dtype:
            raise TypeError(f"{name}[{i}]: dtype {t.dtype} differs from {name}[0] dtype {first.dtype}")
        if t.device != first.device:
            raise ValueError(f"{name}[{i}]: device {t.device} differs from {name}[0] device {first.device}")
    return torch.stack(list(x))


def as_experts(mu: Tensor | Sequence[Tensor], logvar: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack and check the experts. Returns ``mu, logvar``: [M, *batch, D], same shape, dtype, device."""
    mu = _stack(mu, "mu")
    logvar = _stack(logvar, "logvar")
    for name, t in (("mu", mu), ("logvar", logvar)):
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point dtype, got {t.dtype}")
    if mu.shape != logvar.shape:
        raise ValueError(f"logvar: shape {tuple(logvar.shape)} differs from mu shape {tuple(mu.shape)}; "
                         "both must be [M, *batch, D]")
    if mu.dtype != logvar.dtype:
        raise TypeError(f"logvar: dtype {logvar.dtype} differs from mu dtype {mu.dtype}")
    if mu.device != logvar.device:
        raise ValueError(f"logvar: device {logvar.device} differs from mu device {mu.device}")
    if mu.shape[0] == 0:
        raise ValueError("mu: expected at least one expert (M >= 1), got M = 0")
    return mu, logvar


def check_logits(logits: Tensor | Sequence[Tensor], mu: Tensor) -> Tensor:
    """logits: broadcastable to mu's [M, *batch, D]. A sequence of M tensors is stacked first."""
    if not isinstance(logits, Tensor):
        logits = _stack(logits, "logits")
    if not logits.is_floating_point():
        raise TypeError(f"logits: expected a floating-point dtype, got {logits.dtype}")
    if logits.device != mu.device:
        raise ValueError(f"logits: device {logits.device} differs from mu device {mu.device}")
    shape = tuple(mu.shape)
    ok = logits.dim() == len(shape) and all(l in (1, s) for l, s in zip(logits.shape, shape))
    if not ok:
        raise ValueError(f"logits: shape {tuple(logits.shape)} is not broadcastable to [M, *batch, D] = {shape}; "
                         "use [M, *batch, D] (per sample and dimension), [M, 1, D] (global) or [M, *batch, 1] (per sample)")
    return logits


def check_mask(mask: Tensor | None, mu: Tensor) -> Tensor | None:
    """mask: bool [M, *batch] (True = expert present) or None."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask: expected a bool tensor [M, *batch], got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected dtype torch.bool (True = expert present), got {mask.dtype}")
    if tuple(mask.shape) != tuple(mu.shape[:-1]):
        raise ValueError(f"mask: expected shape [M, *batch] = {tuple(mu.shape[:-1])}, got {tuple(mask.shape)}")
    if mask.device != mu.device:
        raise ValueError(f"mask: device {mask.device} differs from mu device {mu.device}")
    return mask


def check_values(mu: Tensor, logvar: Tensor, logits: Tensor | None, mask: Tensor | None, prior_expert: bool) -> None:
    """Raise on NaN among present experts, or on a row whose experts are all masked (without a prior)."""
    present = None if mask is None else mask.unsqueeze(-1)
    for name, t in (("mu", mu), ("logvar", logvar), ("logits", logits)):
        if t is None:
            continue
        nan = torch.isnan(t)
        if present is not None:
            nan = nan & present
        if bool(nan.any()):
            raise ValueError(f"{name}: contains NaN at {int(nan.sum())} entries of present experts "
                             "(masked experts may hold anything)")
    if mask is not None and not prior_expert:
        empty = ~mask.any(dim=0)
        if bool(empty.any()):
            first = tuple(int(i) for i in empty.nonzero()[0])
            raise ValueError(f"mask: {int(empty.sum())} batch rows have every expert masked (first at batch index "
                             f"{first}); the joint is undefined without prior_expert=True")
