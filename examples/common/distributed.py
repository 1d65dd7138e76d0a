"""Data-parallel set-up under ``torchrun``: gloo on CPU, nccl on GPU; a single process otherwise.

With W > 1 processes, ``match_single_process`` makes the ranks compute together what one process
computes with their global batch (the ranks' batches of a step are its rows r, r + W, ... for rank
r, see ``training.make_loader``): batch statistics over the global batch, and each sample's
reparameterisation noise drawn as the single process draws it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gpoe_fusion import CrossModalObjective
from gpoe_fusion.credibility import sync_feature_statistics

from .sync_norm import convert_sync_batchnorm

__all__ = ["DistEnv", "GlobalBatchNoise", "barrier", "cleanup", "match_single_process", "setup"]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    device: torch.device
    # Started by torchrun: a process group exists, also for one process, so a 1-process torchrun
    # runs the same collective code path (gloo or nccl) as a multi-process one.
    launched: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.launched


def setup(device: str = "auto") -> DistEnv:
    """Join the process group that torchrun describes in the environment (if any) and pick the device.

    device: "auto" (CUDA when available), "cpu" or "cuda".
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' was requested but no CUDA device is available")
    launched = "WORLD_SIZE" in os.environ  # torchrun sets it for every process it starts
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"device: process {local_rank} of this node needs CUDA device {local_rank}, but only "
                               f"{torch.cuda.device_count()} are visible")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if launched and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world_size)
    return DistEnv(rank, world_size, dev, launched)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


class GlobalBatchNoise:
    """The objective's reparameterisation noise of one rank's rows of the global batch, as one process
    draws it for the whole batch: called with shape [..., B, D] (B rows on each of W ranks), it draws
    [..., W * B, D] with torch.randn and keeps rows rank, rank + W, ..., this rank's global batch
    positions. Every rank must seed the global RNG alike (``training.fit`` does)."""

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size

    def __call__(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        *leading, batch, dim = shape
        draws = torch.randn((*leading, batch * self.world_size, dim), dtype=dtype, device=device)
        return draws[..., self.rank::self.world_size, :]


def match_single_process(model: nn.Module, env: DistEnv) -> nn.Module:
    """With more than one process, make ``model`` train as one process does with the global batch:
    its BatchNorm layers and gPoE's feature standardisation take their statistics over the global
    batch (torch's SyncBatchNorm on CUDA, with its fused kernels; ``sync_norm.SyncBatchNorm`` on
    other devices, where torch's does not run), and every CrossModalObjective in it draws its noise
    with ``GlobalBatchNoise``. A single process's model stays exactly as it is.

    Changes ``model`` in place (its parameters stay the same tensors) and returns it, or its
    replacement if it is itself a batch norm.
    """
    if env.world_size == 1:
        return model
    if env.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        model = convert_sync_batchnorm(model)
    sync_feature_statistics(model)
    for module in model.modules():
        if isinstance(module, CrossModalObjective):
            module.noise = GlobalBatchNoise(env.rank, env.world_size)
    return model
