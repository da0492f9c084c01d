"""Residual quantization: ``fastvq.residual_quantize`` (every level in one call) against the per-level loops of the
codec libraries and against the bare searches alone.

    python benchmarks/bench_residual_quantize.py [--small] [--device cpu|cuda] [--threads N ...] [--out DIR]

One training step of a codec's residual quantizer on ``N`` frames (``[B, D, T]`` with ``B T = N``), fp32,
standard-normal frames and codebooks, at the shapes the issue names:

- ``encodec``: 32 levels x 1 024 codes, D = 128 (EnCodec 24 kHz / audiocraft), against audiocraft's
  ``ResidualVectorQuantization`` (its ``core_vq``; EMA decay 0.99, no k-means init, its default dead-code
  expiry at 2);
- ``mimi``: 32 x 2 048, D = 256, against Moshi's ``ResidualVectorQuantization`` (EMA, its defaults);
- ``dac``: 9 x 1 024, ``codebook_dim`` 8, against DAC's ``ResidualVectorQuantize(512, 9, 1024, 8)``, whose step also
  runs its weight-normed 512 <-> 8 projections and l2-normalised search per level, which the op does not (the op
  runs on already projected 8-dim residuals): the row says how far the quantization itself is from the layer.

Implementations, timed against each other call for call (``_harness.time_interleaved``):

- ``fastvq``: ``fastvq.residual_quantize`` forward (with the EMA statistics for the EMA shapes), the EMA update of
  every level at once, and the backward of ``(quantized * g).sum() + commitment.sum()`` (DAC: ``per_level``
  straight-through, loss-trained codebooks, ``commitment + codebook_loss``);
- ``fastvq-forward``: the forward alone;
- ``bare-searches``: ``L`` calls of ``fastvq.nearest_code`` (codes returned) and the residual updates between
  them: the searches alone, what the goal holds the fused training step against (``vs_bare``);
- ``audiocraft`` / ``moshi`` / ``dac``: the library's own module in training mode, forward and backward, loaded
  from its installed file by ``tests/_originals.py`` (a row with a note where it is not installed).

``peak_mib`` (measured once, in a fresh process, ``_harness.once_with_peak_memory``) is the memory the training
step needs on top of its inputs; ``vs_library`` is the library's time over this row's. Results go to
``<out>/residual_quantize/<machine>.csv`` and ``.md``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import _harness  # noqa: E402

import fastvq  # noqa: E402

BENCH = "residual_quantize_step"
KEY_COLUMNS = ("shape", "N", "L", "K", "D", "threads")
TABLE_COLUMNS = ("impl", "shape", "N", "L", "K", "D", "threads", "median_ms", "q20_ms", "q80_ms", "vs_bare",
                 "vs_library", "peak_mib", "load1", "note")
FRAMES = 4_800
# name: (levels, codes, dim, the library whose step it is held against); the batch is B items of T frames, B T = N.
SHAPES = {
    "encodec": (32, 1_024, 128, "audiocraft"),
    "mimi": (32, 2_048, 256, "moshi"),
    "dac": (9, 1_024, 8, "dac"),
}
SMALL_SHAPES = {"encodec": (4, 64, 16, "audiocraft"), "dac": (3, 64, 8, "dac")}
BATCH = 4
DECAY = 0.99
EPS = 1e-5
DAC_INPUT_DIM = 512


def _inputs(num_rows: int, levels: int, codes: int, dim: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(num_rows, dim, generator=generator)
    codebooks = torch.randn(levels, codes, dim, generator=generator)
    upstream = torch.randn(num_rows, dim, generator=generator)
    return z, codebooks, upstream


def fastvq_state(num_rows: int, levels: int, codes: int, dim: int, library: str):
    """``(z, codebooks, upstream, cluster_size, embed_avg)``: EMA state for the EMA codecs, a Parameter for DAC."""
    z, codebooks, upstream = _inputs(num_rows, levels, codes, dim)
    z.requires_grad_(True)
    if library == "dac":
        return z, torch.nn.Parameter(codebooks), upstream, None, None
    cluster_size = torch.ones(levels, codes)
    return z, codebooks, upstream, cluster_size, codebooks.clone()


def fastvq_step(z, codebooks, upstream, cluster_size, embed_avg) -> None:
    """One training step: the fused forward, every level's EMA update at once, the backward."""
    ema = cluster_size is not None
    result = fastvq.residual_quantize(z, codebooks, straight_through="final" if ema else "per_level",
                                      return_stats=ema)
    loss = (result.quantized * upstream).sum() + result.commitment.sum()
    if ema:
        with torch.no_grad():
            cluster_size.lerp_(result.counts, 1.0 - DECAY)
            embed_avg.lerp_(result.sums, 1.0 - DECAY)
            total = cluster_size.sum(dim=1, keepdim=True)
            smoothed = (cluster_size + EPS) / (total + cluster_size.shape[1] * EPS) * total
            codebooks.copy_(embed_avg / smoothed[..., None])
    else:
        loss = loss + result.codebook_loss.sum()
    loss.backward()
    z.grad = None
    if not ema:
        codebooks.grad = None


def fastvq_forward(z, codebooks, upstream, cluster_size, embed_avg) -> None:
    with torch.no_grad():
        fastvq.residual_quantize(z, codebooks, return_stats=cluster_size is not None)


