"""Stage 1: the VQ model's configuration, its trainer (optimiser, schedule, DDP, discriminator) and
the training loop with evaluation, pictures and resumable checkpoints."""

from __future__ import annotations

import importlib
import json
import math
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .. import __version__
from ..models._common import code_usage
from ..models.registry import PERCEPTUAL_NETWORKS, STAGE1, stage1_model
from . import checkpoint
from .common import (
    CHECKPOINT,
    CONFIG,
    CURVES,
    DEFAULT_EPOCHS,
    EVAL_BATCH,
    METRICS,
    PRIOR_CHECKPOINT,
    PRIOR_CURVES,
    PRIOR_METRICS,
    RECONSTRUCTIONS,
    SAMPLES,
    USAGE,
    RunError,
    append_jsonl,
    cosine_schedule,
    draw_curves,
    load_data,
)
from .common import progress as progress_bar
from .data import ImageData
from .distributed import (
    DEFAULT_DIST_TIMEOUT_S,
    DistContext,
    collective_timeout,
    default_threads,
    epoch_shard,
    setup_distributed,
)
from .pictures import save_reconstructions, save_usage_chart


def default_model_args(model: str, data: ImageData) -> dict:
    """The architecture ``fastvq train`` uses for ``model`` when no flag overrides it (the model
    table's defaults for the data's image size and channels)."""
    try:
        return stage1_model(model).defaults(data.image_size, data.channels, data.variance())
    except ValueError as error:
        raise RunError(str(error)) from None


def stage1_config(
    model: str,
    data_spec: str,
    data: ImageData,
    *,
    model_overrides: Optional[dict] = None,
    data_args: Optional[dict] = None,
    epochs: Optional[int] = None,
    batch_size: int = 64,
    lr: Optional[float] = None,
    seed: int = 0,
    eval_every: int = 1,
    adversarial_start: Optional[int] = None,
    perceptual_net: Optional[str] = None,
) -> dict:
    """A complete, JSON-serialisable description of a stage-1 run."""
    model_args = default_model_args(model, data)  # refuses an unknown model
    for name, value in (model_overrides or {}).items():
        if value is None:
            continue
        if name not in model_args:
            raise RunError(f"--{name.replace('_', '-')} does not apply to --model {model}")
        model_args[name] = value
    entry = stage1_model(model)
    if perceptual_net is not None:
        if not entry.perceptual:
            takers = " or ".join(name for name, other in STAGE1.items() if other.perceptual)
            raise RunError(f"--perceptual-net applies to --model {takers} only")
        if not model_args["perceptual_weight"]:
            model_args["perceptual_weight"] = 0.1
    elif entry.perceptual and model_args["perceptual_weight"]:
        raise RunError("--perceptual-weight needs --perceptual-net MODULE:CALLABLE "
                       "(a feature network; nothing is downloaded)")
    epochs = DEFAULT_EPOCHS.get(data.name, 20) if epochs is None else epochs
    if lr is None:
        lr = entry.learning_rate(data.image_size)
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("eval_every", eval_every)):
        if not isinstance(value, int) or value < 1:
            raise RunError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if not lr > 0:
        raise RunError(f"--lr must be > 0, got {lr!r}")
    return {
        "fastvq_version": __version__,
        # Names this run, so that a prior trained on its codes cannot be used with another run's.
        "run_id": uuid.uuid4().hex,
        "model": model,
        "model_args": model_args,
        "perceptual_net": perceptual_net,
        "data": data_spec,
        "data_args": dict(data_args or {}),
        "image_size": list(data.image_size),
        "train": dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, eval_every=eval_every,
                      adversarial_start=adversarial_start),
    }


# Where the ViT-VQGAN's state dict keeps the (frozen) perceptual-loss network's weights.
PERCEPTUAL_PREFIX = "perceptual_network."


def _load_callable(spec: str) -> Callable[[], nn.Module]:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise RunError(f"--perceptual-net must be MODULE:CALLABLE (e.g. mypkg.features:make_net), got {spec!r}")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise RunError(f"--perceptual-net {spec}: {error}") from None
    return target


