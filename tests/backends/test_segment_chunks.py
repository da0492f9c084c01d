"""The deterministic Triton segment sum splits one code's rows across programs (collapsed codebooks).

One program per chunk of ``_ROWS_PER_CHUNK`` sorted rows (32 under the interpreter), then each
code's chunk sums added in chunk order: a code that takes almost every row is summed by many
programs instead of walked by one, and the result is still the same bits on every run.
"""

from __future__ import annotations

import pytest
import torch
from _backends import HAS_TRITON, TRITON_DEVICE

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")


def _collapsed_batch(num_rows=200, num_codes=5, dim=19, seed=0):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(num_rows, dim, generator=generator)
    indices = torch.randint(0, num_codes, (num_rows,), generator=generator)
    indices[torch.rand(num_rows, generator=generator) < 0.9] = 2  # code 2 takes about 90% of the rows
    indices[7] = -1  # out of range: ignored
    return values.to(TRITON_DEVICE), indices.to(TRITON_DEVICE), num_codes


def test_a_collapsed_code_is_split_into_chunks():
    from fastvq.backends.triton import segment_reduce

    values, indices, num_codes = _collapsed_batch()
    sums = torch.zeros(num_codes, values.shape[1], device=values.device)
    (_, _), _, _, max_chunks, code_counts = segment_reduce._sorted_launch(sums, values, indices, 1.0)
    rows_per_chunk = segment_reduce._rows_per_chunk()
    assert code_counts[2] > 4 * rows_per_chunk
    chunks = torch.div(code_counts[:num_codes] + rows_per_chunk - 1, rows_per_chunk, rounding_mode="floor")
    assert chunks[2] >= 5 and int(chunks.sum()) <= max_chunks


def test_chunked_sums_match_float64_and_repeat_bit_for_bit():
    from fastvq.backends.triton.segment_reduce import segment_reduce

    values, indices, num_codes = _collapsed_batch()
    counts, sums = segment_reduce(values, indices, num_codes, deterministic=True)
    again_counts, again_sums = segment_reduce(values, indices, num_codes, deterministic=True)
    assert torch.equal(sums, again_sums) and torch.equal(counts, again_counts)
    valid = indices >= 0
    expected = torch.zeros(num_codes, values.shape[1], dtype=torch.float64, device=values.device)
    expected.index_add_(0, indices[valid], values[valid].double())
    expected_counts = torch.bincount(indices[valid], minlength=num_codes).float()
    assert torch.equal(counts, expected_counts)
    torch.testing.assert_close(sums.double(), expected, rtol=1e-5, atol=1e-5)


def test_chunked_sums_scale_and_accumulate_into_sums():
    from fastvq.backends.triton.segment_reduce import segment_sum_

    values, indices, num_codes = _collapsed_batch(num_rows=90, seed=1)
    start = torch.randn(num_codes, values.shape[1], generator=torch.Generator().manual_seed(2)).to(values.device)
    sums = start.clone()
    segment_sum_(sums, values, indices, scale=-0.5, deterministic=True)
    valid = indices >= 0
    expected = start.double().index_add(0, indices[valid], values[valid].double(), alpha=-0.5)
    torch.testing.assert_close(sums.double(), expected, rtol=1e-5, atol=1e-5)
