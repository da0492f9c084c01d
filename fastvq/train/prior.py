"""Priors over a stage-1 run's codes: which prior fits which model, and the training loop that fits it."""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from ..models import RQVAE, VQVAE2, HierarchicalPrior
from ..models.priors import prior_loss
from ..models.registry import DEFAULT_PRIOR, SMALL_IMAGE, prior_model
from . import checkpoint
from .common import (
    CHECKPOINT,
    DEFAULT_PRIOR_EPOCHS,
    EVAL_BATCH,
    PRIOR_CHECKPOINT,
    PRIOR_CURVES,
    PRIOR_METRICS,
    PRIOR_MODELS,
    RunError,
    append_jsonl,
    cosine_schedule,
    draw_curves,
    load_data,
)
from .common import progress as progress_bar
from .data import ImageData
from .distributed import DEFAULT_DIST_TIMEOUT_S, collective_timeout, default_threads, epoch_shard, setup_distributed
from .stage1 import trained_stage1


def _code_maps(model: nn.Module, images: Tensor, data: ImageData, device: torch.device):
    """Encodes ``images`` in batches: a tensor of codes, or a (top, bottom) pair for VQ-VAE-2."""
    parts = []
    for start in range(0, images.shape[0], EVAL_BATCH):
        codes = model.encode(data.batch(images[start : start + EVAL_BATCH], device))
        parts.append(tuple(c.cpu() for c in codes) if isinstance(codes, tuple) else codes.cpu())
    if isinstance(parts[0], tuple):
        return tuple(torch.cat([p[level] for p in parts]) for level in range(len(parts[0])))
    return torch.cat(parts)


def default_prior_args(kind: str, small: bool) -> dict:
    return prior_model(kind).defaults(small)


def build_prior(kind: str, args: dict, model: nn.Module, image_size: tuple[int, int]) -> nn.Module:
    """The prior for the codes of stage-1 ``model`` on ``image_size`` images: flat, hierarchical
    (VQ-VAE-2: the bottom prior conditioned on the top codes) or with a depth axis (RQ-VAE)."""
    entry = prior_model(kind)
    if isinstance(model, VQVAE2):
        top_shape, bottom_shape = model.code_shape(*image_size)
        top = entry.build(args, model.top_codebook_size, top_shape)
        bottom = entry.build(args, model.codebook_size, bottom_shape, cond_codes=model.top_codebook_size,
                             cond_len=top_shape[0] * top_shape[1])
        return HierarchicalPrior(top, bottom)
    depth = model.depth if isinstance(model, RQVAE) else 1
    try:
        return entry.build(args, model.codebook_size, model.code_shape(*image_size), depth=depth)
    except ValueError as error:
        raise RunError(str(error)) from None


def stage1_identity(config: dict) -> dict:
    """What a prior records of the run whose codes it models: the model type and the run's id."""
    return {"model": config["model"], "run_id": config.get("run_id")}


def check_prior_fits(prior_state: dict, config: dict, path: Path) -> None:
    """Refuses a prior trained on another run's codes (another model type, or another run id), which
    would otherwise decode to noise without a word when the shapes happen to agree."""
    recorded = prior_state.get("stage1")
    if recorded is None:
        warnings.warn(f"{path} does not say which run's codes it was trained on (written before fastvq recorded it): "
                      "it is assumed to be this run's", stacklevel=2)
        return
    if not isinstance(recorded, dict):
        raise RunError(f"{path} is corrupt: its record of the stage-1 run is a {type(recorded).__name__}")
    if recorded.get("model") != config["model"]:
        raise RunError(f"{path} was trained on the codes of a {recorded.get('model')} model, but {path.parent} holds a "
                       f"{config['model']} model: train its prior with fastvq prior --run {path.parent}")
    if recorded.get("run_id") != config.get("run_id"):
        raise RunError(f"{path} was trained on the codes of another {config['model']} run (run id "
                       f"{recorded.get('run_id')}, this run is {config.get('run_id')}): train its prior with "
                       f"fastvq prior --run {path.parent}")


class _PriorRunner(nn.Module):
    """Puts the prior's loss in ``forward`` so DDP sees one forward per backward."""

    def __init__(self, prior: nn.Module):
        super().__init__()
        self.prior = prior

    def forward(self, codes, generator: Optional[torch.Generator] = None):
        if isinstance(self.prior, HierarchicalPrior):
            top_loss, bottom_loss = self.prior.loss(codes, generator=generator)
            return (top_loss + bottom_loss) / 2
        return prior_loss(self.prior, codes, generator=generator)


def _select(codes, rows: Tensor, device: torch.device):
    if isinstance(codes, tuple):
        return tuple(c[rows].to(device) for c in codes)
    return codes[rows].to(device)


def _count(codes) -> int:
    return (codes[0] if isinstance(codes, tuple) else codes).shape[0]


