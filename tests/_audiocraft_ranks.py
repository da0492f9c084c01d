"""One gloo rank of tests/nn/test_audiocraft.py's distributed test.

It lives on the tests' import path under its own name, because ``torch.multiprocessing.spawn``
re-imports the worker by module name in each rank, and a test module's name (``tests.nn.…``) can
resolve to another installed top-level ``tests`` package.
"""

import os

import torch
import torch.distributed as dist

from fastvq.nn.audiocraft import ResidualVectorQuantizer

DIM, BINS, FRAME_RATE = 6, 12, 50


def whole_batch() -> torch.Tensor:
    return torch.randn(2, DIM, 40, generator=torch.Generator().manual_seed(30)) * 2.0


def run_rank(rank: int, world: int, store: str, out_dir: str) -> None:
    """Three training steps of four quantizers on this rank's half of ``whole_batch()``; their states
    saved to ``out_dir/rank{rank}.pt``."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        states = {}
        for name, config in (("default", dict(parity=False, kmeans_init=False, threshold_ema_dead_code=0)),
                             ("parity", dict(parity=True, kmeans_init=False, threshold_ema_dead_code=0)),
                             ("kmeans", dict(parity=False, kmeans_init=True, kmeans_iters=3)),
                             ("dropout", dict(parity=False, kmeans_init=False, q_dropout=True, n_q=4))):
            torch.manual_seed(0)
            module = ResidualVectorQuantizer(**dict(dict(dimension=DIM, n_q=2, bins=BINS), **config)).train()
            torch.manual_seed(rank)  # the ranks' own draws differ: what they share must come from collectives
            for _ in range(3):
                module(whole_batch()[rank : rank + 1], FRAME_RATE)
            states[name] = module.state_dict()
        torch.save(states, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    os._exit(0)  # see tests/app/test_distributed.py: gloo ranks can abort in interpreter teardown
