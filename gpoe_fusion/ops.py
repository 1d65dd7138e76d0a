"""Loads the compiled ``gpoe_fusion._C`` ops and registers their fake and autograd kernels.

The extension defines (csrc/ops.cpp):

    gpoe_fusion::fuse_forward(mu, logvar, logits?, mask?, prior_expert) -> (joint_mu, joint_logvar)
    gpoe_fusion::fuse_backward(grad_joint_mu?, grad_joint_logvar?, mu, logvar, logits?, mask?,
                               prior_expert, output_mask[3]) -> (grad_mu, grad_logvar, grad_logits)
    gpoe_fusion::compiled_with_cuda() -> bool
    gpoe_fusion::cpu_capability() -> str
    gpoe_fusion::cpu_cache_bytes() -> int, gpoe_fusion::clear_cpu_cache() -> int

with CPU and (when built with CUDA) CUDA kernels. This module adds the fake kernels that let
``torch.compile`` trace them and the autograd formula of ``fuse_forward``, whose backward
recomputes from the saved inputs (it saves no [M, N, D] temporary).

With ``GPOE_FUSION_REQUIRE_EXTENSION=1`` in the environment a missing or unloadable extension
is an ImportError instead of a silent fallback to the pure-PyTorch path (CI sets it).
"""

from __future__ import annotations

import glob
import os

import torch
from torch import Tensor

__all__ = [
    "REQUIRE_ENV",
    "available",
    "clear_cpu_cache",
    "compiled_with_cuda",
    "cpu_cache_bytes",
    "cpu_capability",
    "fuse",
    "load_error",
    "supports_device",
]

REQUIRE_ENV = "GPOE_FUSION_REQUIRE_EXTENSION"

_LOAD_ERROR: str | None = None


def _load() -> bool:
    global _LOAD_ERROR
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
    if not candidates:
        _LOAD_ERROR = "gpoe_fusion._C was not built (pip install --no-build-isolation -e .)"
        return False
    try:
        torch.ops.load_library(candidates[0])
    except (OSError, RuntimeError) as exc:
        # OSError: dlopen failed (e.g. built against another torch); RuntimeError: the ops clash
        # with an already registered copy.
        _LOAD_ERROR = f"loading {candidates[0]} failed: {exc}"
        return False
    return True


_AVAILABLE = _load()

if not _AVAILABLE and os.environ.get(REQUIRE_ENV, "") == "1":
    raise ImportError(f"gpoe_fusion: {REQUIRE_ENV}=1 but the compiled extension is unavailable: {_LOAD_ERROR}")


def available() -> bool:
    """Whether the compiled kernels are loaded."""
    return _AVAILABLE


def load_error() -> str | None:
    """Why the kernels are not available (None when they are)."""
    return _LOAD_ERROR


def compiled_with_cuda() -> bool:
    """Whether the loaded extension was built with its CUDA kernels (False when not loaded)."""
    return _AVAILABLE and bool(torch.ops.gpoe_fusion.compiled_with_cuda())


def cpu_capability() -> str | None:
    """The instruction set of the CPU kernels in use ("AVX512", "AVX2", "DEFAULT"), or None."""
    return str(torch.ops.gpoe_fusion.cpu_capability()) if _AVAILABLE else None


def cpu_cache_bytes() -> int:
    """Bytes of released CPU output blocks the extension keeps for reuse (0 when not loaded).

    Large CPU outputs are recycled instead of freshly mapped on every call, which on Linux saves
    a page fault per 4 KiB written; ``GPOE_FUSION_CPU_CACHE_MB`` caps the cache (default 512,
    0 disables it)."""
    return int(torch.ops.gpoe_fusion.cpu_cache_bytes()) if _AVAILABLE else 0


def clear_cpu_cache() -> int:
    """Returns the cached CPU output blocks to the system; the bytes freed."""
    return int(torch.ops.gpoe_fusion.clear_cpu_cache()) if _AVAILABLE else 0


def supports_device(device: torch.device) -> bool:
    """Whether a kernel is registered for ``device``'s type."""
    if not _AVAILABLE or device.type not in ("cpu", "cuda"):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("gpoe_fusion::fuse_forward", device.type.upper())


def fuse(mu: Tensor, logvar: Tensor, logits: Tensor | None, mask: Tensor | None, prior_expert: bool) -> tuple[Tensor, Tensor]:
    """Fused joint ``(mu, logvar)`` [N, D] of mu, logvar [M, N, D]; logits [M, N|1, D|1]; mask bool [M, N]."""
    return torch.ops.gpoe_fusion.fuse_forward(mu, logvar, logits, mask, prior_expert)


def _fuse_forward_fake(mu: Tensor, logvar: Tensor, logits: Tensor | None, mask: Tensor | None, prior_expert: bool):
    shape = (mu.shape[1], mu.shape[2])
    return mu.new_empty(shape), mu.new_empty(shape)


def _fuse_backward_fake(grad_joint_mu, grad_joint_logvar, mu, logvar, logits, mask, prior_expert, output_mask):
    def like(t: Tensor | None, wanted: bool) -> Tensor:
        return t.new_empty(t.shape) if wanted and t is not None else mu.new_empty((0,))

    return like(mu, output_mask[0]), like(mu, output_mask[1]), like(logits, output_mask[2])


def _setup_context(ctx, inputs, output) -> None:
    mu, logvar, logits, mask, prior_expert = inputs
    ctx.save_for_backward(mu, logvar, logits, mask)
    ctx.prior_expert = prior_expert
    # An output that gets no gradient is passed to the kernel as None and never read.
    ctx.set_materialize_grads(False)


def _fuse_backward(ctx, grad_joint_mu: Tensor | None, grad_joint_logvar: Tensor | None):
    mu, logvar, logits, mask = ctx.saved_tensors
    wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], logits is not None and ctx.needs_input_grad[2]]
    if not any(wanted) or (grad_joint_mu is None and grad_joint_logvar is None):
        return None, None, None, None, None
    grad_mu, grad_logvar, grad_logits = torch.ops.gpoe_fusion.fuse_backward(
        grad_joint_mu, grad_joint_logvar, mu, logvar, logits, mask, ctx.prior_expert, wanted
    )
    return (
        grad_mu if wanted[0] else None,
        grad_logvar if wanted[1] else None,
        grad_logits if wanted[2] else None,
        None,
        None,
    )


if _AVAILABLE:
    torch.library.register_fake("gpoe_fusion::fuse_forward")(_fuse_forward_fake)
    torch.library.register_fake("gpoe_fusion::fuse_backward")(_fuse_backward_fake)
    torch.library.register_autograd("gpoe_fusion::fuse_forward", _fuse_backward, setup_context=_setup_context)
