"""Training, prior fitting and sampling behind the ``fastvq`` command.

A run directory holds everything about one stage-1 model:

- ``config.json``: the model, data and training configuration (also inside every checkpoint);
- ``checkpoint.pt``: the latest model, optimiser, scheduler and RNG state, written at every
  evaluation, so ``fastvq train --resume`` continues where the run stopped;
- ``metrics.jsonl``: one JSON row per evaluation on the held-out split;
- ``reconstructions.png``, ``codebook_usage.png``: the latest evaluation's pictures;
- ``prior.pt``, ``prior_metrics.jsonl``: the prior trained by ``fastvq prior``;
- ``samples.png``: what ``fastvq sample`` drew.

Under ``torchrun`` the stage-1 training (and the prior's) runs with DistributedDataParallel on
every process (gloo on CPU, NCCL on CUDA): each rank trains on its own shard of every epoch, the
gradients are averaged by DDP, and the EMA codebooks are kept identical by the layers themselves
(their statistics are all-reduced), so DDP's buffer broadcast is switched off. Only rank 0 writes.

The modules, lowest first: ``data`` (the image datasets), ``pictures`` (the run's PNGs),
``common`` (the run's names, ``RunError``, data loading, progress bars, the schedule),
``distributed`` (processes and devices), ``checkpoint`` (saving and reading
run files), ``stage1`` (the VQ model), ``prior`` and ``sample``.
"""

from .checkpoint import load_run
from .common import PRIOR_MODELS, STAGE1_MODELS, RunError, load_data
from .distributed import DistContext, default_threads, setup_distributed
from .prior import build_prior, train_prior
from .sample import sample
from .stage1 import Stage1Trainer, build_stage1, stage1_config, train

__all__ = [
    "RunError",
    "STAGE1_MODELS",
    "PRIOR_MODELS",
    "DistContext",
    "setup_distributed",
    "default_threads",
    "stage1_config",
    "build_stage1",
    "Stage1Trainer",
    "train",
    "build_prior",
    "train_prior",
    "sample",
    "load_run",
    "load_data",
]
