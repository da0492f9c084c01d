"""What a spawned rank of tests/ops/test_sinkhorn.py runs, in a module the spawned process imports by name
(a test module's importlib name is not importable there), and the inputs both sides draw."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import fastvq

DISTRIBUTED_OPTIONS = dict(epsilon=0.05, iters=5, metric="euclidean", normalize="standardize", order="columns_first",
                           sum_eps=1e-8)


def random_inputs(shape, dtype=torch.float32, device="cpu", seed=0):
    num_rows, num_codes, dim = shape
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(num_rows, dim, generator=generator, dtype=torch.float64)
    codebook = torch.randn(num_codes, dim, generator=generator, dtype=torch.float64)
    return z.to(device=device, dtype=dtype), codebook.to(device=device, dtype=dtype)


def sinkhorn_rank(rank, world, store, split, out_dir):
    """Rank 0 takes rows ``[0, split)`` of one batch, rank 1 the rest; each saves its result."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        z, codebook = random_inputs((40, 9, 5), torch.float64)
        shard = z[:split] if rank == 0 else z[split:]
        torch.save(fastvq.sinkhorn_assign(shard, codebook, **DISTRIBUTED_OPTIONS),
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # As in tests/app/test_distributed.py: leave at once, before a gloo rank's teardown can abort.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
