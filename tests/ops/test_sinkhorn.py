"""``sinkhorn_assign`` (balanced assignment by fused log-domain Sinkhorn passes) on every backend, against the
float64 reference built on the full ``N x K`` plan, and every contract row of DESIGN.md: ties, NaN, sizes,
layouts, dtypes, bad input, opcheck, torch.compile and torch.distributed (two gloo ranks equal one process)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp
from _backends import backends_for
from _optvq import load_optvq_quantizer
from _parity import assert_rows
from _sinkhorn_ranks import DISTRIBUTED_OPTIONS, random_inputs, sinkhorn_rank

import fastvq
from fastvq import reference

backend = backends_for("sinkhorn_row_pass")

# (metric, normalize, order, epsilon, sum_eps): every metric, normalisation, order and OptVQ's guard at least once.
VARIANTS = [
    ("l2", None, "rows_first", 2.0, 0.0),
    ("l2", "minmax", "rows_first", 0.05, 0.0),
    ("euclidean", "standardize", "columns_first", 0.1, 0.0),
    ("euclidean", "standardize", "columns_first", 0.1, 1e-8),
    ("cosine", "minmax", "columns_first", 0.1, 0.0),
    ("dot", None, "rows_first", 1.0, 1e-3),
    ("dot", "standardize", "rows_first", 0.3, 0.0),
]
VARIANT_IDS = [f"{m}-{n}-{o}-{e:g}" for m, n, o, _, e in VARIANTS]
SHAPES = [(1, 3, 4), (37, 21, 5), (130, 70, 9), (50, 1, 3)]
# Every variant at (37, 21, 5), every shape with the first three variants: the shapes exercise the tiling, the
# variants the arithmetic.
CASES = [(variant, (37, 21, 5)) for variant in VARIANTS] + [
    (variant, shape) for variant in VARIANTS[:3] for shape in SHAPES if shape != (37, 21, 5)]
# Several of the C++ kernels' 256-row blocks, and several column splits.
CASES += [(VARIANTS[0], (600, 40, 6)), (VARIANTS[3], (600, 40, 6))]
CASE_IDS = [f"{VARIANT_IDS[VARIANTS.index(variant)]}-{shape}" for variant, shape in CASES]
# Under Triton's interpreter every tile is a numpy array: shapes that still cross row and code tiles.
INTERPRETED_SHAPES = [(1, 3, 4), (37, 21, 5)]


def interpreted(backend) -> bool:
    return backend[0] == "triton" and backend[1] == "cpu"


def reference_scores(z, codebook, metric, normalize, epsilon, column_potential):
    """float64 ``L_ik + g_k`` with the reference's cost and the given column potentials."""
    cost = reference.sinkhorn_cost_ref(z.cpu(), codebook.cpu(), metric, normalize)
    scores = -cost / epsilon + column_potential.cpu().double()[None, :]
    return scores.nan_to_num(nan=-math.inf)


def assert_matches_reference(z, codebook, result, *, metric, normalize, order, epsilon, iters, tolerance,
                             sum_eps=0.0):
    indices, row_potential, column_potential = (t.cpu() for t in result)
    ref_indices, ref_rows, ref_columns = reference.sinkhorn_assign_ref(
        z.cpu(), codebook.cpu(), epsilon=epsilon, iters=iters, metric=metric, normalize=normalize, order=order,
        sum_eps=sum_eps)
    assert indices.dtype == torch.int64 and tuple(indices.shape) == (z.shape[0],)
    assert tuple(row_potential.shape) == (z.shape[0],) and tuple(column_potential.shape) == (codebook.shape[0],)
    scale = 1.0 + ref_columns.abs().max().item() if codebook.shape[0] else 1.0
    torch.testing.assert_close(column_potential.double(), ref_columns, rtol=0, atol=tolerance * scale)
    torch.testing.assert_close(row_potential.double(), ref_rows, rtol=0, atol=tolerance * scale)
    if z.shape[0] == 0:
        return
    # FAISS-style: the chosen code's reference score is within tolerance of the best, and the index is the
    # reference's wherever the best is clear of the second best.
    scores = reference_scores(z, codebook, metric, normalize, epsilon, ref_columns)
    top = scores.topk(min(2, codebook.shape[0]), dim=1).values
    best = top[:, 0]
    second = top[:, 1] if codebook.shape[0] > 1 else torch.full_like(best, -math.inf)
    chosen = scores.gather(1, indices[:, None]).squeeze(1)
    gap = 10 * tolerance * scale
    assert_rows(chosen >= best - gap, "chosen code's score is below the best", index=indices, best=best,
                chosen=chosen)
    assert_rows((best - second <= gap) | (indices == ref_indices), "index differs where the best is clear",
                index=indices, ref=ref_indices)


