"""Choice between the fused kernel and the pure-PyTorch path, and the reshaping the kernel needs.

The kernel ops see flat tensors: mu, logvar [M, N, D]; logits [M, N or 1, D or 1]; mask [M, N].
The pure-PyTorch path (``_reference.fuse``) takes any batch shape.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _reference, ops

__all__ = ["BACKENDS", "fuse", "kernel_supports", "mopoe", "use_kernel"]

BACKENDS = ("auto", "kernel", "torch")


def kernel_supports(device: torch.device, dtype: torch.dtype) -> str | None:
    """None if the fused kernel can take experts of ``dtype`` on ``device``, else the reason it cannot."""
    if not ops.available():
        return f"the compiled extension is not available ({ops.load_error()})"
    if dtype not in ops.KERNEL_DTYPES:
        return f"dtype {dtype} is not one of {ops.KERNEL_DTYPES}"
    if not ops.supports_device(device):
        problem = ops.cuda_device_problem(device.index or 0) if device.type == "cuda" else ""
        return problem or f"the extension has no kernel for device {device}"
    if torch._C._are_functorch_transforms_active():
        # The ops' autograd formula is not a torch.func one; the pure-PyTorch path is, and vmap batches it.
        return "a torch.func transform (vmap, grad, jacrev, ...) is active; the kernels do not support them"
    return None


def _flat_logits(logits: Tensor, batch_shape: torch.Size, n: int) -> Tensor:
    """[M?, *batch?, D?] broadcastable logits -> [M, N or 1, D or 1] for the kernel."""
    m, d = logits.shape[0], logits.shape[-1]
    batch = logits.shape[1:-1]
    if all(b == 1 for b in batch):
        return logits.reshape(m, 1, d)
    if tuple(batch) != tuple(batch_shape):
        # Partly broadcast over the batch: the kernel only knows "per row" or "shared".
        logits = logits.expand((m,) + tuple(batch_shape) + (d,))
    return logits.reshape(m, n, d)


class _KernelLayout:
    """Checked experts [M, *batch, D] as the kernels take them: mu, logvar [M, N, D]; logits
    [M, N or 1, D or 1] (with ``expand_logits``, always [M, N, D]), one scalar type for all three;
    mask [M, N]. ``unflatten`` turns a kernel output [K, N, D] or [N, D] back into [K, *batch, D] /
    [*batch, D] in mu's dtype."""

    def __init__(self, mu: Tensor, logvar: Tensor, logits: Tensor | None, mask: Tensor | None, expand_logits: bool):
        m, d = mu.shape[0], mu.shape[-1]
        self.batch_shape = tuple(mu.shape[1:-1])
        self.dtype = mu.dtype
        n = math.prod(self.batch_shape)
        if logits is not None:
            # One scalar type per kernel call: promote rather than round float32 logits to bfloat16.
            common = torch.promote_types(mu.dtype, logits.dtype)
            mu, logvar, logits = mu.to(common), logvar.to(common), logits.to(common)
            if expand_logits:
                # Expanding is differentiable: autograd sums the gradient back over the broadcast axes.
                logits = logits.expand(mu.shape).reshape(m, n, d)
            else:
                if logits.shape[0] != m:
                    logits = logits.expand((m,) + tuple(logits.shape[1:]))
                logits = _flat_logits(logits, self.batch_shape, n)
        self.mu, self.logvar, self.logits = mu.reshape(m, n, d), logvar.reshape(m, n, d), logits
        self.mask = None if mask is None else mask.reshape(m, n)

    def unflatten(self, t: Tensor) -> Tensor:
        lead = tuple(t.shape[:-2]) if t.dim() == 3 else ()
        return t.reshape(lead + self.batch_shape + (t.shape[-1],)).to(self.dtype)


def use_kernel(device: torch.device, dtype: torch.dtype, backend: str) -> bool:
    """Whether ``backend`` runs the fused kernel for experts of ``dtype`` on ``device`` (an error if
    it must and cannot)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    reason = kernel_supports(device, dtype)
    if reason is not None and backend == "kernel":
        raise RuntimeError(f"backend='kernel' was requested but {reason}")
    # Under torch.export "auto" traces the pure-PyTorch math: the exported program then holds ATen
    # ops only (ONNX, AOTInductor and other consumers need neither the extension nor a decomposition).
    return reason is None and (backend == "kernel" or not torch.compiler.is_exporting())


def fuse(
    mu: Tensor,
    logvar: Tensor,
    logits: Tensor | None,
    mask: Tensor | None,
    prior_expert: bool,
    backend: str = "auto",
    return_weights: bool = False,
) -> tuple[Tensor, ...]:
    """Joint ``(mu, logvar)`` [*batch, D] of checked experts mu, logvar [M, *batch, D], and with
    ``return_weights`` every expert's weight [M, *batch, D] (see ``_reference.fuse``)."""
    if not use_kernel(mu.device, mu.dtype, backend):
        return _reference.fuse(mu, logvar, logits, mask, prior_expert, return_weights)
    flat = _KernelLayout(mu, logvar, logits, mask, expand_logits=False)
    outputs = ops.fuse(flat.mu, flat.logvar, flat.logits, flat.mask, prior_expert, return_weights)
    joint = tuple(flat.unflatten(t) for t in outputs[:2])
    return joint + (flat.unflatten(outputs[2]),) if return_weights else joint


def mopoe(
    mu: Tensor,
    logvar: Tensor,
    logits: Tensor | None,
    mask: Tensor | None,
    prior_expert: bool,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Every subset's product (MoPoE's components), [S, *batch, D], of checked experts
    [M, *batch, D] (see ``_reference.mopoe``)."""
    if not use_kernel(mu.device, mu.dtype, backend):
        return _reference.mopoe(mu, logvar, logits, mask, prior_expert)
    flat = _KernelLayout(mu, logvar, logits, mask, expand_logits=True)
    joint_mu, joint_logvar = ops.mopoe(flat.mu, flat.logvar, flat.logits, flat.mask, prior_expert)
    return flat.unflatten(joint_mu), flat.unflatten(joint_logvar)
