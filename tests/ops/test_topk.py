"""``nearest_codes`` (the fused top-k search) on every backend, against the float64 truth, and every
contract row of DESIGN.md: ties, NaN, sizes, layouts, dtypes, bad input, determinism, opcheck and
torch.compile. Parity is FAISS-style, column by column: the j-th code's exact distance is within
tolerance of the j-th best, and the index is the exact one wherever the j-th best is clear of its
neighbours."""

from __future__ import annotations

import pytest
import torch
from _backends import HAS_CPP
from _parity import (
    CODEBOOK_LAYOUTS,
    DTYPE_IDS,
    DTYPES,
    DUPLICATE_GROUPS,
    METRICS,
    Z_LAYOUTS,
    assert_rows,
    layout_inputs,
    row_scale,
    search_tolerance,
)

import fastvq
from fastvq import reference


def assert_topk_parity(z, codebook, metric, k, indices, distances):
    num_rows = z.shape[0]
    assert indices.dtype == torch.int64 and tuple(indices.shape) == (num_rows, k)
    assert distances.dtype == torch.float32 and tuple(distances.shape) == (num_rows, k)
    if num_rows == 0:
        return
    indices, distances, z, codebook = indices.cpu(), distances.cpu(), z.cpu(), codebook.cpu()
    assert ((indices >= 0) & (indices < codebook.shape[0])).all(), "index out of range"
    assert (indices.sort(dim=1).values.diff(dim=1) > 0).all(), "a row lists a code twice"
    truth = reference.distance_matrix_ref(z, codebook, metric, upcast=True)
    clean = truth.nan_to_num(nan=float("inf"))
    ordered = clean.sort(dim=1, stable=True)
    tolerance = search_tolerance(z, codebook, metric, truth).expand(num_rows)
    chosen = truth.gather(1, indices)
    keys = distances.nan_to_num(nan=float("inf"))
    assert (keys.diff(dim=1) >= 0).all(), "distances do not ascend"
    for column in range(k):
        best = ordered.values[:, column]
        below = ordered.values[:, column - 1] if column else torch.full_like(best, -float("inf"))
        above = ordered.values[:, column + 1] if column + 1 < codebook.shape[0] else torch.full_like(best, float("inf"))
        finite = best.isfinite()
        error = chosen[:, column].nan_to_num(nan=float("inf")) - best
        details = dict(index=indices[:, column], best_index=ordered.indices[:, column], error=error,
                       tolerance=tolerance)
        assert_rows(~finite | (error <= tolerance), f"column {column}: farther than tolerance from the best", **details)
        clear = finite & (best - below > tolerance) & (above - best > tolerance)
        assert_rows(~clear | (indices[:, column] == ordered.indices[:, column]),
                    f"column {column}: index differs where the code is clear", **details)
    allowed = 1e-5 * row_scale(truth)[:, None] + 1e-6
    same = ((distances.double() - chosen).abs() <= allowed) | (distances.isnan() & chosen.isnan())
    assert_rows(same.all(dim=1), "returned distances are not the codes' true distances")


def random_inputs(shape, dtype, device, seed=0):
    num_rows, num_codes, dim = shape
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(num_rows, dim, generator=generator)
    codebook = torch.randn(num_codes, dim, generator=generator)
    return z.to(device=device, dtype=dtype), codebook.to(device=device, dtype=dtype)


SHAPES = [(0, 3, 17, 2), (1, 129, 70, 64), (3, 50, 1, 5), (37, 50, 17, 8), (127, 33, 3, 33), (300, 129, 70, 1),
          (40, 200, 9, 65)]
# Under Triton's interpreter every tile is a numpy array: a sample that still crosses tiles, fills
# a list of 64 and leaves one row of a program empty.
INTERPRETED_SHAPES = [(0, 3, 17, 2), (3, 50, 1, 5), (37, 50, 17, 8), (2, 70, 3, 64)]


