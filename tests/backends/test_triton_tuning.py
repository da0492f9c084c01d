"""The autotuned launch path of the search kernel, exercised where it can be.

On a GPU the launcher always goes through ``triton.autotune`` + ``triton.heuristics``; under the
interpreter it uses one fixed configuration. This test runs the autotuned wrapper itself under the
interpreter, restricted to one configuration (benchmarking many needs a GPU), so the wrapper's
plumbing (grid from the chosen config, pruning by D, the SINGLE_D_TILE heuristic) is checked in CI.
It also checks the split-codebook path (forced, with tiny shapes) and the autotuner's size buckets.
"""

import pytest
import torch
from _backends import HAS_CUDA

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
    monkeypatch.setattr(search, "device_properties", lambda: {"multiprocessor_count": 1})
    generator = torch.Generator().manual_seed(dim)
    z = torch.randn(37, dim, generator=generator)
    codebook = torch.randn(45, dim, generator=generator)
    indices, distances, codes = search.nearest_code(z, codebook, "l2", True)
    ref_indices, ref_distances, _ = nearest_code_ref(z, codebook)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(distances, ref_distances, rtol=1e-5, atol=1e-5)
    assert torch.equal(codes, codebook[indices])


def _prune(module, arch, dim, dtype, **meta):
    """What the family's prune keeps of its autotuner's configs for prepared codes of ``dtype`` and width
    ``dim`` on a GPU of compute capability ``arch``."""
    tuner = getattr(module, "_nearest_codes_tuned", None) or module._nearest_code_tuned
    codes = torch.zeros(3, dim, dtype=dtype)
    return tuner.early_config_prune.family_prune(tuner.configs, {"D": dim, "search_codes_ptr": codes}, **meta)


def _within(configs, pool) -> bool:
    return all(any(config is listed for listed in pool) for config in configs)


@pytest.mark.parametrize("arch", [80, 86, 90])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pruning_keeps_the_gpus_and_dtypes_configs_no_wider_than_needed(monkeypatch, dtype, arch):
    from fastvq.backends.triton import common, search

    monkeypatch.setattr(common, "device_arch", lambda: arch)
    own = search._TILES.pool(dtype, arch, 20)
    dtype_class = "fp32" if dtype == torch.float32 else "half"
    assert own is search._TILES.lists[dtype_class, arch == 90, False]
    assert (own is search._TILES.lists[dtype_class, False, False]) == (arch != 90 or dtype != torch.float32)
    kept = _prune(search, arch, 20, dtype)
    assert kept and all(config.kwargs["BLOCK_D"] <= 32 for config in kept) and _within(kept, own)
    assert len(_prune(search, arch, 256, dtype)) == len(own)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_d_of_several_slices_that_is_no_multiple_of_16_gets_the_16_wide_slices(monkeypatch, dtype, arch):
    """D = 100 (no multiple of 16, more than one 32-wide slice): only the tiles that spill nothing there
    (test_aot_compile.py); D = 18 (one slice) and D = 96 keep the usual lists."""
    from fastvq.backends.triton import common, search

    monkeypatch.setattr(common, "device_arch", lambda: arch)
    unaligned = search._TILES.lists["fp32" if dtype == torch.float32 else "half", arch == 90, True]
    kept = _prune(search, arch, 100, dtype)
    assert kept and all(config.kwargs["BLOCK_D"] == 16 for config in kept) and _within(kept, unaligned)
    for dim in (18, 96):
        assert not any(config is c for config in _prune(search, arch, dim, dtype) for c in unaligned)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k_pad", [2, 64])
