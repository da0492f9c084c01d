"""The image-tokenizer drop-ins' training steps: IBQ and Open-MAGVIT2 at their published sizes, fastvq
against SEED-Voken's own quantizers.

    python benchmarks/bench_tokenizers.py [--small] [--device cpu|cuda] [--ibq-rows N] [--lfq-images B] [--out DIR]

One training step of the quantizer (forward, the losses the trainer adds, backward) at SEED-Voken's
published configurations: IBQ's ``IndexPropagationQuantize`` with ``K = 262 144`` codes of ``D = 256``
and its entropy loss (``configs/IBQ/gpu/imagenet_ibqgan_262144.yaml``: temperature 0.01, entropy loss
weight 0.05), and Open-MAGVIT2's ``LFQ`` over ``2^18`` codes, ``D = 18``
(``configs/Open-MAGVIT2/gpu/pretrain_lfqgan_256_262144.yaml``; codebook weight 0.1, commitment 0.25).
Latents are 16 x 16 per image (256 x 256 images, 16x downsampling); the upstream gradient stands for the
decoder's. ``impl`` is ``original`` (SEED-Voken's files, vendored unmodified in ``tests/originals/seed_voken``)
or ``fastvq`` (``fastvq.nn.seed_voken``).

Each point is one call, timed and measured in a fresh process (``_harness.once_with_peak_memory``):
``peak_mib`` is the memory the step needs on top of its inputs (the layer, its codebook, the latents),
so it includes the codebook's gradient (``K x D``, 256 MiB for IBQ, dense in both: IBQ's gradient
reaches every code through the softmax). The original runs at the given size; fastvq at that size and at
4x it (``scale`` 1 and 4); ``vs_original`` is fastvq's peak over the original's at scale 1 and
``goal_met`` whether it is at most 1/10. ``--ibq-rows`` sets IBQ's rows (latent positions; 256 = one
image) and ``--lfq-images`` Open-MAGVIT2's images: IBQ's step costs about 15 passes of ``N x K x D`` on
either side, so on a loaded CPU the default IBQ size is a fraction of an image.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from typing import Optional

import _harness
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _vendored import load_vendored  # noqa: E402

from fastvq.nn import seed_voken  # noqa: E402

BENCH = "tokenizers"
KEY_COLUMNS = ("model", "rows", "K", "D")
TABLE_COLUMNS = ("model", "impl", "scale", "rows", "K", "D", "ms", "peak_mib", "vs_original", "goal_met", "load1",
                 "note")
LATENT_SIDE = 16
IBQ_CODES, IBQ_DIM = 262_144, 256
LFQ_BITS = 18
# The published loss weights (see the module docstring).
IBQ_ENTROPY_WEIGHT = 0.05
LFQ_CODEBOOK_WEIGHT, LFQ_COMMIT_WEIGHT = 0.1, 0.25
GOAL_RATIO = 0.1
SCALES = (1, 4)


def _layer(model: str, impl: str, num_codes: int, dim: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if model == "IBQ":
        module = seed_voken if impl == "fastvq" else load_vendored("seed_voken/ibq_quantize.py")
        return module.IndexPropagationQuantize(num_codes, dim, beta=0.25, use_entropy_loss=True,
                                               entropy_temperature=0.01)
    module = seed_voken if impl == "fastvq" else load_vendored("seed_voken/lookup_free_quantize.py")
    return module.LFQ(dim=dim, codebook_size=num_codes).train()


def latent_shape(rows: int, dim: int) -> tuple[int, int, int, int]:
    """``rows`` latent positions as images of 16 x 16 (fewer than one image: one map 16 wide)."""
    per_image = LATENT_SIDE**2
    if rows >= per_image and rows % per_image == 0:
        return (rows // per_image, dim, LATENT_SIDE, LATENT_SIDE)
    if rows < per_image and (rows <= LATENT_SIDE or rows % LATENT_SIDE == 0):
        width = min(rows, LATENT_SIDE)
        return (1, dim, rows // width, width)
    raise ValueError(f"rows must be whole images of {per_image} or a multiple of {LATENT_SIDE} below that, got {rows}")


def step_inputs(model: str, impl: str, rows: int, num_codes: int, dim: int) -> tuple:
    """``(layer, z [B, D, h, w] requiring grad, upstream)``."""
    layer = _layer(model, impl, num_codes, dim)
    generator = torch.Generator().manual_seed(1)
    shape = latent_shape(rows, dim)
    # LFQ's entropy is interesting where its bit logits 4 x / 0.01 are a few units, not saturated.
    scale = 1.0 if model == "IBQ" else 0.005
    z = (torch.randn(shape, generator=generator) * scale).requires_grad_(True)
    upstream = torch.randn(shape, generator=generator)
    return layer, z, upstream


def training_step(model: str, layer: torch.nn.Module, z: torch.Tensor, upstream: torch.Tensor) -> float:
    if model == "IBQ":
        z_q, (quant_loss, _, _, entropy_loss), _ = layer(z)
        loss = (z_q * upstream).sum() + quant_loss + IBQ_ENTROPY_WEIGHT * entropy_loss
    else:
        (quantized, entropy_aux_loss, _), breakdown = layer(z, return_loss_breakdown=True)
        loss = (quantized * upstream).sum() + LFQ_CODEBOOK_WEIGHT * entropy_aux_loss
        loss = loss + LFQ_COMMIT_WEIGHT * breakdown.commitment
    loss.backward()
    return float(loss.detach())


def points(args: argparse.Namespace) -> list[tuple[str, str, int, int, int, int]]:
    """``(model, impl, scale, rows, K, D)``: each model's original at scale 1, then fastvq at 1 and 4."""
    if args.small:
        sizes = {"IBQ": (16, 512, 8), "Open-MAGVIT2": (256, 2**10, 10)}
    else:
        sizes = {"IBQ": (args.ibq_rows, IBQ_CODES, IBQ_DIM),
                 "Open-MAGVIT2": (args.lfq_images * LATENT_SIDE**2, 2**LFQ_BITS, LFQ_BITS)}
    grid = []
    for model, (rows, num_codes, dim) in sizes.items():
        grid.append((model, "original", 1, rows, num_codes, dim))
        grid += [(model, "fastvq", scale, rows * scale, num_codes, dim) for scale in SCALES]
    return grid


