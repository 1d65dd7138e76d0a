"""Argument checking for the public fusion functions: every error names the argument at fault.

Structural checks (shape, dtype, device) read no data and always run. Value checks (NaN among
present experts, rows with every expert masked) cost almost nothing: a NaN among present experts
and a row without any expert (and no prior) both reach the fused joint mean, so one reduction over
that output decides, and only when it finds a NaN are the inputs diagnosed to name the argument
at fault (``check_values``). Reading the reduction's result synchronises a GPU with the host, so
by default value checks run on the CPU only; ``set_validation(True)`` (or ``validate=True``)
runs them on every device, ``set_validation(False)`` nowhere. Never inside ``torch.compile``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["as_experts", "check_logits", "check_mask", "check_values", "has_empty_row", "has_nan",
           "set_validation", "validation_enabled", "weights_wanted"]

def _setting_from_environment() -> bool | None:
    value = os.environ.get("GPOE_FUSION_VALIDATE", "")
    return None if value == "" else value != "0"


# None: the default (value checks where they need no host synchronisation: CPU tensors).
_validate: bool | None = _setting_from_environment()


def set_validation(enabled: bool | None) -> None:
    """Value checks (NaN, fully masked rows) for every later call: True on every device (on a GPU
    each call then waits for its result), False nowhere, None the default: CPU tensors only.

    ``GPOE_FUSION_VALIDATE=1`` / ``=0`` in the environment starts with True / False.
    """
    global _validate
    _validate = None if enabled is None else bool(enabled)


def validation_enabled(override: bool | None = None, device: torch.device | None = None) -> bool:
    """Whether value checks run for a call on ``device``: ``override`` if given, else the global
    setting, whose default runs them on the CPU only; never while ``torch.compile``, ``torch.export``
    or ``torch.jit.trace`` traces, nor under a ``torch.func`` transform (vmap, grad, ...): a check
    reads its result on the host, which a traced or batched tensor cannot give."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() or torch.jit.is_tracing():
        return False
    setting = _validate if override is None else override
    if setting is None:
        return device is None or device.type == "cpu"
    return setting


def weights_wanted(return_weights: bool, return_alpha: bool | None, stacklevel: int = 3) -> bool:
    """Whether a fusion returns its experts' weights: ``return_weights``, or the deprecated alias
    ``return_alpha`` where that is given (with one DeprecationWarning, pointing ``stacklevel`` frames up)."""
    if return_alpha is None:
        return bool(return_weights)
    if return_weights:
        raise ValueError("return_alpha: give return_weights or its deprecated alias return_alpha, not both")
    warnings.warn("return_alpha is deprecated, use return_weights (the same output: each expert's weight)",
                  DeprecationWarning, stacklevel=stacklevel)
    return bool(return_alpha)


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


def check_mask(mask: Tensor | None, shape: Sequence[int] | None, device: torch.device,
               against: str = "mu") -> Tensor | None:
    """mask: bool [M, *batch] (True = present) or None, of ``shape`` (None: any shape) on ``device``,
    the device of the argument named ``against``. Returns the mask."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask: expected a bool tensor [M, *batch], got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected dtype torch.bool (True = present), got {mask.dtype}")
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask: expected shape [M, *batch] = {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask: device {mask.device} differs from {against} device {device}")
    return mask


def has_nan(t: Tensor) -> bool:
    """The one reduction of the value checks: whether ``t`` holds a NaN (one sum carries any NaN).

    Run on the fused joint mean: NaN in a present expert's mu, logvar or logits, and a row with no
    expert and no prior, make the joint mean NaN there. (A sum can also overflow to NaN from huge
    values of both signs; then ``check_values`` finds nothing and nothing is raised.)
    """
    with torch.no_grad():
        return bool(torch.isnan(t.sum()))


def has_empty_row(mask: Tensor | None) -> bool:
    """Whether some row of mask bool [M, *batch] has every expert masked (reads the small mask only)."""
    return mask is not None and not bool(mask.any(0).all())


def check_values(mu: Tensor, logvar: Tensor, logits: Tensor | None, mask: Tensor | None, prior_expert: bool) -> None:
    """The full diagnosis: raise on NaN among present experts, or on a row whose experts are all
    masked (without a prior), naming the argument at fault."""
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