def test_topk_pruning_keeps_the_gpus_and_dtypes_tiles_and_bounds_the_pairs(monkeypatch, dtype, arch, k_pad):
    """The top-k tiles for the GPU and dtype, none holding more than _MAX_PAIRS_PER_THREAD kept pairs
    a thread; when none qualifies the list's last (smallest) tile."""
    from fastvq.backends.triton import common, topk

    monkeypatch.setattr(common, "device_arch", lambda: arch)
    own = topk._TILES.pool(dtype, arch, 256)
    kept = _prune(topk, arch, 256, dtype, TOPK_PAD=k_pad)
    assert kept and _within(kept, own)
    assert all(c.kwargs["BLOCK_N"] * k_pad <= topk._MAX_PAIRS_PER_THREAD * 32 * c.num_warps for c in kept)
    assert _prune(topk, arch, 256, dtype, TOPK_PAD=1 << 20) == own[-1:]
    # D = 100: no multiple of 16, more than one 32-wide slice: only 16-wide slices (test_aot_compile.py).
    unaligned = _prune(topk, arch, 100, dtype, TOPK_PAD=k_pad)
    assert unaligned and _within(unaligned, topk._TILES.pool(dtype, arch, 100))
    assert all(c.kwargs["BLOCK_D"] == 16 for c in unaligned) and not _within(unaligned[:1], own)


def test_search_tiles_give_each_list_once_and_fall_back_to_the_sm80_list():
    """One ``SearchTiles`` builds both families' autotuner lists: each distinct list once, in a fixed order
    (fp32 before 16-bit, aligned D before unaligned, sm_80 before sm_90), and a GPU without a list of its own
    takes the sm_80 one."""
    from fastvq.backends.triton.common import SearchTiles

    def row(n):
        return [(n, 32, 32, 4, 3)]

    tiles = SearchTiles(fp32=row(1), half=row(2), fp32_unaligned_d=row(3), half_unaligned_d=row(4),
                        fp32_hopper=row(5))
    assert [config.kwargs["BLOCK_N"] for config in tiles.configs] == [1, 5, 2, 3, 4]
    assert tiles.pool(torch.float32, 90, 64)[0].kwargs["BLOCK_N"] == 5
    assert tiles.pool(torch.float16, 90, 64) is tiles.pool(torch.bfloat16, 86, 64) is tiles.lists["half", False, False]
    assert tiles.pool(torch.float32, 90, 100) is tiles.pool(torch.float32, 80, 100)
    # One 32-wide slice, or a multiple of 16, keeps the aligned lists.
    assert tiles.pool(torch.float32, 80, 18) is tiles.pool(torch.float32, 80, 96) is tiles.lists["fp32", False, False]


def test_autotuning_is_keyed_on_size_buckets_of_n_and_k():
    """The sampler's first tiny crop must not fix the tiles of every later, larger search."""
    from fastvq.backends.triton.common import size_bucket
    from fastvq.backends.triton.search import _nearest_code_tuned
    from fastvq.backends.triton.topk import _nearest_codes_tuned

    assert {"D", "n_bucket", "k_bucket", "SPLIT"} <= set(_nearest_code_tuned.keys)
    assert {"D", "n_bucket", "TOPK_PAD", "SAMPLE"} <= set(_nearest_codes_tuned.keys)
    assert [size_bucket(n) for n in (0, 1, 2, 3, 64, 65, 1000)] == [1, 1, 2, 4, 64, 128, 1024]


def test_split_only_when_rows_leave_sms_idle_and_the_codebook_is_large():
    from fastvq.backends.triton.search import _SPLIT_MIN_CODES_PER_SLICE, _code_splits

    big = 64 * _SPLIT_MIN_CODES_PER_SLICE
    assert _code_splits(64 * 132, big, 132) == 1  # a block of rows per SM already
    assert _code_splits(64, _SPLIT_MIN_CODES_PER_SLICE - 1, 132) == 1  # too few codes to split
    assert _code_splits(64, big, 132) == 64  # one row block: one slice per SM, at least 1024 codes each
    assert _code_splits(64 * 33, big, 132) == 4


