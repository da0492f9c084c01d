"""Soak test (issue 23): long training runs of ``VectorQuantize`` and ``ResidualVQ`` with k-means
initialisation and dead-code expiry keep their memory flat and never produce a NaN.

Not in the default suite (pytest.ini deselects the ``soak`` marker). Run it with
``python -m pytest -q -m soak``; ``FASTVQ_SOAK_STEPS`` sets the number of training steps
(10 000 by default; CI runs a short budget, e.g. ``FASTVQ_SOAK_STEPS=1000``).
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

from fastvq.nn import ResidualVQ, VectorQuantize
from fastvq.nn.vector_quantize import Codebook

pytestmark = pytest.mark.soak

STEPS = int(os.environ.get("FASTVQ_SOAK_STEPS", "10000"))
# Memory is measured from here on: the allocator's pools, the autograd graph's buffers and the
# optimiser state have reached their size by then.
WARM_UP = max(50, STEPS // 10)
MAX_RSS_GROWTH = 1 << 20  # bytes
BATCH, TOKENS, DIM, CODES = 8, 64, 16, 128
# Dead codes appear and are replaced all along: the data's centre drifts a little every step, so
# codes the batches have left behind fall under the threshold (4 uses per code on average).
DEAD_CODE_THRESHOLD = 2.0


def resident_bytes() -> int:
    """The process's resident set size now (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: steps this small only lose time to thread hand-offs (20 times slower on a
    busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def layers():
    common = dict(dim=DIM, codebook_size=CODES, kmeans_init=True, threshold_ema_dead_code=DEAD_CODE_THRESHOLD)
    return {"VectorQuantize": lambda: VectorQuantize(**common),
            "ResidualVQ": lambda: ResidualVQ(num_quantizers=3, **common)}


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set size from Linux /proc")
@pytest.mark.parametrize("name", list(layers()))
def test_training_keeps_memory_flat_and_finite(name, monkeypatch):
    replacements = []
    for method in ("_replace_head", "_replace_without_sync"):  # the two ways dead codes are replaced
        original = getattr(Codebook, method)
        monkeypatch.setattr(Codebook, method, lambda self, *args, _original=original: (
            replacements.append(1), _original(self, *args))[1])
    torch.manual_seed(0)
    layer = layers()[name]()
    encoder = torch.nn.Linear(DIM, DIM)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    centre = torch.zeros(DIM)
    baseline = None
    for step in range(STEPS):
        centre += 0.01 * torch.randn(DIM, generator=generator)
        x = encoder(torch.randn(BATCH, TOKENS, DIM, generator=generator) + centre)
        quantized, indices, loss = layer(x)
        loss = loss.sum() + (quantized - x.detach()).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if not (torch.isfinite(loss) and torch.isfinite(quantized).all()):
            pytest.fail(f"{name}: step {step} gave a loss of {float(loss)} or a non-finite output")
        if step == WARM_UP:
            gc.collect()
            baseline = resident_bytes()
    assert len(replacements) >= STEPS // 10, f"{name}: dead codes were replaced only {len(replacements)} times"
    buffers = [buffer for buffer in layer.buffers() if buffer.is_floating_point()]
    assert all(torch.isfinite(buffer).all() for buffer in buffers), f"{name}: a codebook buffer is not finite"
    gc.collect()
    growth = resident_bytes() - baseline
    assert growth <= MAX_RSS_GROWTH, (f"{name}: the resident set grew by {growth / 2**20:.2f} MiB between step "
                                      f"{WARM_UP} and step {STEPS}")
