"""No search path holds an N x K matrix, measured the way the benchmarks measure memory.

At N = K = 65 536, D = 32 the distance matrix alone would be 16 GiB; a search must stay under
256 MiB of peak growth. The growth is measured by the benchmark harness itself
(``benchmarks/_harness.py``: ``peak_memory_growth_mib``): in a freshly spawned interpreter, after
the inputs exist and a warm-up call, the resident-set high-water mark ``VmHWM`` is reset
(``/proc/self/clear_refs``) and read again after the call. ``ru_maxrss`` would not do: Linux
carries the parent's peak into the child, so inside a large pytest process any growth below the
parent's size reads as zero. The last test shows the check failing for a search that does build
the matrix, so a pass means something.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
from _backends import CPP_MISSING_REASON, HAS_CPP

import fastvq
from fastvq import reference

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _harness  # noqa: E402
from bench_search import search_inputs  # noqa: E402

LIMIT_MIB = 256

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                                reason="VmHWM can only be reset through /proc/self/clear_refs (Linux)")


def peak_growth_mib(search, num_rows: int, num_codes: int, dim: int) -> float:
    return _harness.peak_memory_growth_mib(
        search,
        functools.partial(search_inputs, num_rows, num_codes, dim, torch.float32, "cpu"),
        functools.partial(search_inputs, 16, 16, dim, torch.float32, "cpu"),
        "cpu",
    )


def check_bounded(growth_mib: float) -> None:
    assert growth_mib < LIMIT_MIB, f"the search grew peak memory by {growth_mib:.0f} MiB (limit {LIMIT_MIB} MiB)"


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_search_memory_stays_bounded(backend, monkeypatch):
    if backend == "cpp" and not HAS_CPP:
        pytest.skip(f"fastvq._C is not available: {CPP_MISSING_REASON}")
    monkeypatch.setenv("FASTVQ_BACKEND", backend)  # the spawned interpreter inherits it
    growth = peak_growth_mib(fastvq.nearest_code, 65_536, 65_536, 32)
    print(f"{backend}: N=K=65536 D=32 grew peak memory by {growth:.1f} MiB")
    check_bounded(growth)


def test_the_check_fails_for_a_search_that_builds_the_matrix():
    """The reference search builds the 8 192 x 16 384 fp32 distance matrix (512 MiB): the same
    measurement must see it and the same check must reject it."""
    growth = peak_growth_mib(functools.partial(reference.nearest_code_ref, metric="l2", upcast=False),
                             8_192, 16_384, 32)
    print(f"reference (N x K matrix): grew peak memory by {growth:.1f} MiB")
    assert growth >= 512
    with pytest.raises(AssertionError, match="grew peak memory"):
        check_bounded(growth)
