"""Keeping codebooks identical across ranks under ``torch.distributed``.

Every replica must end a step with the same codebook. The EMA statistics (per-code counts and
sums) and the k-means statistics are summed over ranks before they are applied, so two ranks on
two shards compute what one process computes on the whole batch. Vectors drawn from the batch
(k-means seeds, replacements for dead codes) are drawn from all ranks' rows with the same
outcome everywhere: each rank proposes candidates from its own rows, the proposals are gathered,
and one shared draw picks, for each code, a rank with probability proportional to its row count.
A rank whose shard is empty proposes nothing and is never picked. None of this synchronises the
host with the device: every decision is a tensor operation.

Under ``torch.compile`` the collectives are PyTorch's functional collectives, which it traces into
the graph (``dist.broadcast`` and friends would break it). In eager mode they are the ordinary
blocking ``torch.distributed`` calls: eager functional collectives on gloo run asynchronously
and were seen to corrupt the heap (``malloc(): unaligned tcache chunk``) when a temporary input
was freed before the collective finished.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sums ``tensor`` over ranks in place (a no-op outside a multi-process group)."""
    if is_distributed():
        if torch.compiler.is_compiling():
            tensor.copy_(funcol.all_reduce(tensor, "sum", dist.group.WORLD))
        else:
            dist.all_reduce(tensor)
    return tensor


def broadcast_from_first(tensor: Tensor) -> Tensor:
    """Rank 0's value of ``tensor`` on every rank (``tensor`` itself outside a process group)."""
    if not is_distributed():
        return tensor
    if torch.compiler.is_compiling():
        return funcol.broadcast(tensor, 0, dist.group.WORLD)
    tensor = tensor.clone()
    dist.broadcast(tensor, src=0)
    return tensor


def all_gather_rows(tensor: Tensor) -> Tensor:
    """Every rank's ``tensor [n, ...]`` stacked in rank order: ``[world, n, ...]``."""
    world = dist.get_world_size()
    tensor = tensor.contiguous()
    if torch.compiler.is_compiling():
        return funcol.all_gather_tensor(tensor, 0, dist.group.WORLD).reshape(world, *tensor.shape)
    gathered = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(gathered, tensor)
    return torch.stack(gathered)


def sample_rows(rows: Tensor, num: int, *, synced: bool, valid: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``num`` rows drawn uniformly with replacement from the valid rows of ``rows [M, D]``.

    Returns ``(samples [num, D], found)`` where ``found`` is a bool tensor, False when there was
    no valid row to draw from (the samples are then meaningless). ``valid [M]`` (bool) restricts
    the draw without boolean indexing, so no host sync. With ``synced`` under a process group the
    draw is over all ranks' valid rows and every rank gets the same rows.
    """
    device = rows.device
    if valid is None:
        valid = torch.ones(rows.shape[0], dtype=torch.bool, device=device)
    # The k-th valid row is where the running count of valid rows first exceeds k.
    running = torch.cumsum(valid.to(torch.int64), 0)
    count = running[-1] if rows.shape[0] else torch.zeros((), dtype=torch.int64, device=device)
    ranks = (torch.rand(num, device=device) * count).long()
    picks = torch.searchsorted(running, ranks, right=True).clamp_max(max(rows.shape[0] - 1, 0))
    local = rows[picks] if rows.shape[0] else rows.new_zeros((num, rows.shape[1]))
    if not (synced and is_distributed()):
        return local, count > 0
    world = dist.get_world_size()
    proposals = all_gather_rows(local)
    weights = all_gather_rows(count.reshape(1).float()).reshape(world)
    shared = broadcast_from_first(torch.rand(num, device=device))
    # Rank r owns the slice [cdf[r-1], cdf[r]) of [0, 1); empty ranks own nothing.
    total = weights.sum()
    cdf = torch.cumsum(weights, 0) / total.clamp_min(1.0)
    owner = torch.searchsorted(cdf, shared, right=True).clamp_max(world - 1)
    return proposals[owner, torch.arange(num, device=device)], total > 0