@pytest.mark.parametrize("variant, shape", CASES, ids=CASE_IDS)
def test_matches_float64_reference(backend, device, variant, shape):
    if interpreted(backend) and shape not in INTERPRETED_SHAPES:
        pytest.skip("interpreter: small shapes only")
    metric, normalize, order, epsilon, sum_eps = variant
    # Backends that compute in float64 are held to float64; the Triton kernels compute in fp32.
    dtype = torch.float32 if backend[0] == "triton" else torch.float64
    tolerance = 2e-5 if dtype == torch.float32 else 1e-9
    z, codebook = random_inputs(shape, dtype, device)
    result = fastvq.sinkhorn_assign(z, codebook, epsilon=epsilon, iters=4, metric=metric, normalize=normalize,
                                    order=order, sum_eps=sum_eps)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert result[1].dtype == expected_dtype and result[2].dtype == expected_dtype
    assert_matches_reference(z, codebook, result, metric=metric, normalize=normalize, order=order, epsilon=epsilon,
                             iters=4, tolerance=tolerance, sum_eps=sum_eps)


def test_reference_is_the_exp_domain_sinkhorn():
    """The log-domain reference against the plain scaling iteration (``u = a / (K v)``, ``v = b / (K^T u)``)."""
    z, codebook = random_inputs((40, 12, 6), torch.float64)
    epsilon = 0.5
    kernel = torch.exp(-torch.cdist(z, codebook) ** 2 / epsilon)
    u, v = torch.ones(40, dtype=torch.float64), torch.ones(12, dtype=torch.float64)
    for _ in range(7):
        u = (1 / 40) / (kernel @ v)
        v = (1 / 12) / (kernel.T @ u)
    plan = u[:, None] * kernel * v[None, :]
    indices, f, g = reference.sinkhorn_assign_ref(z, codebook, epsilon=epsilon, iters=7)
    ours = torch.exp(f[:, None] - reference.sinkhorn_cost_ref(z, codebook) / epsilon + g[None, :])
    torch.testing.assert_close(ours, plan, rtol=1e-9, atol=0)
    assert torch.equal(indices, plan.argmax(dim=1))
    torch.testing.assert_close(plan.sum(dim=0), torch.full((12,), 1 / 12, dtype=torch.float64))


def test_matches_optvq_sinkhorn(optvq_quantizer):
    """OptVQ's own ``sinkhorn`` on its normalised cdist cost: ``order="columns_first"``, ``normalize="standardize"``,
    ``metric="euclidean"``, ``epsilon = 1 / its epsilon`` and its ``1e-8`` guard give its plan (times N) and its
    argmax; on this input a code is far from every row, and without the guard the plan differs."""
    z, codebook = random_inputs((60, 16, 8), torch.float64)
    optvq_epsilon, iters = 10.0, 5
    layer = optvq_quantizer.VectorQuantizerSinkhorn(epsilon=optvq_epsilon, n_iters=iters, n_e=16, e_dim=8)
    cost = layer.normalize(torch.cdist(z, codebook), dim=8, mode="all")
    theirs = optvq_quantizer.sinkhorn(cost, n_iters=iters, epsilon=optvq_epsilon)
    for name, device_backend in (("reference", None), ("op", "default")):
        function = reference.sinkhorn_assign_ref if device_backend is None else fastvq.sinkhorn_assign
        options = dict(epsilon=1 / optvq_epsilon, iters=iters, metric="euclidean", normalize="standardize",
                       order="columns_first")
        indices, f, g = function(z, codebook, sum_eps=1e-8, **options)
        plan = torch.exp(f[:, None] - cost * optvq_epsilon + g[None, :]) * z.shape[0]
        torch.testing.assert_close(plan, theirs, rtol=1e-9, atol=1e-12, msg=name)
        assert torch.equal(indices, theirs.argmax(dim=1)), name
        _, f, g = function(z, codebook, **options)
        exact = torch.exp(f[:, None] - cost * optvq_epsilon + g[None, :]) * z.shape[0]
        assert (exact - theirs).abs().max() > 1e-3, name