def bare_searches(z, codebooks, *_unused) -> None:
    with torch.no_grad():
        residual = z
        for level in range(codebooks.shape[0]):
            _, _, codes = fastvq.nearest_code(residual, codebooks[level], return_codes=True)
            residual = residual - codes


@functools.lru_cache(maxsize=None)
def _load_library(library: str) -> types.ModuleType:
    """The library's module, loaded once per process (``load_original`` refuses a second load of a package it
    has already stubbed)."""
    from _originals import load_original

    if library == "audiocraft":
        distrib = types.SimpleNamespace(broadcast_tensors=lambda tensors: None)
        return load_original("audiocraft.quantization.core_vq", stubs={"flashy": {"distrib": distrib}})
    if library == "moshi":
        return load_original("moshi.quantization.core_vq")
    from torch.nn.utils import weight_norm

    def wn_conv1d(*args, **kwargs):
        return weight_norm(torch.nn.Conv1d(*args, **kwargs))

    return load_original("dac.nn.quantize", stubs={"dac.nn.layers": {"WNConv1d": wn_conv1d}})


def library_state(num_rows: int, levels: int, codes: int, dim: int, library: str):
    """``(module in training mode, x [B, C, T], upstream)`` for the library's own residual quantizer."""
    torch.manual_seed(0)
    module = _load_library(library)
    if library == "audiocraft":
        quantizer = module.ResidualVectorQuantization(num_quantizers=levels, dim=dim, codebook_size=codes,
                                                      decay=DECAY, kmeans_init=False)
    elif library == "moshi":
        quantizer = module.ResidualVectorQuantization(num_quantizers=levels, codebook_offset=0, dim=dim,
                                                      codebook_size=codes, decay=DECAY)
    else:
        quantizer = module.ResidualVectorQuantize(DAC_INPUT_DIM, levels, codes, dim)
        dim = DAC_INPUT_DIM
    quantizer.train()
    x = torch.randn(BATCH, dim, num_rows // BATCH, requires_grad=True)
    return quantizer, x, torch.randn(x.shape)


def library_step(quantizer, x, upstream) -> None:
    out = quantizer(x)
    if isinstance(out, tuple) and len(out) == 5:  # DAC: (z_q, codes, latents, commitment, codebook)
        loss = (out[0] * upstream).sum() + out[3] + out[4]
    else:
        quantized, loss_terms = (out[0], out[2]) if isinstance(out, tuple) else (out.x, out.penalty)
        loss = (quantized * upstream).sum() + loss_terms.sum()
    loss.backward()
    x.grad = None
    quantizer.zero_grad(set_to_none=True)


def points(args: argparse.Namespace) -> list[tuple[str, int, int, int, str]]:
    shapes = SMALL_SHAPES if args.small else SHAPES
    frames = 256 if args.small else FRAMES
    return [(name, frames, *shape) for name, shape in shapes.items()]


def measure(point, run: _harness.Run) -> list[dict]:
    name, num_rows, levels, codes, dim, library = point
    base = {"bench": BENCH, "shape": name, "N": num_rows, "L": levels, "K": codes, "D": dim, "threads": run.threads,
            "note": ""}
    rows = {impl: {**base, "impl": impl} for impl in ("fastvq", "fastvq-forward", "bare-searches", library)}
    state = fastvq_state(num_rows, levels, codes, dim, library)
    calls = {
        "fastvq": functools.partial(fastvq_step, *state),
        "fastvq-forward": functools.partial(fastvq_forward, *state),
        "bare-searches": functools.partial(bare_searches, *state),
    }
    try:
        lib_state = library_state(num_rows, levels, codes, dim, library)
        calls[library] = functools.partial(library_step, *lib_state)
    except BaseException as error:  # pytest.skip (not installed) is a BaseException
        if isinstance(error, KeyboardInterrupt):
            raise
        rows[library]["note"] = f"skipped: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    timings = _harness.time_interleaved(calls, run.device, cpu_budget_s=2.0, min_repeats=3, max_repeats=20)
    for impl, timing in timings.items():
        rows[impl].update(median_ms=timing.median_ms, q20_ms=timing.q20_ms, q80_ms=timing.q80_ms,
                          load1=os.getloadavg()[0])
    bare = timings["bare-searches"].median_ms
    library_ms = timings[library].median_ms if library in timings else None
    for impl, timing in timings.items():
        rows[impl]["vs_bare"] = timing.median_ms / bare
        if library_ms is not None:
            rows[impl]["vs_library"] = library_ms / timing.median_ms
    if run.first_threads:
        peaks = {"fastvq": (fastvq_step, fastvq_state)}
        if library in timings:
            peaks[library] = (library_step, library_state)
        for impl, (step, make_state) in peaks.items():
            make = functools.partial(make_state, num_rows, levels, codes, dim, library)
            warm = functools.partial(make_state, 2 * BATCH, levels, codes, dim, library)
            _, peak = _harness.once_with_peak_memory(step, make, warm, run.device)
            rows[impl]["peak_mib"] = peak
    return list(rows.values())


def main(argv=None) -> int:
    return _harness.main("residual_quantize", points, measure, KEY_COLUMNS, TABLE_COLUMNS,
                         description=__doc__.splitlines()[0], argv=argv)


if __name__ == "__main__":
    sys.exit(main())
