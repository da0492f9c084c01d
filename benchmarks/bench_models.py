"""Every stage-1 model and prior of ``fastvq train`` / ``fastvq prior`` with their defaults, in one table.

Per model (``fastvq train --model M --data digits`` with its defaults): held-out ``val_nmse``,
codes used, perplexity and training time. Per prior over each model's codes (``fastvq prior
--model P``): the held-out bits per code (``gpt``: the exact negative log-likelihood; ``maskgit``:
its masked-token loss, in bits per masked code, which is not the same quantity), the prior's
training time, and the time to draw 64 code maps (without decoding them): the median of repeats
in which the samplers of one model take turns, and ``vs_gpt``, the GPT's time over that sampler's.

    python benchmarks/bench_models.py                              # every model and prior, default epochs
    python benchmarks/bench_models.py --models vqvae --priors gpt maskgit --steps 4 8
    python benchmarks/bench_models.py --runs runs/bench            # keep the run directories; reuse finished ones

A run directory under ``--runs`` whose configuration equals the one the defaults give now, and
that trained all its epochs, is reused instead of trained again (its recorded time is reported),
so a table can be completed piece by piece. Writes ``<out>/models/<machine>.csv`` and ``.md`` (``_harness.main``;
``--small``: the VQ-VAE and its GPT prior only).
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

from fastvq.models.priors import prior_sample  # noqa: E402
from fastvq.train import build_prior, build_stage1, load_data, load_run, stage1_config, train, train_prior  # noqa: E402
from fastvq.train import checkpoint as run_files  # noqa: E402
from fastvq.train.common import PRIOR_CHECKPOINT  # noqa: E402
from fastvq.train.distributed import resolve_device  # noqa: E402

BENCH = "models"
MODELS = ("vqvae", "vqvae2", "rqvae", "vit-vqgan")
PRIORS = ("gpt", "maskgit")
KEY_COLUMNS = ("model", "prior", "steps", "threads")
TABLE_COLUMNS = ("model", "prior", "steps", "val_nmse", "codes_used", "perplexity", "val_bits_per_code",
                 "val_masked_bits_per_code", "train_s", "sample_64_ms", "vs_gpt")


def _finished_run(run: Path, config: dict) -> dict | None:
    """The last metrics row of the finished run in ``run`` trained with ``config``, else None."""
    try:
        stored, state = load_run(run)
    except Exception:  # no run there, or an unreadable one: train it afresh
        return None
    same = {key: value for key, value in stored.items() if key != "fastvq_version"} == {
        key: value for key, value in config.items() if key != "fastvq_version"}
    if not same or state.get("epoch") != config["train"]["epochs"]:
        return None
    return state.get("metrics")


def _stage1_row(model: str, run: Path, data, threads: int, device: str) -> dict:
    config = stage1_config(model, "digits", data)
    metrics = _finished_run(run, config)
    reused = metrics is not None
    if not reused:
        metrics = train(run, config, force=True, device=device, threads=threads, progress=False, log=lambda _: None)
    return {"model": model, "prior": "", "steps": "", "threads": threads, "epochs": config["train"]["epochs"],
            "val_nmse": metrics["val_nmse"], "codes_used": metrics["codes_used"],
            "codebook_size": metrics["codebook_size"], "perplexity": metrics["perplexity"],
            "train_s": metrics["time_s"], "note": "reused run" if reused else ""}


def _trained_prior(run: Path, prior_kind: str, threads: int, device: str):
    """Fits the prior (``fastvq prior --model prior_kind`` with its defaults) and loads it with the
    run's model: ``(metrics, prior, stage1 model, code shapes)``."""
    metrics = train_prior(run, prior_kind, device=device, threads=threads, progress=False)
    config, stage1_state = load_run(run)
    target = resolve_device(device, 0)
    stage1 = build_stage1(config).to(target)
    stage1.load_state_dict(stage1_state["model"])
    prior_state = run_files.read_checkpoint(run / PRIOR_CHECKPOINT, run_files.PRIOR_FORMAT)
    image_size = tuple(config["image_size"])
    prior = build_prior(prior_kind, prior_state["config"]["prior_args"], stage1, image_size).to(target).eval()
    prior.load_state_dict(prior_state["model"])
    return metrics, prior_state["config"], prior, stage1.code_shape(*image_size)