def test_zero_iterations_is_the_nearest_code(backend, device):
    z, codebook = random_inputs((37, 21, 5), torch.float32, device)
    indices, f, g = fastvq.sinkhorn_assign(z, codebook, epsilon=0.1, iters=0)
    assert torch.equal(indices, fastvq.nearest_code(z, codebook)[0])
    assert not f.any() and not g.any()


def test_balances_a_lopsided_assignment(backend, device):
    """Half the rows are nearest to code 0 and three codes to none; the balanced assignment uses every code
    about equally (the argmax of an entropic plan is balanced only approximately)."""
    generator = torch.Generator().manual_seed(0)
    codebook = torch.randn(8, 2, generator=generator) * 3
    codebook[0] = 0
    z = torch.randn(64, 2, generator=generator)
    z, codebook = z.to(device), codebook.to(device)
    assert torch.bincount(fastvq.nearest_code(z, codebook)[0].cpu(), minlength=8).tolist() == [33, 12, 0, 0, 0, 11,
                                                                                                4, 4]
    indices, _, _ = fastvq.sinkhorn_assign(z, codebook, epsilon=0.03, iters=20, normalize="minmax")
    counts = torch.bincount(indices.cpu(), minlength=8)
    assert counts.min() >= 5 and counts.max() <= 10, counts.tolist()


def test_ties_go_to_the_lowest_index(backend, device):
    z, codebook = random_inputs((30, 6, 4), torch.float32, device)
    codebook = torch.cat([codebook, codebook[1:2], codebook[3:4]])  # codes 6 and 7 repeat codes 1 and 3
    indices, _, g = fastvq.sinkhorn_assign(z, codebook, epsilon=0.5, iters=3)
    assert g[6] == g[1] and g[7] == g[3]
    assert not ((indices == 6) | (indices == 7)).any()
    assert ((indices == 1) | (indices == 3)).any()


def test_nan_rows_carry_no_mass(backend, device):
    z, codebook = random_inputs((20, 7, 4), torch.float32, device)
    z[5] = float("nan")
    z[9, 2] = float("nan")
    indices, f, g = fastvq.sinkhorn_assign(z, codebook, epsilon=0.5, iters=3, normalize="standardize")
    assert indices[5] == 0 and indices[9] == 0
    assert f[5] == -math.inf and f[9] == -math.inf
    assert torch.isfinite(g).all() and torch.isfinite(f[[0, 1, 2, 3, 4, 6, 7, 8]]).all()
    assert_matches_reference(z, codebook, (indices, f, g), metric="l2", normalize="standardize", order="rows_first",
                             epsilon=0.5, iters=3, tolerance=2e-5)


def test_empty_batch(backend, device):
    z, codebook = random_inputs((0, 5, 3), torch.float32, device)
    indices, f, g = fastvq.sinkhorn_assign(z, codebook, epsilon=0.5, iters=2, normalize="minmax")
    assert indices.shape == (0,) and f.shape == (0,) and indices.dtype == torch.int64
    assert g.shape == (5,) and (g == -math.inf).all()  # no row: no code can receive mass


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_inputs_accumulate_in_fp32(backend, device, dtype):
    z, codebook = random_inputs((37, 21, 5), dtype, device)
    result = fastvq.sinkhorn_assign(z, codebook, epsilon=0.1, iters=3, normalize="minmax")
    assert result[1].dtype == torch.float32 and result[2].dtype == torch.float32
    # Against the float64 reference on the same (rounded) inputs: only fp32 accumulation error remains.
    assert_matches_reference(z.double(), codebook.double(), result, metric="l2", normalize="minmax",
                             order="rows_first", epsilon=0.1, iters=3, tolerance=1e-4)


