"""The autotuned launch path of the search kernel, exercised where it can be.

On a GPU the launcher always goes through ``triton.autotune`` + ``triton.heuristics``; under the
interpreter it uses one fixed configuration. This test runs the autotuned wrapper itself under the
interpreter, restricted to one configuration (benchmarking many needs a GPU), so the wrapper's
plumbing (grid from the chosen config, pruning by D, the SINGLE_D_TILE heuristic) is checked in CI.
"""

import pytest
import torch

from conftest import HAS_CUDA

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="on a GPU every search test already runs the autotuned path")


@pytest.mark.parametrize("dim", [5, 40])
def test_autotuned_wrapper_matches_reference(monkeypatch, dim):
    import triton

    from fastvq.backends.triton import search
    from fastvq.reference import nearest_code_ref

    small = triton.Config({"BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_D": 32}, num_warps=4, num_stages=1)
    monkeypatch.setattr(search._nearest_code_tuned, "configs", [small])
    monkeypatch.setattr(search, "interpreting", lambda: False)
    monkeypatch.setattr(search, "dot_precision", lambda dtype: "ieee")
    generator = torch.Generator().manual_seed(dim)
    z = torch.randn(37, dim, generator=generator)
    codebook = torch.randn(45, dim, generator=generator)
    indices, distances, codes = search.nearest_code(z, codebook, "l2", True)
    ref_indices, ref_distances, _ = nearest_code_ref(z, codebook)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(distances, ref_distances, rtol=1e-5, atol=1e-5)
    assert torch.equal(codes, codebook[indices])


def test_pruning_keeps_tiles_no_wider_than_needed():
    from fastvq.backends.triton.search import _TUNING_CONFIGS, _prune_configs

    kept = _prune_configs(_TUNING_CONFIGS, {"D": 20})
    assert kept and all(config.kwargs["BLOCK_D"] <= 32 for config in kept)
    assert len(_prune_configs(_TUNING_CONFIGS, {"D": 256})) == len(_TUNING_CONFIGS)
