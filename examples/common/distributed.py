"""The process group under ``torchrun`` (gloo on CPU, nccl on GPU; a single process otherwise) and the
device. ``gpoe_fusion.distributed.match_single_process`` makes the ranks train as one process does with
their global batch."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .cli import UsageError


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run: rank of world_size processes, on device."""

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
    """Join the process group that torchrun describes in the environment (if any) and pick the device:
    "auto" (CUDA when available), "cpu" or "cuda"."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    launched = "WORLD_SIZE" in os.environ  # torchrun sets it for every process it starts
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UsageError("--device", f"process {local_rank} of this node needs CUDA device {local_rank}, but only "
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