def perceptual_network(config: dict, trusted: Optional[str]) -> Optional[nn.Module]:
    """The feature network of the perceptual loss that ``config["perceptual_net"]`` names, or None.

    ``trusted`` is the ``MODULE:CALLABLE`` the user gave on this command line (or None): only it, or a
    name of the model table's ``PERCEPTUAL_NETWORKS``, is resolved, so a run directory cannot make fastvq import
    and call code of its choosing. Raises ``RunError`` for any other name, naming the field."""
    spec = config.get("perceptual_net")
    if not spec:
        return None
    if spec in PERCEPTUAL_NETWORKS:
        factory = PERCEPTUAL_NETWORKS[spec]
    elif spec == trusted:
        factory = _load_callable(spec)
    else:
        raise RunError(f"the run's config field 'perceptual_net' names {spec!r}, which is not a feature network "
                       "fastvq provides: fastvq does not import code that a run directory names. If you trust it, "
                       f"pass --perceptual-net {spec} on the command line")
    network = factory()
    if not isinstance(network, nn.Module):
        raise RunError(f"--perceptual-net {spec} returned a {type(network).__name__}, not an nn.Module")
    return network


def build_stage1(config: dict, perceptual: Optional[nn.Module] = None) -> nn.Module:
    """The stage-1 model a config describes (randomly initialised). ``perceptual`` is the ViT-VQGAN's
    perceptual-loss network (see ``perceptual_network``); without it the model is built without
    one, which changes only its training loss."""
    try:
        entry = stage1_model(config["model"])
    except ValueError as error:
        raise RunError(str(error)) from None
    return entry.build(config["model_args"], perceptual)


def trained_stage1(config: dict, state: dict, device: torch.device) -> nn.Module:
    """The run's trained stage-1 model in eval mode on ``device``, for encoding and decoding: built
    without a perceptual-loss network (only training uses it), whose frozen weights are skipped."""
    model = build_stage1(config).to(device)
    weights = {name: value for name, value in state["model"].items() if not name.startswith(PERCEPTUAL_PREFIX)}
    model.load_state_dict(weights)
    return model.eval()


class Stage1Trainer:
    """The model, optimiser(s), schedule and (under a process group) DDP wrappers of one run.

    ``step(x)`` is one optimisation step on this rank's batch ``x`` (float ``[B, C, H, W]`` in
    ``[0, 1]``); ``evaluate(data)`` measures the held-out split on this rank alone.
    """

    def __init__(self, config: dict, ctx: DistContext, total_steps: int, state: Optional[dict] = None,
                 trusted_perceptual_net: Optional[str] = None):
        self.config = config
        self.ctx = ctx
        train_args = config["train"]
        self.model = build_stage1(config, perceptual_network(config, trusted_perceptual_net)).to(ctx.device)
        if state is not None:
            self.model.load_state_dict(state["model"])
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(parameters, lr=train_args["lr"])
        self.scheduler = cosine_schedule(self.optimizer, total_steps)
        self.discriminator = self.disc_optimizer = None
        # The model's own trainer extra: a GAN discriminator trained next to it (the ViT-VQGAN's).
        self.adversary = stage1_model(config["model"]).adversary(config["model_args"])
        if self.adversary is not None:
            self.discriminator = self.adversary.network.to(ctx.device)
            self.disc_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=train_args["lr"],
                                                   betas=(0.5, 0.9))
            start = train_args.get("adversarial_start")
            self.adversarial_start = total_steps // 2 if start is None else start
        self.step_count = 0
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step_count = state["step"]
            if self.discriminator is not None:
                self.discriminator.load_state_dict(state["discriminator"])
                self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        self.runner: nn.Module = self.model
        self.disc_runner = self.discriminator
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            # A one-channel image's first convolution gets weight gradients whose strides differ from
            # DDP's bucket only along its size-1 input-channel dimension: the same layout in memory.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            # The layers all-reduce the EMA statistics themselves; DDP's buffer broadcast would only
            # copy what is already identical.
            self.runner = DistributedDataParallel(self.model, device_ids=device_ids, broadcast_buffers=False)
            if self.discriminator is not None:
                self.disc_runner = DistributedDataParallel(self.discriminator, device_ids=device_ids)

    @property
    def adversarial_active(self) -> bool:
        return self.discriminator is not None and self.step_count >= self.adversarial_start

    def step(self, x: Tensor) -> dict:
        """One optimisation step; returns the batch's loss and code usage (host floats)."""
        self.model.train()
        adversarial = self.adversarial_active
        if adversarial:
            self.discriminator.requires_grad_(False)
            out = self.runner(x, discriminator=self.discriminator)
            self.discriminator.requires_grad_(True)
        else:
            out = self.runner(x)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        self.optimizer.step()
        self.scheduler.step()
        if adversarial:
            logits = self.disc_runner(torch.cat([x, out["reconstruction"].detach()]))
            real, fake = logits.split([x.shape[0], x.shape[0]])
            disc_loss = self.adversary.loss(real, fake)
            self.disc_optimizer.zero_grad(set_to_none=True)
            disc_loss.backward()
            self.disc_optimizer.step()
        self.step_count += 1
        usage = [code_usage(indices, size) for indices, size in zip(out["indices"], self.model.codebook_sizes)]
        return {
            "loss": float(out["loss"].detach()),
            "perplexity": sum(float(p) for _, p, _ in usage) / len(usage),
            "codes_used": sum(int(u) for _, _, u in usage) / len(usage),
        }

    @torch.no_grad()
    def evaluate(self, data: ImageData) -> tuple[dict, list[Tensor], Tensor]:
        """Held-out metrics, the per-codebook code counts and the first reconstructions."""
        model = self.model.eval()
        variance = float(self.config["model_args"].get("data_variance") or data.variance())
        squared_error, pixels, loss_sum, recon_sum, rows = 0.0, 0, 0.0, 0.0, 0
        counts = [torch.zeros(size, dtype=torch.float64) for size in model.codebook_sizes]
        first = None
        for start in range(0, data.val.shape[0], EVAL_BATCH):
            x = data.batch(data.val[start : start + EVAL_BATCH], self.ctx.device)
            out = model(x)
            reconstruction = out["reconstruction"].float()
            if first is None:
                first = reconstruction.cpu()
            squared_error += float((reconstruction - x).square().sum())
            pixels += x.numel()
            loss_sum += float(out["loss"]) * x.shape[0]
            recon_sum += float(out["recon_loss"]) * x.shape[0]
            rows += x.shape[0]
            for total, indices, size in zip(counts, out["indices"], model.codebook_sizes):
                total += code_usage(indices.cpu(), size)[0]
        usage = [code_usage_from_counts(total) for total in counts]
        sizes = list(model.codebook_sizes)
        metrics = {
            "val_nmse": squared_error / pixels / variance,
            "val_loss": loss_sum / rows,
            "val_recon_loss": recon_sum / rows,
            "perplexity": sum(p for p, _ in usage) / len(usage),
            "codes_used": _mean([u for _, u in usage]),
            "codebook_size": sizes[0] if len(set(sizes)) == 1 else sizes,
        }
        if len(usage) > 1:
            metrics["perplexity_per_codebook"] = [p for p, _ in usage]
            metrics["codes_used_per_codebook"] = [u for _, u in usage]
        return metrics, counts, first

    def state_dict(self) -> dict:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step_count,
        }
        if self.discriminator is not None:
            state["discriminator"] = self.discriminator.state_dict()
            state["disc_optimizer"] = self.disc_optimizer.state_dict()
        return state