def interpreted(backend) -> bool:
    return backend[0] == "triton" and backend[1] == "cpu"


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-K{}-D{}-k{}".format(*s))
def test_nearest_codes_match_the_float64_truth(backend, device, shape, metric):
    if interpreted(backend) and (shape not in INTERPRETED_SHAPES or shape[3] == 64 and metric != "l2"):
        pytest.skip("the interpreter runs a sample of the shapes")
    z, codebook = random_inputs(shape[:3], torch.float32, device)
    indices, distances = fastvq.nearest_codes(z, codebook, shape[3], metric=metric)
    assert_topk_parity(z, codebook, metric, shape[3], indices, distances)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=DTYPE_IDS[1:])
def test_low_precision_matches_the_float64_truth(backend, device, dtype, metric):
    if interpreted(backend) and (dtype != torch.bfloat16 or metric != "l2"):
        pytest.skip("the interpreter runs bf16 l2 (fp16 and the metrics go through the same tiles)")
    shape = (37, 50, 17, 8)
    z, codebook = random_inputs(shape[:3], dtype, device)
    indices, distances = fastvq.nearest_codes(z, codebook, shape[3], metric=metric)
    assert_topk_parity(z, codebook, metric, shape[3], indices, distances)


@pytest.mark.parametrize("metric", METRICS)
def test_first_column_is_the_nearest_code_on_clustered_data(backend, device, metric):
    if interpreted(backend) and metric != "l2":
        pytest.skip("the interpreter runs l2 (the metrics' scores are the search kernel's)")
    generator = torch.Generator().manual_seed(1)
    codebook = torch.randn(90, 19, generator=generator)
    assignment = torch.randint(90, (60,), generator=generator)
    z = codebook[assignment] + 0.05 * torch.randn(60, 19, generator=generator)
    indices, _ = fastvq.nearest_codes(z.to(device), codebook.to(device), 4, metric=metric)
    nearest, _ = fastvq.nearest_code(z.to(device), codebook.to(device), metric=metric)
    assert torch.equal(indices[:, 0], nearest)
    if metric != "dot":
        assert torch.equal(indices[:, 0].cpu(), assignment)


@pytest.mark.parametrize("metric", METRICS)
def test_duplicates_are_listed_in_index_order_whatever_the_tiling(backend, device, metric):
    """Every copy of a repeated code (across the tiles of every tiling the kernels use) is listed,
    in ascending index order, ahead of every other code."""
    generator = torch.Generator().manual_seed(5)
    codebook = 0.1 * torch.randn(300, 8, generator=generator)
    group_codes = 3.0 * torch.nn.functional.normalize(torch.randn(2, 8, generator=generator), dim=1)
    for group, positions in enumerate(DUPLICATE_GROUPS):
        codebook[list(positions)] = group_codes[group]
    rows = torch.arange(12) % 2
    z = group_codes[rows] + 0.01 * torch.randn(12, 8, generator=generator)
    indices, distances = fastvq.nearest_codes(z.to(device), codebook.to(device), 6, metric=metric)
    for row, group in enumerate(rows.tolist()):
        copies = list(DUPLICATE_GROUPS[group])
        assert indices[row, :5].tolist() == copies, (row, indices[row].tolist())
        assert (distances[row, :5] == distances[row, 0]).all()


def test_all_equal_codes_give_the_first_indices(backend, device):
    codebook = torch.randn(1, 17).expand(100, 17).contiguous().to(device)
    indices, _ = fastvq.nearest_codes(torch.randn(20, 17, device=device), codebook, 7)
    assert (indices.cpu() == torch.arange(7)).all()


@pytest.mark.parametrize("metric", METRICS)
def test_nan_codes_never_enter_and_nan_rows_list_the_first_codes(backend, device, metric):
    generator = torch.Generator().manual_seed(7)
    z = torch.randn(30, 17, generator=generator)
    codebook = torch.randn(40, 17, generator=generator)
    nan_codes, nan_rows = [0, 17, 39], [0, 21]
    codebook[nan_codes, 5] = float("nan")
    z[nan_rows, 3] = float("nan")
    indices, distances = fastvq.nearest_codes(z.to(device), codebook.to(device), 5, metric=metric)
    indices, distances = indices.cpu(), distances.cpu()
    assert (indices[nan_rows] == torch.arange(5)).all() and distances[nan_rows].isnan().all()
    others = [row for row in range(30) if row not in nan_rows]
    assert not torch.isin(indices[others], torch.tensor(nan_codes)).any()
    assert distances[others].isfinite().all()


