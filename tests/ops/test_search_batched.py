"""``nearest_code_batched`` (B independent searches in one call) on every backend that runs it: each problem's
answer against the float64 truth and against ``nearest_code`` on that problem alone, odd shapes, every metric and
dtype, strided inputs, duplicate codes, NaN rows, and its argument checks and opcheck."""

from __future__ import annotations

import pytest
import torch
from _backends import HAS_CUDA, backends_for
from _parity import METRICS, assert_search_parity

import fastvq
from fastvq import reference

backend = backends_for("nearest_code_batched")

# (B, N, K, D) and dtype: one problem, odd sizes, a K that is no multiple of any tile, each 16-bit dtype
# once, an empty batch and empty rows.
CASES = [
    ((1, 33, 5, 3), torch.float32),
    ((3, 40, 129, 17), torch.float32),
    ((4, 19, 50, 70), torch.bfloat16),
    ((2, 21, 20, 16), torch.float16),
    ((0, 5, 3, 4), torch.float32),
    ((2, 0, 3, 4), torch.float32),
]


def _inputs(shape, dtype, device, seed=0):
    problems, rows, codes, dim = shape
    generator = torch.Generator().manual_seed(seed)
    # Problems far apart: a search that read another problem's codebook would pick a far code.
    offsets = 10.0 * torch.arange(problems, dtype=torch.float32)[:, None, None]
    z = torch.randn(problems, rows, dim, generator=generator) + offsets
    codebook = torch.randn(problems, codes, dim, generator=generator) + offsets
    return z.to(device=device, dtype=dtype), codebook.to(device=device, dtype=dtype)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(("shape", "dtype"), CASES, ids=["B{}-N{}-K{}-D{}-{}".format(*s, str(d)[6:]) for s, d in CASES])
def test_each_problem_matches_its_own_search(backend, device, shape, dtype, metric):
    interpreted = backend == ("triton", "cpu")
    if interpreted and shape[2] == 129:
        pytest.skip("Triton's interpreter takes seconds a launch: K = 50 already walks several code tiles there")
    z, codebook = _inputs(shape, dtype, device)
    indices, distances = fastvq.nearest_code_batched(z, codebook, metric=metric)
    assert tuple(indices.shape) == shape[:2] and tuple(distances.shape) == shape[:2]
    assert indices.dtype == torch.int64 and distances.dtype == torch.float32
    reference_indices, _ = reference.nearest_code_batched_ref(z, codebook, metric)
    assert tuple(reference_indices.shape) == shape[:2]
    for b in range(shape[0]):
        assert_search_parity(z[b], codebook[b], metric, indices[b], distances[b])
        if interpreted:
            continue
        single_indices, single_distances = fastvq.nearest_code(z[b], codebook[b], metric=metric)
        torch.testing.assert_close(indices[b], single_indices, rtol=0, atol=0)
        torch.testing.assert_close(distances[b], single_distances, rtol=0, atol=0)


def test_strided_inputs_and_float64(backend, device):
    if backend[0] == "triton":
        pytest.skip("the Triton kernels take fp32/fp16/bf16; strides are covered below in fp32")
    z, codebook = _inputs((3, 40, 20, 9), torch.float64, device)
    indices, distances = fastvq.nearest_code_batched(z.transpose(1, 2).contiguous().transpose(1, 2), codebook)
    expected = reference.nearest_code_batched_ref(z, codebook)
    torch.testing.assert_close(indices, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(distances, expected[1])


@pytest.mark.parametrize("metric", METRICS)
def test_non_contiguous_inputs_give_the_contiguous_answer(backend, device, metric):
    if backend == ("triton", "cpu") and metric != "l2":
        pytest.skip("Triton's interpreter is slow; the strides are the same for every metric")
    z, codebook = _inputs((3, 45, 37, 20), torch.float32, device, seed=1)
    strided_z = torch.stack([z, z], dim=3)[..., 0]  # every row of D values a stride of 2 apart
    column_major = z.transpose(1, 2).contiguous().transpose(1, 2)
    problem_major = codebook.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    expected = fastvq.nearest_code_batched(z, codebook, metric=metric)
    for rows, codes in ((column_major, codebook), (z, problem_major), (strided_z, codebook)):
        got = fastvq.nearest_code_batched(rows, codes, metric=metric)
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], expected[1])  # the true distance may be summed in another order


