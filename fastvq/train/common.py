"""What every part of a run uses: the run's file names and defaults, ``RunError``, data loading,
progress bars, JSON lines and the learning-rate schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch

from ..models.registry import PRIORS, STAGE1
from .data import ImageData, load_dataset

STAGE1_MODELS = tuple(STAGE1)
PRIOR_MODELS = tuple(PRIORS)
CHECKPOINT, CONFIG, METRICS = "checkpoint.pt", "config.json", "metrics.jsonl"
PRIOR_CHECKPOINT, PRIOR_METRICS = "prior.pt", "prior_metrics.jsonl"
RECONSTRUCTIONS, USAGE, SAMPLES = "reconstructions.png", "codebook_usage.png", "samples.png"
CURVES, PRIOR_CURVES = "training_curves.png", "prior_curves.png"
EVAL_BATCH = 256
# Default epochs per dataset: enough for the digits to reach val_nmse <= 0.05 with the default
# VQ-VAE; the others are starting points.
DEFAULT_EPOCHS = {"digits": 60, "mnist": 10, "cifar10": 30, "images": 50}
DEFAULT_PRIOR_EPOCHS = {"digits": 15, "mnist": 10, "cifar10": 20, "images": 50}


class RunError(Exception):
    """A problem with the user's run (missing files, conflicting options): printed, not traced."""


def load_data(config: dict, source: Optional[Path] = None) -> ImageData:
    """The dataset ``config["data"]`` names; a ``RunError`` saying why not. ``source`` is the
    checkpoint the config was read from, if any: the error then names that file and its field."""
    try:
        return load_dataset(config["data"], **config.get("data_args", {}))
    except (ValueError, FileNotFoundError) as error:
        where = f"{source}: its config field 'data' ({config['data']!r}): " if source is not None else ""
        raise RunError(where + str(error)) from None


def progress(total: int, initial: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=description, unit="step", disable=not enabled,
                dynamic_ncols=True, mininterval=0.5, leave=True)


def append_jsonl(path: Path, row: dict) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def draw_curves(metrics: Path, picture: Path, title: str, log=print) -> None:
    """``metrics`` (a JSON-lines file of rows with an ``epoch``) drawn at ``picture``; one line of
    notice instead where matplotlib, an optional dependency, is missing."""
    from .pictures import save_training_curves

    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    if rows and save_training_curves(rows, picture, title) is None:
        log(f"training curves not drawn ({picture.name}): matplotlib is not installed (pip install matplotlib)")


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 2 % of the steps, then cosine decay to zero."""
    warmup = max(1, total_steps // 50)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
