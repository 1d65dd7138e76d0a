"""Data parallelism that trains as one process does with the global batch (W processes of batch b: one
of W * b), to float rounding: a collective autograd differentiates through, batch norm over the
processes on any device, each sample's reparameterisation noise drawn as one process draws it, and
``match_single_process``, which sets a model up with all of them (with
``credibility.sync_feature_statistics``). The gradients are averaged as usual, by
``DistributedDataParallel``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

# The module, not its names: credibility imports this module's all_reduce_sum.
from . import credibility
from .objectives import CrossModalObjective

__all__ = ["GlobalBatchNoise", "SyncBatchNorm", "all_reduce_sum", "convert_sync_batchnorm", "match_single_process"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes of a group, differentiable: the gradient of every process's input is the
    sum of the gradients of the sum's copies on every process (as torch.distributed.nn.functional.all_reduce,
    which recent torch deprecates)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None


def all_reduce_sum(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """The sum of ``tensor`` over the processes of ``group`` (None: the default group), differentiable:
    each process's input gets the sum of the gradients of every process's copy of the result (what
    ``torch.distributed.nn.functional.all_reduce`` computes, which recent torch deprecates with a
    warning at every call). Used for statistics over a data-parallel batch."""
    return _AllReduceSum.apply(tensor, group)


class SyncBatchNorm(_BatchNorm):
    """BatchNorm1d/2d/3d over the concatenated batch of every process of ``process_group`` (None: the
    default group), on any device (``torch.nn.SyncBatchNorm`` runs on CUDA only). x: [B, C, *spatial] ->
    [B, C, *spatial].

    In training each process's per-channel element count, sum and sum of squares are summed over the
    processes with one differentiable all-reduce; the output is normalised with the global mean and
    biased variance, and the running statistics take the global mean and unbiased variance with
    nn.BatchNorm's momentum (``momentum=None``: the cumulative average over ``num_batches_tracked``).
    So outputs, gradients (through the all-reduce, to every process's rows) and running statistics
    are those of nn.BatchNorm on the concatenated batch, to float rounding: the sums are reduced in
    float64, which keeps the variance from sums of squares accurate. Every process must run each
    training forward and backward. Out of training it is nn.BatchNorm's evaluation, with no
    collective, so one process alone can evaluate.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: dist.ProcessGroup | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input [B, C, *spatial], got shape {tuple(input.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training:
            # nn.BatchNorm's evaluation: the running statistics, or the batch's own without them.
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                self.running_mean is None, 0.0, self.eps)
        factor = 0.0
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        # 16-bit activations are normalised in float32: a sum of squares in 16 bits is of little use.
        compute = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        count = compute.new_full((1,), x.numel() // channels, dtype=torch.float64)
        local = torch.cat([compute.sum(dims, dtype=torch.float64), compute.square().sum(dims, dtype=torch.float64),
                           count])
        summed = all_reduce_sum(local, self.process_group)
        total, squares, n = summed[:channels], summed[channels:2 * channels], summed[2 * channels:]
        mean = total / n
        var = (squares / n - mean.square()).clamp_min(0.0)  # biased, as the normalisation uses
        shape = (1, channels) + (1,) * (x.dim() - 2)
        out = (compute - mean.to(compute.dtype).view(shape)) * torch.rsqrt(var + self.eps).to(compute.dtype).view(shape)
        if self.affine:
            out = out * self.weight.to(compute.dtype).view(shape) + self.bias.to(compute.dtype).view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.mul_(1 - factor).add_(factor * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - factor).add_(factor * unbiased.to(self.running_var.dtype))
        return out.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """``module`` with every nn.BatchNorm1d/2d/3d in it replaced by a ``SyncBatchNorm`` over
    ``process_group`` that holds the same parameter and buffer tensors (and training mode): an
    optimizer already built keeps training them, and the state dict keeps its keys and values.
    Layers are swapped in their parents in place; returns ``module``, or its replacement when
    ``module`` is itself a batch norm.
    """
    converted = module
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        converted = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats, process_group, device="meta")
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            setattr(converted, name, tensor)
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, process_group))
    return converted


class GlobalBatchNoise:
    """The objective's reparameterisation noise of one rank's rows of the global batch, as one process
    draws it for the whole batch: called with shape [..., B, D] (B rows on each of W ranks), it draws
    [..., W * B, D] with torch.randn and keeps rows rank, rank + W, ..., this rank's global batch
    positions. Every rank must seed the global RNG alike."""

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size

    def __call__(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        *leading, batch, dim = shape
        draws = torch.randn((*leading, batch * self.world_size, dim), dtype=dtype, device=device)
        return draws[..., self.rank::self.world_size, :]


def match_single_process(model: nn.Module, rank: int, world_size: int, device: torch.device | str = "cpu") -> nn.Module:
    """With more than one process (``world_size`` > 1), make ``model`` train on process ``rank`` as one
    process does with the global batch (process r holding rows r, r + W, ... of it, as
    ``DistributedSampler`` splits a batch): its BatchNorm layers and gPoE's feature standardisation take
    their statistics over the global batch (torch's ``nn.SyncBatchNorm`` on CUDA ``device``, with its
    fused kernels; ``SyncBatchNorm`` above on other devices, where torch's does not run), and every
    ``CrossModalObjective`` in it draws its noise with ``GlobalBatchNoise``. A single process's model
    stays exactly as it is.

    Changes ``model`` in place (its parameters stay the same tensors) and returns it, or its
    replacement if it is itself a batch norm.
    """
    if world_size == 1:
        return model
    model = (nn.SyncBatchNorm.convert_sync_batchnorm(model) if torch.device(device).type == "cuda"
             else convert_sync_batchnorm(model))
    credibility.sync_feature_statistics(model)
    for module in model.modules():
        if isinstance(module, CrossModalObjective):
            module.noise = GlobalBatchNoise(rank, world_size)
    return model