def _time_interleaved(samplers: dict, repeats: int) -> dict:
    """Median and 20/80 % quantiles (ms) of each sampler, the samplers taking turns after one warm-up
    draw each, so that a change in the machine's load falls on all of them alike."""
    for draw in samplers.values():
        draw()
    seconds = {name: [] for name in samplers}
    for _ in range(repeats):
        for name, draw in samplers.items():
            start = time.perf_counter()
            draw()
            seconds[name].append(time.perf_counter() - start)
    quantiles = torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)
    return {name: torch.tensor(values, dtype=torch.float64).mul(1e3).quantile(quantiles).tolist()
            for name, values in seconds.items()}


def _prior_rows(model: str, run: Path, priors, steps_list, repeats: int, threads: int, device: str) -> list[dict]:
    rows, samplers = [], {}
    for prior_kind in priors:
        metrics, prior_config, prior, shapes = _trained_prior(run, prior_kind, threads, device)
        for steps in (steps_list if prior_kind == "maskgit" else [None]):
            def draw(prior=prior, shapes=shapes, steps=steps):
                options = dict(generator=torch.Generator(device=prior_device(prior)).manual_seed(0), steps=steps)
                with torch.no_grad():
                    if hasattr(prior, "top"):  # VQ-VAE-2: top, then bottom given top
                        return prior.sample(64, *shapes, **options)
                    return prior_sample(prior, 64, shapes, **options)

            samplers[(prior_kind, steps)] = draw
            masked = prior_kind == "maskgit"
            rows.append({"model": model, "prior": prior_kind, "steps": steps or "", "threads": threads,
                         "epochs": prior_config["epochs"],
                         "val_bits_per_code": None if masked else metrics["val_bits_per_code"],
                         "val_masked_bits_per_code": metrics["val_masked_bits_per_code"] if masked else None,
                         "train_s": metrics["time_s"]})
    timings = _time_interleaved(samplers, repeats)
    for row, key in zip(rows, samplers):
        row["sample_64_ms"], row["q20_ms"], row["q80_ms"] = timings[key]
    gpt = next((timings[key][0] for key in samplers if key[0] == "gpt"), None)
    for row, key in zip(rows, samplers):
        row["vs_gpt"] = gpt / timings[key][0] if gpt else None
    return rows


def prior_device(prior: torch.nn.Module) -> torch.device:
    return next(prior.parameters()).device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", choices=MODELS, help="default: all (--small: vqvae)")
    parser.add_argument("--priors", nargs="*", choices=PRIORS, help="default: all (--small: gpt)")
    parser.add_argument("--steps", nargs="+", type=int, default=[4, 8], help="maskgit decoding steps to time (4 8)")
    parser.add_argument("--repeats", type=int, default=7, help="timed draws of 64 maps per sampler, taking turns (7)")
    parser.add_argument("--runs", type=Path, default=None, help="where the run directories go (a temporary folder)")


def points(args: argparse.Namespace) -> list[str]:
    return args.models or (["vqvae"] if args.small else list(MODELS))


# The run directories when --runs is not given; removed at exit.
_SCRATCH = tempfile.TemporaryDirectory()


def measure(model: str, run: _harness.Run) -> list[dict]:
    """The model's row and one per prior (and MaskGIT step count) over its codes, at one thread count."""
    args = run.args
    priors = args.priors if args.priors is not None else (["gpt"] if args.small else list(PRIORS))
    directory = (args.runs or Path(_SCRATCH.name)) / model
    started = time.perf_counter()
    rows = [_stage1_row(model, directory, _digits(), run.threads or 1, run.device)]
    if priors:
        rows += _prior_rows(model, directory, priors, args.steps, args.repeats, run.threads or 1, run.device)
    print(f"{model}: {time.perf_counter() - started:.0f} s", flush=True)
    return [{"bench": BENCH, "impl": row["prior"] or row["model"], **row} for row in rows]


@functools.lru_cache(maxsize=1)
def _digits():
    return load_data({"data": "digits", "data_args": {}})


def main(argv: Optional[list[str]] = None) -> int:
    # One thread by default: the CLI's default on 2 cores.
    return _harness.main("models", points, measure, KEY_COLUMNS, TABLE_COLUMNS, description=__doc__.split("\n\n")[0],
                         add_arguments=add_arguments, default_threads=lambda args: [1], argv=argv)


if __name__ == "__main__":
    sys.exit(main())
