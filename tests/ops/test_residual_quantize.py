"""``residual_quantize`` against ``reference.residual_quantize_ref`` on every backend: indices, the quantized sum,
the per-level losses and EMA statistics, every straight-through variant's gradients, ``n_q`` (scalar and per
row), the DESIGN.md contract rows (ties, NaN, N = 0, dtypes, layouts, bad input), opcheck and torch.compile.

The data is built level by level (``z = sum_l C_l[a_l]`` plus noise, each level's codes smaller than the
last), so every level of every row has a clear nearest code in every dtype and the indices must agree with
the float64 reference exactly; search parity on ambiguous rows is tests/ops/test_search.py's job.
"""

from __future__ import annotations

import pytest
import torch
from _backends import backends_for

import fastvq
from fastvq.reference import residual_quantize_ref

backend = backends_for("residual_quantize")

VARIANTS = ("final", "per_level", "detached_residual")
SHAPES = [
    pytest.param((1, 2, 3, 5), id="N1-L2-K3-D5"),
    pytest.param((75, 4, 37, 19), id="N75-L4-K37-D19"),
]


def layered_inputs(num_rows, num_levels, num_codes, dim, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    scales = 0.3 ** torch.arange(num_levels, dtype=torch.float64)
    codebooks = torch.randn(num_levels, num_codes, dim, generator=generator, dtype=torch.float64)
    codebooks = codebooks * scales[:, None, None]
    picks = torch.randint(num_codes, (num_levels, num_rows), generator=generator)
    z = codebooks[torch.arange(num_levels)[:, None], picks].sum(dim=0)
    z = z + 0.003 * 0.3**num_levels * torch.randn(num_rows, dim, generator=generator, dtype=torch.float64)
    return z.to(dtype), codebooks.to(dtype)


def run(z, codebooks, device, **kwargs):
    return fastvq.residual_quantize(z.to(device), codebooks.to(device), **kwargs)


def assert_matches_reference(result, z, codebooks, *, n_q=None, rtol=1e-5, atol=1e-6):
    indices, quantized, commitment, codebook_loss, counts, sums = residual_quantize_ref(
        z, codebooks, n_q=None if n_q is None else (n_q.cpu() if isinstance(n_q, torch.Tensor) else n_q)
    )
    torch.testing.assert_close(result.indices.cpu(), indices, msg="indices")
    torch.testing.assert_close(result.quantized.cpu().double(), quantized.double(), rtol=rtol, atol=atol,
                               msg="quantized")
    scale = commitment.abs().max().item() + 1e-30
    torch.testing.assert_close(result.commitment.cpu().double(), commitment.double(), rtol=rtol, atol=atol * scale,
                               msg="commitment")
    torch.testing.assert_close(result.codebook_loss.cpu().double(), codebook_loss.double(), rtol=rtol,
                               atol=atol * scale, msg="codebook_loss")
    if result.counts is not None:
        torch.testing.assert_close(result.counts.cpu().double(), counts.double(), msg="counts")
        torch.testing.assert_close(result.sums.cpu().double(), sums.double(), rtol=rtol, atol=atol, msg="sums")


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(backend, shape):
    _, device = backend
    z, codebooks = layered_inputs(*shape)
    result = run(z, codebooks, device, return_stats=True)
    assert result.indices.dtype == torch.int64 and result.indices.shape == (shape[0], shape[1])
    assert result.quantized.dtype == torch.float32 and result.commitment.dtype == torch.float32
    assert result.counts.shape == (shape[1], shape[2]) and result.sums.shape == codebooks.shape
    assert_matches_reference(result, z, codebooks)


def test_without_stats_returns_none(backend):
    _, device = backend
    z, codebooks = layered_inputs(10, 2, 5, 3)
    result = run(z, codebooks, device)
    assert result.counts is None and result.sums is None
    assert_matches_reference(result, z, codebooks)


def test_scalar_n_q_uses_the_first_levels(backend):
    _, device = backend
    z, codebooks = layered_inputs(40, 4, 11, 6)
    result = run(z, codebooks, device, n_q=2, return_stats=True)
    assert (result.indices[:, 2:] == -1).all()
    assert (result.counts[2:] == 0).all() and (result.commitment[2:] == 0).all()
    assert_matches_reference(result, z, codebooks, n_q=2)


def test_per_row_n_q(backend):
    _, device = backend
    z, codebooks = layered_inputs(40, 4, 11, 6)
    # Every other entry of a longer int32 tensor: any strides and integer dtype.
    row_levels = torch.tensor([0, 1, 2, 3, 4, 7, -2] * 5 + [4] * 5, dtype=torch.int32).repeat_interleave(2)[::2]
    row_levels = row_levels.to(device)
    result = run(z, codebooks, device, n_q=row_levels, return_stats=True)
    expected_levels = row_levels.cpu().clamp(0, 4)
    assert torch.equal((result.indices.cpu() >= 0).sum(dim=1), expected_levels)
    assert (result.quantized[row_levels.cpu() <= 0] == 0).all()
    assert_matches_reference(result, z, codebooks, n_q=row_levels)


def objective(result, upstream, commit_weights, codebook_weights):
    return ((result[1] * upstream).sum() + (result[2] * commit_weights).sum() + (result[3] * codebook_weights).sum())


def gradients(fn, z, codebooks, upstream, commit_weights, codebook_weights, **kwargs):
    z = z.detach().clone().requires_grad_(True)
    codebooks = codebooks.detach().clone().requires_grad_(True)
    objective(fn(z, codebooks, **kwargs), upstream, commit_weights, codebook_weights).backward()
    return z.grad, codebooks.grad


@pytest.mark.parametrize("straight_through", VARIANTS)
@pytest.mark.parametrize("per_row", [False, True], ids=["all-levels", "per-row-n_q"])
def test_gradients_match_the_libraries_autograd(backend, straight_through, per_row):
    """Every variant's gradient to z and to the codebooks equals PyTorch autograd on the library-style loop."""
    _, device = backend
    z, codebooks = layered_inputs(30, 3, 7, 5)
    generator = torch.Generator().manual_seed(1)
    upstream = torch.randn(z.shape, generator=generator)
    commit_weights = torch.tensor([0.7, 1.3, 2.1])  # a different weight per level: each level's term is checked
    codebook_weights = torch.tensor([1.9, 0.4, 0.9])
    n_q = torch.tensor([0, 1, 2, 3, 3] * 6) if per_row else None
    ours = gradients(fastvq.residual_quantize, z.to(device), codebooks.to(device), upstream.to(device),
                     commit_weights.to(device), codebook_weights.to(device), straight_through=straight_through,
                     n_q=None if n_q is None else n_q.to(device))
    theirs = gradients(residual_quantize_ref, z.double(), codebooks.double(), upstream.double(),
                       commit_weights.double(), codebook_weights.double(), straight_through=straight_through,
                       n_q=n_q)
    for name, actual, expected in zip(("grad_z", "grad_codebooks"), ours, theirs):
        torch.testing.assert_close(actual.cpu().double(), expected, rtol=1e-5, atol=1e-5, msg=name)


def test_float64_gradients_are_exact():
    z, codebooks = layered_inputs(20, 3, 6, 4, dtype=torch.float64)
    upstream = torch.randn(z.shape, dtype=torch.float64)
    weights = torch.tensor([0.5, 1.5, 2.5], dtype=torch.float64)
    for straight_through in VARIANTS:
        ours = gradients(fastvq.residual_quantize, z, codebooks, upstream, weights, weights.flip(0),
                         straight_through=straight_through)
        theirs = gradients(residual_quantize_ref, z, codebooks, upstream, weights, weights.flip(0),
                           straight_through=straight_through)
        for actual, expected in zip(ours, theirs):
            torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_straight_through_variants_differ_as_documented():
    z, codebooks = layered_inputs(8, 3, 5, 4)
    upstream = torch.randn(z.shape)
    zero = torch.zeros(3)
    grads = {variant: gradients(fastvq.residual_quantize, z, codebooks, upstream, zero, zero,
                                straight_through=variant)[0] for variant in VARIANTS}
    torch.testing.assert_close(grads["final"], upstream)
    torch.testing.assert_close(grads["per_level"], upstream)
    torch.testing.assert_close(grads["detached_residual"], 3 * upstream)


def test_backward_uses_the_codes_of_the_forward():
    """An EMA step rewriting the codebooks in place (through .data) before backward() changes nothing."""
    z, codebooks = layered_inputs(12, 2, 5, 3)
    weights = torch.tensor([1.0, 2.0])
    expected = gradients(fastvq.residual_quantize, z, codebooks, torch.zeros(z.shape), weights, weights)
    z_leaf = z.clone().requires_grad_(True)
    codebooks_leaf = codebooks.clone().requires_grad_(True)
    result = fastvq.residual_quantize(z_leaf, codebooks_leaf)
    codebooks_leaf.data.mul_(3.0)
    objective(result, torch.zeros(z.shape), weights, weights).backward()
    torch.testing.assert_close(z_leaf.grad, expected[0])
    torch.testing.assert_close(codebooks_leaf.grad, expected[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision(backend, dtype):
    """fp16/bf16 inputs: the same codes as the float64 reference of the same (rounded) inputs, and a quantized
    sum within the dtype's rounding of it (summed in fp32, rounded once)."""
    _, device = backend
    z, codebooks = layered_inputs(50, 3, 13, 8, dtype=dtype)
    result = run(z, codebooks, device, return_stats=True)
    assert result.quantized.dtype == dtype
    indices, quantized, commitment, _, counts, sums = residual_quantize_ref(z, codebooks)
    torch.testing.assert_close(result.indices.cpu(), indices)
    torch.testing.assert_close(result.quantized.cpu().double(), quantized.double(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(result.commitment.cpu().double(), commitment.double(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(result.counts.cpu().double(), counts.double())
    torch.testing.assert_close(result.sums.cpu().double(), sums.double(), rtol=1e-5, atol=1e-5)


def test_mixed_dtypes_are_promoted(backend):
    _, device = backend
    z, codebooks = layered_inputs(20, 2, 5, 4)
    result = run(z.to(torch.bfloat16), codebooks, device)
    assert result.quantized.dtype == torch.float32
    assert_matches_reference(result, z.to(torch.bfloat16), codebooks)


def test_empty_batch(backend):
    _, device = backend
    z = torch.empty(0, 7, device=device)
    codebooks = torch.randn(3, 5, 7, device=device)
    result = fastvq.residual_quantize(z, codebooks, return_stats=True)
    assert result.indices.shape == (0, 3) and result.quantized.shape == (0, 7)
    assert (result.commitment == 0).all() and (result.counts == 0).all() and (result.sums == 0).all()


def test_ties_go_to_the_lowest_index(backend):
    """Duplicate codes and codes at equal distance (on an integer grid, where every score is exact)."""
    _, device = backend
    codebooks = torch.tensor([
        [[2.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 5.0]],  # z = 0: -1 (index 1) ties with +1 and a copy
        [[0.0, 3.0], [0.0, 1.0], [0.0, 1.0], [0.0, -1.0], [7.0, 7.0]],
    ], device=device)
    z = torch.zeros(3, 2, device=device)
    result = fastvq.residual_quantize(z, codebooks)
    # level 0 picks code 1 (-1, 0), leaving (1, 0); level 1's codes (0, 1), its copy and (0, -1) are all at 2.
    assert result.indices.tolist() == [[1, 1]] * 3


def test_nan_rows(backend):
    _, device = backend
    z, codebooks = layered_inputs(6, 3, 5, 4)
    z[2] = float("nan")
    result = run(z, codebooks, device, return_stats=True)
    assert (result.indices[2] == 0).all()
    torch.testing.assert_close(result.quantized[2].cpu(), codebooks[:, 0].sum(dim=0))  # code 0 of every level
    assert result.commitment.isnan().all()  # the NaN row's remainder is summed in: the loss turns NaN visibly
    keep = torch.tensor([0, 1, 3, 4, 5])
    assert_matches_reference(run(z[keep], codebooks, device), z[keep], codebooks)
    assert torch.equal(result.indices[keep].cpu(), residual_quantize_ref(z[keep], codebooks)[0])


def test_nan_codes_never_win(backend):
    _, device = backend
    z, codebooks = layered_inputs(20, 2, 6, 3)
    codebooks[0, 0] = float("nan")
    codebooks[1, 3, 1] = float("nan")
    result = run(z, codebooks, device)
    assert torch.equal(result.indices.cpu(), residual_quantize_ref(z, codebooks)[0])
    assert (result.indices[:, 0] != 0).all() and (result.indices[:, 1] != 3).all()


def test_non_contiguous_inputs(backend):
    _, device = backend
    z, codebooks = layered_inputs(30, 3, 9, 6)
    z_strided = z.T.contiguous().T.to(device)  # column-major
    codebooks_strided = codebooks.permute(2, 0, 1).contiguous().permute(1, 2, 0).to(device)
    assert not z_strided.is_contiguous() and not codebooks_strided.is_contiguous()
    expected = run(z, codebooks, device, return_stats=True)
    actual = fastvq.residual_quantize(z_strided[::1], codebooks_strided, return_stats=True)
    for name, a, b in zip(expected._fields, actual, expected):
        torch.testing.assert_close(a, b, msg=name)
    wide = torch.zeros(30, 12, device=device)
    wide[:, ::2] = z.to(device)
    torch.testing.assert_close(fastvq.residual_quantize(wide[:, ::2], codebooks.to(device)).quantized,
                               expected.quantized)


def test_opcheck(backend):
    _, device = backend
    z, codebooks = layered_inputs(9, 2, 5, 3)
    z, codebooks = z.to(device).requires_grad_(True), codebooks.to(device).requires_grad_(True)
    for args in ((z, codebooks, 2, None, "final", True), (z, codebooks, 1, torch.tensor([0, 1, 2] * 3, device=device),
                                                           "per_level", False)):
        torch.library.opcheck(torch.ops.fastvq.residual_quantize.default, args)


class _TinyResidualQuantizer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.codebooks = torch.nn.Parameter(layered_inputs(1, 3, 6, 4)[1])
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        result = fastvq.residual_quantize(self.proj(x), self.codebooks, straight_through="per_level",
                                          return_stats=True)
        return result.quantized, result.commitment.sum() + result.codebook_loss.sum(), result.counts


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = _TinyResidualQuantizer()
    with torch.no_grad():
        model.proj.weight.copy_(torch.eye(4))
        model.proj.bias.zero_()
    from _compile import assert_compiled_training_matches_eager

    assert_compiled_training_matches_eager(model, (16, 4), lambda out: out[0].square().mean() + 0.1 * out[1], steps=2)


@pytest.mark.parametrize(
    ("z", "codebooks", "kwargs", "error", "match"),
    [
        (torch.zeros(4, 3), torch.zeros(5, 3), {}, ValueError, r"codebooks must be 3-D \[L, K, D\]"),
        (torch.zeros(4), torch.zeros(2, 5, 3), {}, ValueError, r"z must be 2-D"),
        (torch.zeros(4, 2), torch.zeros(2, 5, 3), {}, ValueError, r"same last dimension D.*\(4, 2\).*\(2, 5, 3\)"),
        (torch.zeros(4, 3), torch.zeros(0, 5, 3), {}, ValueError, r"L >= 1, K >= 1"),
        (torch.zeros(4, 3), torch.zeros(2, 0, 3), {}, ValueError, r"L >= 1, K >= 1"),
        (torch.zeros(4, 3, dtype=torch.int64), torch.zeros(2, 5, 3), {}, TypeError, r"z must be a floating-point"),
        (torch.zeros(4, 3), torch.zeros(2, 5, 3, dtype=torch.int32), {}, TypeError, r"codebooks must be a floating"),
        ([[0.0]], torch.zeros(2, 5, 1), {}, TypeError, r"z must be a torch.Tensor"),
        (torch.zeros(4, 3), torch.zeros(2, 5, 3), {"n_q": 3}, ValueError, r"n_q must be in \[1, L\] = \[1, 2\]"),
        (torch.zeros(4, 3), torch.zeros(2, 5, 3), {"n_q": 0}, ValueError, r"n_q must be in \[1, L\]"),
        (torch.zeros(4, 3), torch.zeros(2, 5, 3), {"n_q": 1.5}, TypeError, r"n_q must be None, an int"),
        (torch.zeros(4, 3), torch.zeros(2, 5, 3), {"n_q": torch.ones(4)}, TypeError, r"n_q as a tensor must hold"),
        (torch.zeros(4, 3), torch.zeros(2, 5, 3), {"n_q": torch.ones(3, dtype=torch.int64)}, ValueError,
         r"n_q as a tensor must be \[N\] = \[4\].*\(3,\)"),
        (torch.zeros(4, 3), torch.zeros(2, 5, 3), {"straight_through": "encodec"}, ValueError,
         r"straight_through must be one of"),
        (torch.zeros(4, 3), torch.zeros(2, 5, 3, device="meta"), {}, ValueError, r"one device"),
    ],
)
def test_bad_arguments(z, codebooks, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastvq.residual_quantize(z, codebooks, **kwargs)


def test_deterministic_statistics(backend):
    """Under torch.use_deterministic_algorithms(True) the statistics come from the fixed-order path (Triton's
    kernel skips its atomics) and match the reference all the same, bit for bit between two runs."""
    from _parity import deterministic_algorithms

    _, device = backend
    z, codebooks = layered_inputs(40, 3, 9, 5)
    with deterministic_algorithms():
        first = run(z, codebooks, device, n_q=torch.tensor([3, 2, 1, 0] * 10, device=device), return_stats=True)
        second = run(z, codebooks, device, n_q=torch.tensor([3, 2, 1, 0] * 10, device=device), return_stats=True)
    assert torch.equal(first.sums, second.sums) and torch.equal(first.counts, second.counts)
    assert_matches_reference(first, z, codebooks, n_q=torch.tensor([3, 2, 1, 0] * 10))


def test_level_centers_are_each_levels_search_center():
    """The Triton launcher centres all levels in a fixed number of ops; each level's centre is the search's."""
    from fastvq.backends.residual_levels import level_centers
    from fastvq.backends.search_codebook import search_center

    codes = torch.randn(4, 37, 19, generator=torch.Generator().manual_seed(3)) * 3 + 10
    codes[1, 3, 2] = float("nan")
    codes[2, 0] = float("inf")
    codes[3] = 7.0  # no spread: the mean is kept
    torch.testing.assert_close(level_centers(codes), torch.stack([search_center(level) for level in codes]),
                               rtol=0, atol=0)