def code_usage_from_counts(counts: Tensor) -> tuple[float, int]:
    probs = counts / counts.sum().clamp_min(1.0)
    perplexity = float(torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum()))
    return perplexity, int((counts > 0).sum())


def _mean(values: list) -> float | int:
    mean = sum(values) / len(values)
    return int(mean) if float(mean).is_integer() else mean


def write_stage1_pictures(
    run: Path, config: dict, data: ImageData, counts: list[Tensor], reconstructions: Tensor
) -> None:
    count = min(16, data.val.shape[0])
    save_reconstructions(data.batch(data.val[:count]), reconstructions[:count], run / RECONSTRUCTIONS, columns=count)
    save_usage_chart(counts, stage1_model(config["model"]).codebook_names(len(counts)), run / USAGE)






def train(
    run: Path,
    config: Optional[dict],
    *,
    resume: bool = False,
    force: bool = False,
    device: str = "auto",
    threads: Optional[int] = None,
    progress: bool = True,
    epochs: Optional[int] = None,
    log: Callable[[str], None] = print,
    dist_timeout: float = DEFAULT_DIST_TIMEOUT_S,
    perceptual_net: Optional[str] = None,
) -> dict:
    """Trains (or, with ``resume``, continues) the stage-1 run in ``run``; returns the last metrics.

    ``config`` comes from ``stage1_config`` for a new run and is ignored when resuming (the run's
    own config is used; ``epochs`` may extend it). A resumed run whose config names a perceptual
    network of the user's own (``MODULE:CALLABLE``) needs the same name as ``perceptual_net`` (the
    command line's ``--perceptual-net``): nothing a run directory names is imported otherwise.
    """
    run = Path(run)
    ctx = setup_distributed(device, dist_timeout)
    try:
        torch.set_num_threads(threads or default_threads(int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world))))
        state = None
        data_source = None
        if resume:
            config, state = checkpoint.load_run(run)
            data_source = run / CHECKPOINT
            recorded = config.get("perceptual_net")
            if perceptual_net is not None and perceptual_net != recorded:
                raise RunError(f"--perceptual-net {perceptual_net} is not the network {run} was trained with "
                               f"({recorded or 'none'}): a resumed run keeps its own")
            if epochs is not None:
                config["train"]["epochs"] = epochs
            if ctx.is_main:
                checkpoint.require_writable(run, "resuming writes the run's checkpoint, metrics and pictures there")
        else:
            if (run / CHECKPOINT).exists() and not force:
                raise RunError(f"{run} already holds a run: pass --resume to continue it, --force to start over, "
                               "or choose another --out")
            if ctx.is_main:
                checkpoint.require_writable(run, "the run directory holds the run's checkpoint, metrics and pictures")
                for name in (METRICS, CURVES, PRIOR_CHECKPOINT, PRIOR_METRICS, PRIOR_CURVES, SAMPLES):
                    (run / name).unlink(missing_ok=True)
            perceptual_net = config.get("perceptual_net")  # the caller's own config
        train_args = config["train"]
        data = load_data(config, data_source)
        seed = train_args["seed"]
        shard = epoch_shard(data.train.shape[0], 0, seed, ctx)
        steps_per_epoch = math.ceil(shard.shape[0] / train_args["batch_size"])
        total_steps = steps_per_epoch * train_args["epochs"]
        torch.manual_seed(seed)
        trainer = Stage1Trainer(config, ctx, total_steps, state, trusted_perceptual_net=perceptual_net)
        start_epoch = 0
        if state is not None:
            start_epoch = state["epoch"]
            checkpoint.set_rng_state(state["rng"])
            if ctx.is_main and checkpoint.reconcile_metrics(run / METRICS, state):
                log(f"{run / METRICS}: dropped its cut-off last line (the row an interrupted run was writing)")
        if ctx.is_main:
            (run / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if start_epoch >= train_args["epochs"]:
            log(f"{run} has already trained {start_epoch} of {train_args['epochs']} epochs "
                "(pass --epochs N to train longer)")
            return state.get("metrics", {})
        bar = progress_bar(total_steps, trainer.step_count, f"train {config['model']}", progress and ctx.is_main)
        metrics: dict = state.get("metrics", {}) if state else {}
        started = time.perf_counter()
        for epoch in range(start_epoch, train_args["epochs"]):
            rows = epoch_shard(data.train.shape[0], epoch, seed, ctx)
            losses = []
            for begin in range(0, rows.shape[0], train_args["batch_size"]):
                x = data.batch(data.train[rows[begin : begin + train_args["batch_size"]]], ctx.device)
                stats = trainer.step(x)
                losses.append(stats["loss"])
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{stats['loss']:.4f}", ppl=f"{stats['perplexity']:.1f}",
                                used=stats["codes_used"], val_nmse=f"{metrics.get('val_nmse', float('nan')):.4f}",
                                refresh=False)
            last = epoch + 1 == train_args["epochs"]
            if (epoch + 1) % train_args["eval_every"] == 0 or last:
                if ctx.is_main:
                    metrics, counts, reconstructions = trainer.evaluate(data)
                    metrics = {"epoch": epoch + 1, "step": trainer.step_count, **metrics,
                               "train_loss": sum(losses) / max(1, len(losses)),
                               "lr": trainer.scheduler.get_last_lr()[0],
                               "time_s": round(time.perf_counter() - started, 3)}
                    checkpoint.atomic_save({"format": checkpoint.RUN_FORMAT, "config": config, "epoch": epoch + 1,
                                            "rng": checkpoint.rng_state(), "metrics": metrics,
                                            **trainer.state_dict()}, run / CHECKPOINT)
                    append_jsonl(run / METRICS, metrics)
                    write_stage1_pictures(run, config, data, counts, reconstructions)
                    bar.set_postfix(epoch=epoch + 1, val_nmse=f"{metrics['val_nmse']:.4f}",
                                    ppl=f"{metrics['perplexity']:.1f}", used=metrics["codes_used"])
                ctx.barrier()
        bar.close()
        if ctx.is_main:
            draw_curves(run / METRICS, run / CURVES, f"fastvq train: {config['model']} on {config['data']}", log)
        return metrics
    except RuntimeError as error:
        timed_out = collective_timeout(error, ctx, dist_timeout)
        if timed_out is None:
            raise
        raise timed_out from None
    finally:
        ctx.close()