def test_all_but_a_few_codes_nan_fills_with_the_lowest_nan_codes(backend, device):
    """With fewer finite codes than k, the finite ones come first, then the lowest NaN codes."""
    codebook = torch.full((20, 6), float("nan"))
    codebook[[7, 12]] = torch.randn(2, 6)
    indices, distances = fastvq.nearest_codes(torch.randn(4, 6).to(device), codebook.to(device), 5)
    indices = indices.cpu()
    assert set(indices[:, :2].flatten().tolist()) == {7, 12}
    assert (indices[:, 2:] == torch.tensor([0, 1, 2])).all()
    assert distances[:, 2:].isnan().all()


def test_k_equal_to_k_is_a_full_sort(backend, device):
    z, codebook = random_inputs((9, 21, 5), torch.float32, device, seed=3)
    indices, distances = fastvq.nearest_codes(z, codebook, 21)
    truth = reference.distance_matrix_ref(z.cpu(), codebook.cpu(), upcast=True)
    assert torch.equal(indices.cpu(), truth.argsort(dim=1, stable=True))


@pytest.mark.parametrize("z_layout", list(Z_LAYOUTS))
@pytest.mark.parametrize("codebook_layout", list(CODEBOOK_LAYOUTS))
def test_layouts_give_the_same_answer(backend, device, z_layout, codebook_layout):
    interpreted_layouts = (("transposed", "strided"), ("nchw-image", "contiguous"))
    if interpreted(backend) and (z_layout, codebook_layout) not in interpreted_layouts:
        pytest.skip("the interpreter runs two of the layouts (the kernel reads any strides the same way)")
    z, codebook = layout_inputs(device)
    expected = fastvq.nearest_codes(z, codebook, 6)
    actual = fastvq.nearest_codes(Z_LAYOUTS[z_layout](z), CODEBOOK_LAYOUTS[codebook_layout](codebook), 6)
    assert torch.equal(actual[0], expected[0])
    torch.testing.assert_close(actual[1], expected[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("z_dtype", "codebook_dtype"),
                         [(torch.float16, torch.float32), (torch.bfloat16, torch.float16)],
                         ids=["fp16-fp32", "bf16-fp16"])
def test_mixed_dtypes_are_promoted(backend, device, z_dtype, codebook_dtype):
    z, codebook = random_inputs((30, 40, 17), torch.float32, device, seed=4)
    z, codebook = z.to(z_dtype), codebook.to(codebook_dtype)
    indices, distances = fastvq.nearest_codes(z, codebook, 4)
    assert_topk_parity(z, codebook, "l2", 4, indices, distances)


def test_fp64_on_the_paths_that_compute_it(backend, device):
    if backend[0] in ("triton", "cuda"):
        pytest.skip("the Triton kernels take fp32, fp16 and bf16")
    z, codebook = random_inputs((25, 31, 7), torch.float64, device, seed=5)
    indices, distances = fastvq.nearest_codes(z, codebook, 3)
    assert_topk_parity(z, codebook, "l2", 3, indices, distances)


def test_search_is_deterministic(backend, device):
    z, codebook = random_inputs((20, 40, 9) if interpreted(backend) else (300, 129, 70), torch.float32, device, 14)
    first = fastvq.nearest_codes(z, codebook, 9)
    second = fastvq.nearest_codes(z, codebook, 9)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


BAD_TOPK_INPUTS = [
    pytest.param(dict(z=torch.zeros(2, 4, 3)), 2, ValueError, r"z must be 2-D.*\(2, 4, 3\)", id="z-rank-3"),
    pytest.param(dict(codebook=torch.zeros(5, 2)), 2, ValueError, r"same last dimension", id="mismatched-D"),
    pytest.param(dict(codebook=torch.zeros(0, 3)), 1, ValueError, r"K >= 1", id="K-0"),
    pytest.param(dict(z=torch.zeros(4, 3, dtype=torch.int64)), 2, TypeError, r"z must be a floating-point", id="int"),
    pytest.param(dict(codebook=torch.zeros(5, 3, device="meta")), 2, ValueError, r"one device", id="devices"),
    pytest.param({}, 0, ValueError, r"k must be an int in \[1, K\] = \[1, 5\].*got 0", id="k-0"),
    pytest.param({}, 6, ValueError, r"k must be an int in \[1, K\] = \[1, 5\].*got 6", id="k-over-K"),
    pytest.param({}, 2.0, ValueError, r"k must be an int", id="k-float"),
]


@pytest.mark.parametrize(("overrides", "k", "error", "message"), BAD_TOPK_INPUTS)
@pytest.mark.parametrize("caller", ["functional", "operator"])
def test_bad_input_is_rejected_before_any_kernel(backend, monkeypatch, caller, overrides, k, error, message):
    from fastvq.backends import cpp
    from fastvq.backends.torch import topk as torch_topk

    modules = [torch_topk, cpp]
    if backend[0] == "triton":
        from fastvq.backends.triton import topk as triton_topk

        modules.append(triton_topk)
    for module in modules:
        monkeypatch.setattr(module, "nearest_codes", lambda *a, **kw: pytest.fail("a kernel ran on bad input"))
    arguments = dict(z=torch.zeros(4, 3), codebook=torch.zeros(5, 3))
    arguments.update(overrides)
    if caller == "operator" and isinstance(k, float):
        # The dispatcher checks the schema's types first, with its own error naming the argument.
        error, message = RuntimeError, r"Expected a value of type 'int' for argument 'k'"
    with pytest.raises(error, match=message):
        if caller == "functional":
            fastvq.nearest_codes(arguments["z"], arguments["codebook"], k)
        else:
            torch.ops.fastvq.nearest_codes(arguments["z"], arguments["codebook"], k, "l2")


@pytest.mark.parametrize("k", [1, 7])
def test_opcheck(backend, device, k):
    z, codebook = random_inputs((5, 20, 4) if interpreted(backend) else (19, 21, 18), torch.float32, device)
    torch.library.opcheck(torch.ops.fastvq.nearest_codes.default, (z, codebook, k, "l2"))
    torch.library.opcheck(torch.ops.fastvq.nearest_codes.default,
                          (z, codebook, k, "cosine", 0.5, torch.tensor(3, device=device)))


def test_compiles_without_graph_break(backend, device):
    if backend[0] != ("cpp" if HAS_CPP else "torch"):
        pytest.skip("compiled once, on the CPU backend: the op's fake function is the same for every backend")

    def beams(z, codebook):
        indices, distances = torch.ops.fastvq.nearest_codes(z, codebook, 3, "l2")
        return codebook[indices].sum(dim=1), distances.sum()

    z, codebook = random_inputs((33, 40, 12), torch.float32, device)
    compiled = torch.compile(beams, fullgraph=True)
    for got, want in zip(compiled(z, codebook), beams(z, codebook)):
        torch.testing.assert_close(got, want)


def test_gumbel_top_k_samples_without_replacement(backend, device):
    """The first draw follows softmax(-d / T); every row lists distinct codes by ascending distance;
    a seed reproduces the draw."""
    generator = torch.Generator().manual_seed(3)
    codebook = torch.randn(12, 5, generator=generator) * 0.5
    row = torch.randn(1, 5, generator=generator)
    if interpreted(backend):
        # The noise is the search kernel's (tile_scores), whose distribution tests/ops/test_search.py
        # checks under the interpreter; here the top-k kernel's use of it, on a few rows.
        z = row.repeat(32, 1)
        seed = torch.tensor(11)
        indices, distances = fastvq.nearest_codes(z, codebook, 3, sample_temperature=5.0, seed=seed)
        assert torch.equal(indices, fastvq.nearest_codes(z, codebook, 3, sample_temperature=5.0, seed=seed)[0])
        assert (indices.sort(dim=1).values.diff(dim=1) > 0).all() and (distances.diff(dim=1) >= 0).all()
        assert len({tuple(r) for r in indices.tolist()}) > 1, "every row drew the same codes"
        return
    draws = 20000
    seed = torch.tensor(11, device=device)
    z = row.repeat(draws, 1).to(device)
    indices, distances = fastvq.nearest_codes(z, codebook.to(device), 3, sample_temperature=0.7, seed=seed)
    again, _ = fastvq.nearest_codes(z, codebook.to(device), 3, sample_temperature=0.7, seed=seed)
    assert torch.equal(indices, again)
    assert (indices.sort(dim=1).values.diff(dim=1) > 0).all()
    assert (distances.diff(dim=1) >= 0).all()
    # P(code c is among the k drawn) of Gumbel-top-k, estimated with PyTorch's own Gumbel noise.
    logits = -torch.cdist(row.double(), codebook.double())[0] / 0.7
    noise = -torch.log(-torch.log(torch.rand(200000, 12, dtype=torch.float64, generator=generator)))
    expected = torch.zeros(12, dtype=torch.float64).index_add_(
        0, (logits + noise).topk(3, dim=1).indices.flatten(), torch.ones(600000, dtype=torch.float64)) / 200000
    included = torch.zeros(12, dtype=torch.float64).index_add_(
        0, indices.cpu().flatten(), torch.ones(indices.numel(), dtype=torch.float64)) / draws
    error = (expected * (1 - expected) / draws).sqrt()
    assert ((included - expected).abs() <= 5 * error + 2e-3).all(), (included, expected)


@pytest.mark.parametrize("k", [8, 15, 16, 17])
def test_ties_straddling_the_kth_place_keep_the_lowest_codes(backend, device, k, monkeypatch):
    """40 distinct codes on a grid at one distance from z (codes 5..44, across panels of 16 and 32
    codes: equal scores, not copies, which the duplicate remap would merge) tie for the k-th place,
    and two strictly nearer codes arrive after them (60, 90) and push the last listed ones out: the
    list is the two nearer codes, then the lowest tied codes in index order. k = 15, 16, 17 straddle
    the AVX-512 kernel's 16-lane register list; on the C++ backend every kernel this CPU runs is
    checked (FASTVQ_CPU_SEARCH), since each inserts a panel's survivors its own way."""
    generator = torch.Generator().manual_seed(9)
    codebook = torch.randint(6, 10, (120, 6), generator=generator).float()
    pairs = [(a, b) for a in range(6) for b in range(a + 1, 6)]
    tied = torch.zeros(60, 6)
    for position, ((a, b), (sign_a, sign_b)) in enumerate((pair, signs) for pair in pairs
                                                          for signs in ((1, 1), (1, -1), (-1, 1), (-1, -1))):
        tied[position, a], tied[position, b] = sign_a, sign_b
    codebook[5:45] = tied[:40]
    codebook[60] = torch.tensor([0.5, 0, 0, 0, 0, 0])
    codebook[90] = torch.tensor([0, 1.0, 0, 0, 0, 0])
    z = torch.zeros(4, 6)
    expected = torch.tensor([60, 90] + list(range(5, 45))[:k - 2]).repeat(4, 1)
    kernels = ["auto", "avx512", "avx2", "blas"] if backend[0] == "cpp" else ["auto"]
    checked = 0
    for kernel in kernels:
        monkeypatch.setenv("FASTVQ_CPU_SEARCH", kernel)
        try:
            indices, distances = fastvq.nearest_codes(z.to(device), codebook.to(device), k)
        except ValueError as error:
            assert "does not run that kernel" in str(error)
            continue
        assert torch.equal(indices.cpu(), expected), (kernel, indices[0].tolist())
        assert (distances[:, 2:].cpu() == 2).all(), kernel
        checked += 1
    assert checked >= 2 if backend[0] == "cpp" else checked == 1
