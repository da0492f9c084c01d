"""One gloo rank of tests/nn/test_moshi.py's distributed test (importable by the spawned ranks, which
cannot import a test module that pytest loaded with --import-mode=importlib).

Each rank trains Moshi's ResidualVectorQuantizer, fastvq's, and fastvq's with ``parity=True`` (all three
from the same initial state) for a few steps on its own shard, counting the all-reduces each issues,
and saves the counts and the final buffers.
"""

import copy
import os

import torch
import torch.distributed as dist
from _originals import load_original

from fastvq.nn import moshi

DISTRIBUTED_STEPS, DISTRIBUTED_LEVELS = 3, 2
DIM, BINS, FRAME_RATE = 8, 16, 12.5


def _train(module, rank):
    for step in range(DISTRIBUTED_STEPS):
        shard = torch.randn(2, DIM, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(10 * step + rank))
        torch.manual_seed(step)
        result = module(shard.requires_grad_(), FRAME_RATE)
        (result.x.sum() + result.penalty).backward()
    return {name: buffer.detach().clone() for name, buffer in module.named_buffers()}


def run_rank(rank, world, store, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    sizes = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        sizes.append(tensor.numel())
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        torch.manual_seed(0)
        theirs = load_original("moshi.quantization.vq").ResidualVectorQuantizer(
            dimension=DIM, n_q=DISTRIBUTED_LEVELS, bins=BINS, threshold_usage_ratio=0.6).double()
        for codebook in (layer._codebook for layer in theirs.vq.layers):
            codebook.check_unused_every = codebook._next_unused_check = 2  # expire within the few steps
        modules = {
            "mine": moshi.ResidualVectorQuantizer.from_original(copy.deepcopy(theirs)),
            "parity": moshi.ResidualVectorQuantizer.from_original(copy.deepcopy(theirs), parity=True),
            "theirs": theirs,
        }
        results = {}
        for name, module in modules.items():
            sizes.clear()
            buffers = _train(module, rank)
            results[name] = (list(sizes), buffers)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    os._exit(0)  # see tests/app/test_distributed.py: gloo ranks can abort in interpreter teardown
