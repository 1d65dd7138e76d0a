"""Collectives for data-parallel training that autograd can differentiate through."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_sum"]


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