def test_layouts_and_mixed_dtypes(backend, device):
    z, codebook = random_inputs((37, 21, 5), torch.float32, device)
    expected = fastvq.sinkhorn_assign(z, codebook, epsilon=0.2, iters=3, normalize="standardize")
    strided = fastvq.sinkhorn_assign(z.t().contiguous().t(), codebook.t().contiguous().t(), epsilon=0.2, iters=3,
                                     normalize="standardize")
    for ours, theirs in zip(strided, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    half = fastvq.sinkhorn_assign(z.half(), codebook, epsilon=0.2, iters=3, normalize="standardize")
    assert_matches_reference(z.half().double(), codebook.double(), half, metric="l2", normalize="standardize",
                             order="rows_first", epsilon=0.2, iters=3, tolerance=2e-5)


BAD_INPUTS = [
    (dict(z=torch.zeros(4, 3, 2)), ValueError, "z must be 2-D"),
    (dict(codebook=torch.zeros(5)), ValueError, "codebook must be 2-D"),
    (dict(codebook=torch.zeros(5, 4)), ValueError, "same last dimension"),
    (dict(codebook=torch.zeros(0, 3)), ValueError, "K >= 1"),
    (dict(z=torch.zeros(4, 3, dtype=torch.int64)), TypeError, "z must be a floating-point"),
    (dict(z=[[0.0] * 3]), TypeError, "z must be a torch.Tensor"),
    (dict(epsilon=0.0), ValueError, "epsilon must be a float > 0"),
    (dict(epsilon=float("nan")), ValueError, "epsilon must be a finite float"),
    (dict(iters=-1), ValueError, "iters must be an int >= 0"),
    (dict(iters=2.0), ValueError, "iters must be an int >= 0"),
    (dict(metric="l1"), ValueError, "metric must be one of"),
    (dict(normalize="max"), ValueError, "normalize must be one of"),
    (dict(order="both"), ValueError, "order must be one of"),
    (dict(sum_eps=-1e-8), ValueError, "sum_eps must be a float >= 0"),
]


@pytest.mark.parametrize("change, error, message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_names_the_argument(change, error, message):
    arguments = dict(z=torch.zeros(4, 3), codebook=torch.zeros(5, 3), epsilon=0.5, iters=2, metric="l2",
                     normalize=None, order="rows_first")
    arguments.update(change)
    z, codebook = arguments.pop("z"), arguments.pop("codebook")
    with pytest.raises(error, match=message):
        fastvq.sinkhorn_assign(z, codebook, **arguments)


def test_opcheck(backend, device):
    z, codebook = random_inputs((9, 20, 4) if interpreted(backend) else (19, 21, 18), torch.float32, device)
    affine = torch.tensor([0.1, 2.0], device=device)
    torch.library.opcheck(torch.ops.fastvq.sinkhorn_cost_stats.default, (z, codebook, "euclidean"))
    for argmax in (False, True):
        torch.library.opcheck(torch.ops.fastvq.sinkhorn_row_pass.default,
                              (z, codebook, torch.randn(20 if z.shape[0] == 9 else 21, device=device), "cosine",
                               affine, argmax))
    torch.library.opcheck(torch.ops.fastvq.sinkhorn_column_pass.default,
                          (z, codebook, torch.randn(z.shape[0], device=device), "dot", affine))


def test_compiles_without_graph_break():
    class Balanced(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.codebook = torch.nn.Parameter(torch.randn(21, 5))

        def forward(self, z):
            indices, _, _ = fastvq.sinkhorn_assign(z, self.codebook, epsilon=0.1, iters=3, normalize="minmax")
            quantized = self.codebook[indices]
            return z + (quantized - z).detach(), (quantized - z.detach()).square().mean()

    torch.manual_seed(0)
    model = Balanced()
    z = torch.randn(37, 5, requires_grad=True)
    eager_out, eager_loss = model(z)
    # aot_eager: the graph capture and the fake functions are what this checks; inductor adds only compile time.
    compiled_out, compiled_loss = torch.compile(model, fullgraph=True, backend="aot_eager")(z)
    torch.testing.assert_close(compiled_out, eager_out)
    torch.testing.assert_close(compiled_loss, eager_loss)
    compiled_loss.backward()
    assert model.codebook.grad is not None


# --------------------------------------------------------------------------- torch.distributed


@pytest.mark.parametrize("split", [13])
def test_two_ranks_equal_one_process(tmp_path, split):
    mp.spawn(sinkhorn_rank, args=(2, str(tmp_path / "store"), split, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    z, codebook = random_inputs((40, 9, 5), torch.float64)
    indices, f, g = fastvq.sinkhorn_assign(z, codebook, **DISTRIBUTED_OPTIONS)
    assert torch.equal(torch.cat([ranks[0][0], ranks[1][0]]), indices)
    torch.testing.assert_close(torch.cat([ranks[0][1], ranks[1][1]]), f, rtol=0, atol=1e-12)
    for rank in ranks:
        torch.testing.assert_close(rank[2], g, rtol=0, atol=1e-12)
    # One process alone on a shard solves another problem (its N and statistics differ): the ranks combined.
    alone = fastvq.sinkhorn_assign(z[split:], codebook, **DISTRIBUTED_OPTIONS)
    assert split == 0 or not torch.allclose(alone[2], g)


@pytest.fixture(scope="module")
def optvq_quantizer():
    return load_optvq_quantizer()