_original_peaks: dict[str, float] = {}


def measure(point: tuple[str, str, int, int, int, int], run: _harness.Run) -> list[dict]:
    model, impl, scale, rows, num_codes, dim = point
    row = {"bench": BENCH, "impl": impl, "model": model, "scale": scale, "rows": rows, "K": num_codes, "D": dim,
           "dtype": "fp32", "threads": run.threads, "load1": os.getloadavg()[0], "note": ""}
    step = functools.partial(training_step, model)
    make_inputs = functools.partial(step_inputs, model, impl, rows, num_codes, dim)
    make_warmup = functools.partial(step_inputs, model, impl, LATENT_SIDE, 64 if model == "IBQ" else 2**6,
                                    8 if model == "IBQ" else 6)
    try:
        milliseconds, peak_mib = _harness.once_with_peak_memory(step, make_inputs, make_warmup, run.device)
    except Exception as error:  # keep measuring the other points, and say what failed
        row["note"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return [row]
    row.update(ms=milliseconds, peak_mib=peak_mib)
    if impl == "original":
        _original_peaks[model] = peak_mib
    elif model in _original_peaks:
        row["vs_original"] = peak_mib / _original_peaks[model]
        row["goal_met"] = "yes" if row["vs_original"] <= GOAL_RATIO else "no"
        row["note"] = f"against the original at {rows // scale} rows"
    return [row]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ibq-rows", type=int, default=64,
                        help="IBQ's latent rows at scale 1 (256 = one 16 x 16 image; default %(default)s)")
    parser.add_argument("--lfq-images", type=int, default=1,
                        help="Open-MAGVIT2's images of 16 x 16 latents at scale 1 (default %(default)s)")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        latent_shape(args.ibq_rows, IBQ_DIM)
    except ValueError as error:
        parser.error(f"--ibq-rows: {error}")
    if args.lfq_images < 1:
        parser.error(f"--lfq-images must be positive, got {args.lfq_images}")


def main(argv: Optional[list[str]] = None) -> int:
    return _harness.main(BENCH, points, measure, KEY_COLUMNS, TABLE_COLUMNS, description=__doc__.split("\n\n")[0],
                         add_arguments=add_arguments, check_arguments=check_arguments, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
