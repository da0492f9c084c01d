"""The C++ search's work items (csrc/cpu/search.cpp) and its row finish (search_common.h's true_distances).

On several threads a block of rows whose work against the whole codebook exceeds 2^24 multiply-adds is
cut along the codebook into segments of whole panels, each folded into a partial (min, argmin) per row and
merged in code order: the answer must be the one-thread answer bit for bit, ties across a segment boundary
going to the lowest index. The distances follow the float64 sums search_common.h documents (l2 in eight
partial sums, as the top-k search sums it; cosine and dot in order, eight rows at a time) for every row.
The op is called directly (torch.ops.fastvq_C), so the public layer's remap of duplicate codes cannot hide
a wrong tie. A call of the AVX-512 kernel on 8 192 codes or more (256 panels) keeps one running minimum per
row (argmin_scores), a smaller one 16 lanes per row: at 1 800 x 8 209 one thread takes the first (16 blocks
of rows, the codebook whole) and two threads the second (two segments), and they must agree.
"""

from __future__ import annotations

import pytest
import torch

from fastvq.backends import cpp

pytestmark = pytest.mark.skipif(not cpp.available(), reason="needs fastvq._C")

# Shapes whose row blocks exceed 2^24 multiply-adds against the whole codebook (112 rows x K x D on the
# AVX-512 kernel), at sizes that are no multiple of a panel (32 codes), a register tile (14 rows) or eight.
SPLIT_SHAPES = [(3_601, 2_111, 73), (300, 3_001, 75), (1_800, 8_209, 16)]


@pytest.fixture
def threads(monkeypatch):
    """Sets the intra-op thread count for one test; the loop's back-off is off, so the parallel path runs."""
    monkeypatch.setenv("FASTVQ_CPU_BACKOFF", "0")
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)


def search(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2") -> tuple[torch.Tensor, torch.Tensor]:
    indices, distances, _ = torch.ops.fastvq_C.nearest_code(z, codebook, metric, False)
    return indices, distances


def grid_data(num_rows: int, num_codes: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Small integers: every score is exact, so equally distant codes tie exactly. Each code in the first
    half is repeated in the second half, across every segment boundary a split can draw."""
    generator = torch.Generator().manual_seed(num_codes)
    z = torch.randint(-2, 3, (num_rows, dim), generator=generator).float()
    codebook = torch.randint(-2, 3, (num_codes, dim), generator=generator).float()
    half = num_codes // 2
    codebook[half:2 * half] = codebook[:half]
    return z, codebook


@pytest.mark.parametrize("num_rows,num_codes,dim", SPLIT_SHAPES)
def test_split_codebook_gives_the_one_thread_answer_with_ties_to_the_lowest_index(threads, num_rows, num_codes, dim):
    z, codebook = grid_data(num_rows, num_codes, dim)
    threads(1)
    one_thread = search(z, codebook)
    threads(2)
    two_threads = search(z, codebook)
    assert torch.equal(one_thread[0], two_threads[0])
    assert torch.equal(one_thread[1].view(torch.int32), two_threads[1].view(torch.int32))
    exact = torch.cdist(z.double(), codebook.double()).square().round()
    assert torch.equal(two_threads[0], exact.argmin(1)), "a tie went to a higher index"
    tied_rows = (exact == exact.min(1, keepdim=True).values).sum(1).gt(1)
    assert tied_rows.float().mean() > 0.9, "the data should make most rows' best codes tie"


def sequential_sum(terms: torch.Tensor) -> torch.Tensor:
    """Each row of a float64 [N, M] summed left to right (cumsum adds in order)."""
    return terms.cumsum(1)[:, -1]


def l2_in_eight_partial_sums(rows: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """search_common.h's l2_true_distance: squares of z - e in lanes d % 8, each lane in order, then the
    lanes in order, then the last D % 8 dimensions."""
    squares = (rows - chosen).square()
    whole = squares.shape[1] // 8 * 8
    lanes = squares[:, :whole].reshape(squares.shape[0], -1, 8).cumsum(1)[:, -1, :]
    return sequential_sum(torch.cat([sequential_sum(lanes)[:, None], squares[:, whole:]], 1))


@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_distances_follow_the_documented_float64_sums(threads, metric, num_threads):
    """Every row's distance, the rows past the last group of eight (301 = 37 x 8 + 5) and column-major z
    included: l2 in eight partial sums, cosine and dot each row's sums in order (true_distance)."""
    threads(num_threads)
    generator = torch.Generator().manual_seed(7)
    z = torch.randn(301, 37, generator=generator) * 3 + 1
    codebook = torch.randn(2_111, 37, generator=generator)
    z_strided = z.t().contiguous().t()  # column-major rows: the finish reads z through its strides
    indices, distances = search(z_strided, codebook, metric)
    chosen = codebook[indices].double()
    rows = z.double()
    if metric == "l2":
        expected = l2_in_eight_partial_sums(rows, chosen)
    else:
        dot = sequential_sum(rows * chosen)
        expected = -dot
        if metric == "cosine":
            norms = sequential_sum(rows.square()).sqrt().clamp_min(1e-12) * sequential_sum(chosen.square()).sqrt()
            expected = (1 - dot / norms).clamp_min(0)
    assert torch.equal(distances, expected.float())


def test_nearest_code_distance_is_the_top_k_first_distance(threads):
    """The search and the top-k search sum a row's l2 distance the same way, so their bits agree."""
    threads(1)
    generator = torch.Generator().manual_seed(3)
    z = torch.randn(203, 45, generator=generator) * 2 + 0.5
    codebook = torch.randn(777, 45, generator=generator)
    indices, distances = search(z, codebook)
    top_indices, top_distances = torch.ops.fastvq_C.nearest_codes(z, codebook, 1, "l2")
    assert torch.equal(indices, top_indices[:, 0])
    assert torch.equal(distances, top_distances[:, 0])