def train_prior(
    run: Path,
    kind: Optional[str] = None,
    *,
    epochs: Optional[int] = None,
    batch_size: int = 64,
    lr: Optional[float] = None,
    prior_overrides: Optional[dict] = None,
    seed: int = 0,
    device: str = "auto",
    threads: Optional[int] = None,
    progress: bool = True,
    dist_timeout: float = DEFAULT_DIST_TIMEOUT_S,
) -> dict:
    """Fits a prior to the codes of the run's training split; writes ``prior.pt`` and its metrics.

    ``kind`` defaults to ``gpt``: on the digits' 4 x 4 code maps it reached 3.9 bits per held-out
    code where the best Gated PixelCNN setting tried reached 4.4 (both in under a minute). The held-out
    split's codes give ``val_loss`` (nats per code) and ``val_bits_per_code``; for ``maskgit``,
    whose objective is the cross-entropy of the codes it masks, ``val_loss`` is that (nats per
    masked code, under masks drawn from a generator seeded with 0 at every evaluation, so epochs
    and runs compare) and ``val_masked_bits_per_code`` the same in bits.
    """
    run = Path(run)
    ctx = setup_distributed(device, dist_timeout)
    try:
        torch.set_num_threads(threads or default_threads(int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world))))
        config, stage1_state = checkpoint.load_run(run)
        if ctx.is_main:
            checkpoint.require_writable(run, "fastvq prior writes prior.pt and prior_metrics.jsonl there")
        kind = kind or DEFAULT_PRIOR
        if kind not in PRIOR_MODELS:
            raise RunError(f"unknown prior {kind!r}: use one of {', '.join(PRIOR_MODELS)}")
        data = load_data(config, run / CHECKPOINT)
        model = trained_stage1(config, stage1_state, ctx.device)
        train_codes = _code_maps(model, data.train, data, ctx.device)
        val_codes = _code_maps(model, data.val, data, ctx.device)
        small = min(data.image_size) < SMALL_IMAGE
        args = default_prior_args(kind, small)
        for name, value in (prior_overrides or {}).items():
            if value is None:
                continue
            if name == "width":
                name = prior_model(kind).width
            if name not in args:
                raise RunError(f"--{name.replace('_', '-')} does not apply to the {kind} prior")
            args[name] = value
        epochs = DEFAULT_PRIOR_EPOCHS.get(data.name, 20) if epochs is None else epochs
        lr = 1e-3 if lr is None else lr
        if epochs < 1 or batch_size < 1 or not lr > 0:
            raise RunError("--epochs and --batch-size must be positive and --lr > 0")
        torch.manual_seed(seed)
        prior = build_prior(kind, args, model, data.image_size).to(ctx.device)
        loss_of = _PriorRunner(prior)
        runner: nn.Module = loss_of
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            runner = DistributedDataParallel(
                loss_of, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
            )
        optimizer = torch.optim.Adam(prior.parameters(), lr=lr)
        count = _count(train_codes)
        steps_per_epoch = math.ceil(epoch_shard(count, 0, seed, ctx).shape[0] / batch_size)
        scheduler = cosine_schedule(optimizer, steps_per_epoch * epochs)
        prior_config = {"prior": kind, "prior_args": args, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                        "seed": seed}
        if ctx.is_main:
            (run / PRIOR_METRICS).unlink(missing_ok=True)
        bar = progress_bar(steps_per_epoch * epochs, 0, f"prior {kind}", progress and ctx.is_main)
        metrics: dict = {}
        started = time.perf_counter()
        for epoch in range(epochs):
            prior.train()
            rows = epoch_shard(count, epoch, seed, ctx)
            losses = []
            for begin in range(0, rows.shape[0], batch_size):
                loss = runner(_select(train_codes, rows[begin : begin + batch_size], ctx.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}", refresh=False)
            if ctx.is_main:
                prior.eval()
                with torch.no_grad():
                    val_total, val_rows = 0.0, 0
                    val_count = _count(val_codes)
                    masks = torch.Generator(device=ctx.device).manual_seed(0)
                    for begin in range(0, val_count, EVAL_BATCH):
                        batch_rows = torch.arange(begin, min(begin + EVAL_BATCH, val_count))
                        val_batch = _select(val_codes, batch_rows, ctx.device)
                        val_total += float(loss_of(val_batch, masks)) * batch_rows.numel()
                        val_rows += batch_rows.numel()
                val_loss = val_total / max(1, val_rows)
                masked = prior_model(kind).masked_objective
                bits_key = "val_masked_bits_per_code" if masked else "val_bits_per_code"
                metrics = {"epoch": epoch + 1, "train_loss": sum(losses) / max(1, len(losses)), "val_loss": val_loss,
                           bits_key: val_loss / math.log(2), "time_s": round(time.perf_counter() - started, 3)}
                append_jsonl(run / PRIOR_METRICS, metrics)
                bar.set_postfix(epoch=epoch + 1, **{bits_key: f"{metrics[bits_key]:.3f}"})
            ctx.barrier()
        bar.close()
        if ctx.is_main:
            checkpoint.atomic_save({"format": checkpoint.PRIOR_FORMAT, "config": prior_config,
                                    "model": prior.state_dict(), "metrics": metrics,
                                    "stage1": stage1_identity(config)}, run / PRIOR_CHECKPOINT)
            draw_curves(run / PRIOR_METRICS, run / PRIOR_CURVES, f"fastvq prior: {kind} on the codes of {run.name}")
        return metrics
    except RuntimeError as error:
        timed_out = collective_timeout(error, ctx, dist_timeout)
        if timed_out is None:
            raise
        raise timed_out from None
    finally:
        ctx.close()
