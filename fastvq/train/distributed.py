"""Processes and devices: the process group ``torchrun`` describes, each rank's device and share of
an epoch, and the default thread count.

Two guards keep a broken job from hanging: the process group has a timeout (``--dist-timeout``,
10 minutes by default, instead of gloo's 30), after which a rank blocked in a collective by a
stopped or lost peer ends with an error; and on Linux each worker asks the kernel to kill it when
its launcher dies (``prctl(PR_SET_PDEATHSIG)``), so a ``kill -9`` of ``torchrun`` leaves no orphans.
"""

from __future__ import annotations

import ctypes
import datetime
import math
import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .common import RunError

# Long enough for rank 0's evaluation, pictures and checkpoint while the others wait at a barrier;
# NCCL's own default, a third of gloo's.
DEFAULT_DIST_TIMEOUT_S = 600.0
_PR_SET_PDEATHSIG = 1


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
    """The device ``--device`` names (``auto``, ``cpu``, ``cuda`` meaning ``cuda:local_rank``, or
    ``cuda:N``); a ``RunError`` for any other name, or for CUDA where PyTorch sees no such device."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    kind, colon, index = device.partition(":")
    if kind != "cuda" or (colon and not index.isdigit()):
        raise RunError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        raise RunError(f"--device {device} was asked for, but PyTorch sees no CUDA device (use --device cpu)")
    number = int(index) if colon else local_rank
    if number >= torch.cuda.device_count():
        raise RunError(f"--device {device}: PyTorch sees {torch.cuda.device_count()} CUDA device(s), cuda:0 to "
                       f"cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", number)


def check_dist_timeout(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise RunError(f"--dist-timeout must be a finite number of seconds > 0, got {timeout!r}")
    return float(timeout)


def exit_with_launcher() -> None:
    """Has the kernel SIGKILL this process when its parent dies (Linux; elsewhere nothing): a
    ``torchrun`` worker whose launcher was killed cannot finish its job, and would otherwise keep
    its share of the machine, blocked in a collective, forever."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        raise RunError(f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")
    if os.getppid() != parent:  # the launcher died before the request was made
        os.kill(os.getpid(), signal.SIGKILL)


def setup_distributed(device: str = "auto", timeout: float = DEFAULT_DIST_TIMEOUT_S) -> DistContext:
    """Joins the process group ``torchrun`` describes (``WORLD_SIZE > 1``; gloo on CPU, NCCL on
    CUDA) with collectives that give up after ``timeout`` seconds, or uses one that is already
    initialised, or runs as a single process. A process that joins the group here exits when its
    launcher dies (see :func:`exit_with_launcher`)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    timeout = check_dist_timeout(timeout)
    initialised_here = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_with_launcher()
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        except RuntimeError as error:
            raise RunError(f"rank {os.environ.get('RANK', '?')} could not join the process group within "
                           f"{timeout:g} s ({error}); --dist-timeout sets the limit") from None
        initialised_here = True
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, resolved, initialised_here)
    return DistContext(0, 1, 0, resolved)


def collective_timeout(error: BaseException, ctx: DistContext, timeout: float) -> RunError | None:
    """The ``RunError`` for a collective that gave up waiting for another rank, or None when
    ``error`` is something else."""
    if not ctx.distributed or not isinstance(error, RuntimeError):
        return None
    if not isinstance(error, dist.DistError) and "timed out" not in str(error).lower():
        return None
    return RunError(f"rank {ctx.rank} waited {timeout:g} s for the other ranks in a collective and gave up: another "
                    f"process stopped responding or died ({str(error).splitlines()[0]}); --dist-timeout sets the limit")


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
