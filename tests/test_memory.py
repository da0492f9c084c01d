"""The memory-bounded CPU path never holds an N x K matrix.

At N = K = 65 536, D = 32 the distance matrix alone would be 16 GiB; the search must stay under
256 MiB of peak growth. Peak resident memory is process-wide, so the search runs in a fresh
interpreter whose baseline is taken after its inputs exist.
"""

import json
import subprocess
import sys
import textwrap

import pytest

_PROBE = textwrap.dedent(
    """
    import json, os, resource, sys, time
    os.environ["FASTVQ_BACKEND"] = "torch"
    import torch, fastvq
    num_rows, num_codes, dim = (int(v) for v in sys.argv[1:4])
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(num_rows, dim, generator=generator)
    codebook = torch.randn(num_codes, dim, generator=generator)
    fastvq.nearest_code(z[:8], codebook[:8])  # loads kernels and allocator pools outside the window
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    indices, distances = fastvq.nearest_code(z, codebook)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Spot-check correctness on a few rows against the exact answer.
    rows = torch.arange(0, num_rows, max(1, num_rows // 64))
    exact = torch.cdist(z[rows].double(), codebook.double()).square().min(dim=1).values
    chosen = (z[rows].double() - codebook[indices[rows]].double()).square().sum(dim=1)
    print(json.dumps({"growth_mib": (after - before) / 1024, "seconds": seconds,
                      "max_excess": float((chosen - exact).abs().max())}))
    """
)


@pytest.mark.parametrize("num_rows, num_codes, dim", [(65536, 65536, 32)])
def test_cpu_search_memory_stays_bounded(num_rows, num_codes, dim):
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(num_rows), str(num_codes), str(dim)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"N=K={num_rows} D={dim}: peak growth {figures['growth_mib']:.1f} MiB in {figures['seconds']:.1f} s")
    assert figures["growth_mib"] < 256, figures
    assert figures["max_excess"] < 1e-3, figures