def test_duplicate_codes_go_to_the_lowest_index_within_each_problem(backend, device):
    generator = torch.Generator().manual_seed(3)
    codebook = torch.randn(3, 20, 8, generator=generator)
    codebook[:, 11] = codebook[:, 4]  # a duplicate in every problem
    codebook[2] = codebook[0]  # whole problems equal: groups must not cross problems
    z = codebook[:, [11, 4, 11]] + 0.0
    indices, distances = fastvq.nearest_code_batched(z.to(device), codebook.to(device))
    assert indices.tolist() == [[4, 4, 4]] * 3
    assert float(distances.abs().max()) == 0.0


def test_nan_rows_get_index_zero_and_nan_distance(backend, device):
    z, codebook = _inputs((2, 6, 9, 5), torch.float32, device)
    z[1, 3, 2] = float("nan")
    for metric in METRICS:
        indices, distances = fastvq.nearest_code_batched(z, codebook, metric=metric)
        assert int(indices[1, 3]) == 0 and bool(distances[1, 3].isnan())
        assert bool(distances[0].isfinite().all())


@pytest.mark.parametrize(
    ("z_shape", "codebook_shape", "error", "match"),
    [
        ((4, 3), (2, 5, 3), ValueError, "z must be 3-D"),
        ((2, 4, 3), (5, 3), ValueError, "codebook must be 3-D"),
        ((2, 4, 3), (3, 5, 3), ValueError, "same batch size"),
        ((2, 4, 3), (2, 5, 4), ValueError, "same batch size B and last dimension D"),
        ((2, 4, 3), (2, 0, 3), ValueError, "K >= 1"),
    ],
)
def test_bad_shapes_are_named(z_shape, codebook_shape, error, match):
    with pytest.raises(error, match=match):
        fastvq.nearest_code_batched(torch.zeros(z_shape), torch.zeros(codebook_shape))


def test_bad_types_and_metric_are_named():
    with pytest.raises(TypeError, match="z"):
        fastvq.nearest_code_batched(torch.zeros(2, 4, 3, dtype=torch.int64), torch.zeros(2, 5, 3))
    with pytest.raises(TypeError, match="codebook"):
        fastvq.nearest_code_batched(torch.zeros(2, 4, 3), [[1.0]])
    with pytest.raises(ValueError, match="metric"):
        fastvq.nearest_code_batched(torch.zeros(2, 4, 3), torch.zeros(2, 5, 3), metric="manhattan")


@pytest.mark.parametrize("metric", METRICS)
def test_opcheck(backend, device, metric):
    z, codebook = _inputs((2, 9, 6, 5), torch.float32, device)
    torch.library.opcheck(torch.ops.fastvq.nearest_code_batched.default, (z, codebook, metric))


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU every batched search test already runs the autotuned path")
def test_the_autotuned_batched_launch_matches_the_reference(monkeypatch):
    """The autotuned wrapper (grid from the chosen config, the SINGLE_D_TILE heuristic) under the interpreter,
    restricted to one small configuration, as tests/backends/test_triton_tuning.py runs the single search's."""
    import triton

    from fastvq.backends.triton import search

    small = triton.Config({"BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_D": 32}, num_warps=4, num_stages=1)
    monkeypatch.setattr(search._nearest_code_batched_tuned, "configs", [small])
    monkeypatch.setattr(search, "interpreting", lambda: False)
    monkeypatch.setattr(search, "dot_precision", lambda dtype: "ieee")
    z, codebook = _inputs((2, 21, 37, 40), torch.float32, "cpu", seed=5)
    indices, distances = search.nearest_code_batched(z, codebook, "l2")
    expected_indices, expected_distances = reference.nearest_code_batched_ref(z, codebook)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(distances, expected_distances, rtol=1e-5, atol=1e-5)