@pytest.mark.parametrize("metric, splits", [("l2", 2), ("l2", 7), ("cosine", 3), ("dot", 3)])
def test_split_codebook_matches_the_unsplit_search(monkeypatch, metric, splits):
    """Forced splits under the interpreter, with codes repeated across slice boundaries: the merge
    keeps the lowest index on ties, and a row of NaN distances still returns index 0."""
    from fastvq.backends.triton import search

    monkeypatch.setattr(search, "_SPLIT_ALIGN", 16)
    generator = torch.Generator().manual_seed(splits)
    codebook = torch.randn(100, 24, generator=generator)
    codebook[60:90] = codebook[0:30]  # every code of 60..89 ties with one of 0..29 in another slice
    z = torch.cat([codebook[:30] + 0.01 * torch.randn(30, 24, generator=generator),
                   torch.randn(6, 24, generator=generator)])
    z[5] = float("nan")
    expected = search.nearest_code(z, codebook, metric, True)
    monkeypatch.setattr(search, "_code_splits", lambda rows, codes, sms: splits)
    actual = search.nearest_code(z, codebook, metric, True)
    assert torch.equal(actual[0], expected[0])
    assert actual[0][5] == 0 and torch.isnan(actual[1][5])
    torch.testing.assert_close(actual[1], expected[1], equal_nan=True)
    assert torch.equal(actual[2], expected[2])
    assert (actual[0][:30] < 60).all(), "a tie across slices went to the higher index"


def test_soft_quantize_refuses_widths_past_its_int32_tile_offsets():
    """soft_quantize's kernels index inside a tile in int32 (INT32_TILE_OFFSETS): a width of 2**24
    or more is refused by name before anything is prepared (a meta tensor: no memory is touched)."""
    from fastvq.backends.triton import soft_quantize

    wide = torch.empty(2, soft_quantize.MAX_TILE_WIDTH, device="meta")
    with pytest.raises(ValueError, match=r"z's last dimension must be below 2\*\*24, got z of shape \(2, 16777216\)"):
        soft_quantize._Launch(wide, wide, None, "dot", 1.0)
    narrow = torch.empty(2, 8, device="meta")
    with pytest.raises(ValueError, match=r"values's last dimension"):
        soft_quantize._Launch(narrow, narrow, wide, "dot", 1.0)


@pytest.mark.parametrize("pinned", [True, False])
def test_masked_conv_gemm_tiles_for_the_pinned_and_another_triton(monkeypatch, pinned):
    """With the pinned Triton the forward and input-gradient tiles are the chosen list (less those that spill on
    odd strides in the input gradient); with another, whose code generation spills in all of them on odd maps
    (test_aot_compile.py), the forward takes the one tile that spills nothing on any map, and so does the input
    gradient on odd strides."""
    from fastvq.backends.triton import masked_conv

    monkeypatch.setattr(masked_conv, "_TILES_CHOSEN_WITH_THIS_TRITON", pinned)
    monkeypatch.setattr(masked_conv, "device_arch", lambda: 80)
    configs = masked_conv._implicit_gemm_tuned.configs
    any_map = masked_conv._GEMM_ANY_MAP_OTHER_TRITON
    aligned = {"OUT_C": 128, "SRC_C": 128, **{name: 256 for name in masked_conv._GEMM_STRIDES}}
    odd = {**aligned, "stride_src_h": 15, "stride_out_h": 15}
    meta = {"DOT_PRECISION": "tf32"}
    forward = masked_conv._prune_gemm_configs(configs, aligned, **meta)
    input_grad_aligned = masked_conv._prune_input_grad_configs(configs, aligned, **meta)
    input_grad_odd = masked_conv._prune_input_grad_configs(configs, odd, **meta)
    assert all(any(c is p for p in masked_conv._GEMM_CONFIGS) for c in input_grad_aligned)
    if pinned:
        assert all(any(c is p for p in masked_conv._GEMM_CONFIGS) for c in forward + input_grad_odd)
        assert len(forward) == len(masked_conv._GEMM_CONFIGS) and len(input_grad_odd) < len(forward)
    else:
        assert forward == any_map and input_grad_odd == any_map
