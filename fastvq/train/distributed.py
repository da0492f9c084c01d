"""Processes and devices: the process group ``torchrun`` describes, each rank's device and share of
an epoch, and the default thread count."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .common import RunError


@dataclass
class DistContext:
    """Where this process stands: its rank among ``world`` processes and its device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.initialised_here and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RunError(f"--device {device} was asked for, but PyTorch sees no CUDA device (use --device cpu)")
        return torch.device(device if ":" in device else f"cuda:{local_rank}")
    if device != "cpu":
        raise RunError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return torch.device("cpu")


def setup_distributed(device: str = "auto") -> DistContext:
    """Joins the process group ``torchrun`` describes (``WORLD_SIZE > 1``; gloo on CPU, NCCL on
    CUDA), or uses one that is already initialised, or runs as a single process."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    initialised_here = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        initialised_here = True
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, resolved, initialised_here)
    return DistContext(0, 1, 0, resolved)


def default_threads(processes: int = 1) -> int:
    """Intra-op threads per process: half the cores, shared among the processes on the machine.

    Measured on a 2-core CPU shared with other work, the digits models ran about 10x faster with
    one thread than with two (the second thread mostly waits); larger machines get more."""
    cores = os.cpu_count() or 1
    return max(1, min(8, cores // (2 * max(1, processes))))


def epoch_shard(count: int, epoch: int, seed: int, ctx: DistContext) -> Tensor:
    """This rank's share of the epoch's shuffled order; every rank gets the same number of rows."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    usable = count - count % ctx.world if ctx.distributed else count
    return order[:usable][ctx.rank :: ctx.world]
