"""The rules every op keeps on every backend (DESIGN.md, "The ops and their contracts").

One section per row of the contract table: backend dispatch, bad input, fp32 accuracy, ties, NaN,
sizes, layouts, dtypes and determinism. Parity over shapes lives in the per-op test files.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from _backends import HAS_TRITON
from _parity import (
    CODEBOOK_LAYOUTS,
    DISTANCE_ATOL,
    DISTANCE_RTOL,
    DTYPE_IDS,
    DTYPES,
    DUPLICATE_GROUPS,
    LAYOUT_ROWS,
    METRICS,
    Z_LAYOUTS,
    assert_search_parity,
    deterministic_algorithms,
    layout_inputs,
    row_scale,
    strided,
    transposed,
)

import fastvq
from fastvq import backends, reference
from fastvq.backends.torch import search as torch_search

# --------------------------------------------------------------------------- backend dispatch

# Each backend's modules; the op layer looks the function up on the module at every call.
ENTRY_POINTS = {
    "torch": [("fastvq.backends.torch.search", "nearest_code"),
              ("fastvq.backends.torch.segment_reduce", "segment_reduce"),
              ("fastvq.backends.torch.vector_quantize", "vector_quantize_backward")],
    "triton": [("fastvq.backends.triton.search", "nearest_code"),
               ("fastvq.backends.triton.segment_reduce", "segment_reduce"),
               ("fastvq.backends.triton.vector_quantize", "vector_quantize_backward")],
    "cpp": [("fastvq.backends.cpp", "nearest_code"), ("fastvq.backends.cpp", "segment_reduce")],
}
# FASTVQ_BACKEND=cuda runs the same binding module as cpp: fastvq._C picks the kernel by device.
ENTRY_POINTS_OF = {"cuda": "cpp"}


def _entry_points():
    for backend_name, entries in ENTRY_POINTS.items():
        if backend_name == "triton" and not HAS_TRITON:
            continue
        for module_name, function_name in entries:
            yield backend_name, importlib.import_module(module_name), function_name


@pytest.fixture
def backend_calls(monkeypatch):
    """Records ``(backend, function)`` for every backend entry point that runs."""
    calls = []
    for backend_name, module, function_name in _entry_points():
        original = getattr(module, function_name)

        def recording(*args, _original=original, _name=(backend_name, function_name), **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, function_name, recording)
    return calls


@pytest.fixture
def no_kernel_may_run(monkeypatch):
    """Makes every backend entry point fail the test, to prove an error is raised before them."""
    for backend_name, module, function_name in _entry_points():
        def refuse(*args, _name=f"{backend_name}:{function_name}", **kwargs):
            raise AssertionError(f"{_name} ran before the bad input was rejected")

        monkeypatch.setattr(module, function_name, refuse)


def test_every_op_runs_on_the_selected_backend(backend, device, backend_calls):
    backend_name, _ = backend
    for dtype in DTYPES:
        assert backends.select_backend(torch.empty(0, device=device), dtype) == backend_name

    def runs(op):
        # The table's row for the op, seen as the entry-point module that records it.
        ran = backends.route(op, backend_name)
        return ENTRY_POINTS_OF.get(ran, ran)

    z = torch.randn(20, 6, device=device, requires_grad=True)
    codebook = torch.randn(9, 6, device=device, requires_grad=True)
    fastvq.nearest_code(z.detach(), codebook.detach())
    quantized, indices, loss = fastvq.vector_quantize(z, codebook)
    (quantized.sum() + loss).backward()
    fastvq.segment_reduce(z.detach(), indices, 9)
    fastvq.ema_update_(codebook.detach().clone(), torch.ones(9, device=device), codebook.detach().clone(),
                       z.detach(), indices)
    assert backend_calls == [
        (runs("nearest_code"), "nearest_code"),
        (runs("nearest_code"), "nearest_code"),
        (runs("vector_quantize_backward"), "vector_quantize_backward"),
        (runs("segment_reduce"), "segment_reduce"),
        (runs("segment_reduce"), "segment_reduce"),
    ]


# --------------------------------------------------------------------------- bad input


def _search_inputs(z_shape=(4, 3), codebook_shape=(5, 3), z_dtype=torch.float32, codebook_dtype=torch.float32,
                   codebook_device="cpu"):
    z = torch.zeros(z_shape).to(z_dtype)
    codebook = torch.zeros(codebook_shape).to(codebook_dtype).to(codebook_device)
    return z, codebook


SEARCH_CALLERS = {
    "fastvq.nearest_code": lambda z, codebook, metric: fastvq.nearest_code(z, codebook, metric=metric),
    "torch.ops.fastvq.nearest_code": lambda z, codebook, metric: torch.ops.fastvq.nearest_code(
        z, codebook, metric, True
    ),
    "fastvq.vector_quantize": lambda z, codebook, metric: fastvq.vector_quantize(z, codebook, metric=metric),
    "torch.ops.fastvq.vector_quantize": lambda z, codebook, metric: torch.ops.fastvq.vector_quantize(
        z, codebook, metric, 0.25, 1.0
    ),
}

BAD_SEARCH_INPUTS = [
    pytest.param(dict(z_shape=(2, 4, 3)), "l2", ValueError, r"z must be 2-D.*\(2, 4, 3\)", id="z-rank-3"),
    pytest.param(dict(z_shape=(3,)), "l2", ValueError, r"z must be 2-D.*\(3,\)", id="z-rank-1"),
    pytest.param(dict(codebook_shape=(5,)), "l2", ValueError, r"codebook must be 2-D.*\(5,\)", id="codebook-rank-1"),
    pytest.param(dict(codebook_shape=(5, 2)), "l2", ValueError,
                 r"same last dimension.*z of shape \(4, 3\).*codebook of shape \(5, 2\)", id="mismatched-D"),
    pytest.param(dict(codebook_shape=(0, 3)), "l2", ValueError, r"codebook.*K >= 1.*\(0, 3\)", id="K-0"),
    pytest.param(dict(z_dtype=torch.int64), "l2", TypeError, r"z must be a floating-point.*int64.*\(4, 3\)",
                 id="z-int64"),
    pytest.param(dict(codebook_dtype=torch.int32), "l2", TypeError,
                 r"codebook must be a floating-point.*int32.*\(5, 3\)", id="codebook-int32"),
    pytest.param(dict(codebook_dtype=torch.bool), "l2", TypeError, r"codebook must be a floating-point.*bool",
                 id="codebook-bool"),
    pytest.param(dict(codebook_device="meta"), "l2", ValueError, r"one device.*z on cpu, codebook on meta",
                 id="different-devices"),
    pytest.param({}, "l3", ValueError, r"metric must be one of \('l2', 'cosine', 'dot'\), got 'l3'",
                 id="unknown-metric"),
]


@pytest.mark.parametrize(("inputs", "metric", "error", "message"), BAD_SEARCH_INPUTS)
@pytest.mark.parametrize("caller", list(SEARCH_CALLERS))
def test_bad_search_input_is_rejected_before_any_kernel(backend, no_kernel_may_run, caller, inputs, metric, error,
                                                        message):
    z, codebook = _search_inputs(**inputs)
    with pytest.raises(error, match=message):
        SEARCH_CALLERS[caller](z, codebook, metric)


@pytest.mark.parametrize("caller", ["fastvq.nearest_code", "fastvq.vector_quantize"])
def test_non_tensor_is_a_type_error(backend, no_kernel_may_run, caller):
    z, codebook = _search_inputs()
    with pytest.raises(TypeError, match=r"z must be a torch.Tensor, got list"):
        SEARCH_CALLERS[caller](z.tolist(), codebook, "l2")
    with pytest.raises(TypeError, match=r"codebook must be a torch.Tensor, got ndarray"):
        SEARCH_CALLERS[caller](z, codebook.numpy(), "l2")


@pytest.mark.parametrize("caller", ["torch.ops.fastvq.nearest_code", "torch.ops.fastvq.vector_quantize"])
def test_operator_schema_rejects_non_tensors(backend, no_kernel_may_run, caller):
    """The dispatcher checks an operator's argument types against its schema before fastvq's
    checks run, and answers with its own RuntimeError, which names the argument."""
    z, codebook = _search_inputs()
    with pytest.raises(RuntimeError, match=r"Expected a value of type 'Tensor' for argument 'z'"):
        SEARCH_CALLERS[caller](z.tolist(), codebook, "l2")


@pytest.mark.parametrize(
    ("weights", "message"),
    [(dict(beta=float("nan")), r"beta must be a finite float, got nan"),
     (dict(codebook_weight=float("inf")), r"codebook_weight must be a finite float, got inf"),
     (dict(beta="0.25"), r"beta must be a finite float, got '0.25'")],
    ids=["beta-nan", "codebook_weight-inf", "beta-str"],
)
def test_vector_quantize_rejects_non_finite_weights(backend, no_kernel_may_run, weights, message):
    z, codebook = _search_inputs()
    with pytest.raises(ValueError, match=message):
        fastvq.vector_quantize(z, codebook, **weights)


SEGMENT_CALLERS = {
    "fastvq.segment_reduce": lambda values, indices, num_codes: fastvq.segment_reduce(values, indices, num_codes),
    "torch.ops.fastvq.segment_reduce": lambda values, indices, num_codes: torch.ops.fastvq.segment_reduce(
        values, indices, num_codes, False
    ),
}

BAD_SEGMENT_INPUTS = [
    pytest.param(dict(values=torch.zeros(4)), ValueError, r"values must be 2-D.*\(4,\)", id="values-rank-1"),
    pytest.param(dict(values=torch.zeros(4, 3, dtype=torch.int64)), TypeError,
                 r"values must be a floating-point.*int64.*\(4, 3\)", id="values-int64"),
    pytest.param(dict(indices=torch.zeros(4)), TypeError, r"indices must be an int64 or int32.*float32",
                 id="indices-float"),
    pytest.param(dict(indices=torch.zeros(5, dtype=torch.int64)), ValueError, r"indices must be 1-D with 4.*\(5,\)",
                 id="indices-length"),
    pytest.param(dict(indices=torch.zeros(4, 1, dtype=torch.int64)), ValueError, r"indices must be 1-D.*\(4, 1\)",
                 id="indices-rank-2"),
    pytest.param(dict(num_codes=0), ValueError, r"num_codes must be an int >= 1, got 0", id="K-0"),
    pytest.param(dict(indices=torch.zeros(4, dtype=torch.int64, device="meta")), ValueError,
                 r"one device.*values on cpu, indices on meta", id="different-devices"),
]


@pytest.mark.parametrize(("overrides", "error", "message"), BAD_SEGMENT_INPUTS)
@pytest.mark.parametrize("caller", list(SEGMENT_CALLERS))
def test_bad_segment_input_is_rejected_before_any_kernel(backend, no_kernel_may_run, caller, overrides, error, message):
    arguments = dict(values=torch.zeros(4, 3), indices=torch.zeros(4, dtype=torch.int64), num_codes=5)
    arguments.update(overrides)
    with pytest.raises(error, match=message):
        SEGMENT_CALLERS[caller](**arguments)


EMA_CALLERS = {
    "fastvq.ema_update_": lambda codebook, cluster_size, embed_avg, z, indices, decay, eps, step: fastvq.ema_update_(
        codebook, cluster_size, embed_avg, z, indices, decay=decay, eps=eps, step=step
    ),
    "torch.ops.fastvq.ema_update_": lambda *arguments: torch.ops.fastvq.ema_update_(*arguments, False),
}

BAD_EMA_INPUTS = [
    pytest.param(dict(codebook=torch.zeros(0, 3)), ValueError,
                 r"codebook must be 2-D \[K, D\] with K, D >= 1.*\(0, 3\)", id="K-0"),
    pytest.param(dict(codebook=torch.zeros(5, 3, 1)), ValueError, r"codebook must be 2-D.*\(5, 3, 1\)",
                 id="codebook-rank-3"),
    pytest.param(dict(cluster_size=torch.zeros(4)), ValueError, r"cluster_size must have shape \(5,\).*\(4,\)",
                 id="cluster_size-shape"),
    pytest.param(dict(embed_avg=torch.zeros(5, 2)), ValueError, r"embed_avg must have shape \(5, 3\).*\(5, 2\)",
                 id="embed_avg-shape"),
    pytest.param(dict(z=torch.zeros(4, 2)), ValueError, r"z must be 2-D \[N, 3\].*\(4, 2\)", id="mismatched-D"),
    pytest.param(dict(z=torch.zeros(4, 3, dtype=torch.int32)), TypeError,
                 r"z must be a floating-point.*int32.*\(4, 3\)", id="z-int32"),
    pytest.param(dict(cluster_size=torch.zeros(5, dtype=torch.int64)), TypeError,
                 r"cluster_size must be a floating-point.*int64.*\(5,\)", id="cluster_size-int64"),
    pytest.param(dict(indices=torch.zeros(4)), TypeError, r"indices must be an int64 or int32", id="indices-float"),
    pytest.param(dict(indices=torch.zeros(3, dtype=torch.int64)), ValueError, r"indices must be 1-D with 4.*\(3,\)",
                 id="indices-length"),
    pytest.param(dict(step=torch.zeros(2)), ValueError, r"step must be a one-element.*\(2,\)", id="step-shape"),
    pytest.param(dict(embed_avg=torch.zeros(5, 3, device="meta")), ValueError,
                 r"one device.*codebook on cpu.*embed_avg on meta", id="different-devices"),
    pytest.param(dict(decay=1.0), ValueError, r"decay must be a float in \[0, 1\), got 1.0", id="decay-1"),
    pytest.param(dict(decay=-0.5), ValueError, r"decay must be a float in \[0, 1\), got -0.5", id="decay-negative"),
    pytest.param(dict(eps=-1e-5), ValueError, r"eps must be a float >= 0", id="eps-negative"),
]


@pytest.mark.parametrize(("overrides", "error", "message"), BAD_EMA_INPUTS)
@pytest.mark.parametrize("caller", list(EMA_CALLERS))
def test_bad_ema_input_is_rejected_before_any_kernel(backend, no_kernel_may_run, caller, overrides, error, message):
    arguments = dict(codebook=torch.zeros(5, 3), cluster_size=torch.ones(5), embed_avg=torch.zeros(5, 3),
                     z=torch.zeros(4, 3), indices=torch.zeros(4, dtype=torch.int64), decay=0.9, eps=1e-5, step=None)
    arguments.update(overrides)
    untouched = {name: value.clone() for name, value in arguments.items()
                 if isinstance(value, torch.Tensor) and value.device.type != "meta"}
    with pytest.raises(error, match=message):
        EMA_CALLERS[caller](*arguments.values())
    for name, before in untouched.items():
        assert torch.equal(arguments[name], before), f"{name} was modified by a rejected call"


def test_ema_update_rejects_non_tensor_state(backend, no_kernel_may_run):
    with pytest.raises(TypeError, match=r"cluster_size must be a torch.Tensor, got list"):
        fastvq.ema_update_(torch.zeros(5, 3), [1.0] * 5, torch.zeros(5, 3), torch.zeros(4, 3),
                           torch.zeros(4, dtype=torch.int64))


# --------------------------------------------------------------------------- fp32 accuracy


def grid_inputs(num_rows, num_codes, dim, seed=0):
    """Values on a 1/1024 grid in [-4, 4]: shifted by a few thousand they stay exact in fp32, so the
    shifted problem has exactly the same true distances as the original."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randint(-4096, 4097, (num_rows, dim), generator=generator) / 1024.0
    codebook = torch.randint(-4096, 4097, (num_codes, dim), generator=generator) / 1024.0
    return z, codebook


@pytest.mark.parametrize("shift", [1000.0, -3000.0])
def test_fp32_search_is_accurate_far_from_the_origin(backend, device, shift):
    """``z^2 + e^2 - 2 z.e`` in fp32 cancels catastrophically here (terms ~1e8, distances ~1e2);
    the contract asks for the chosen code within 1e-5 of the best, and the same answer as unshifted."""
    z, codebook = grid_inputs(127, 129, 17)
    shifted_z, shifted_codebook = (z + shift).to(device), (codebook + shift).to(device)
    assert torch.equal(shifted_z.cpu() - shift, z) and torch.equal(shifted_codebook.cpu() - shift, codebook)

    shifted = fastvq.nearest_code(shifted_z, shifted_codebook, return_codes=True)
    assert_search_parity(shifted_z, shifted_codebook, "l2", *shifted)
    original = fastvq.nearest_code(z.to(device), codebook.to(device))
    assert_search_parity(z, codebook, "l2", *original)

    truth = reference.distance_matrix_ref(z, codebook)
    same = shifted[0].cpu() == original[0].cpu()
    best, second = truth.topk(2, dim=1, largest=False).values.unbind(1)
    clear = (second - best) > 1e-5 * row_scale(truth)
    changed = (~same & clear).nonzero().flatten()
    assert not changed.numel(), f"shifting changed the index of rows {changed.tolist()}, whose best code is clear"
    torch.testing.assert_close(shifted[1][same], original[1][same], rtol=DISTANCE_RTOL, atol=DISTANCE_ATOL)


# --------------------------------------------------------------------------- ties

@pytest.fixture(params=["default-chunks", "16-code-chunks"])
def torch_chunking(request, monkeypatch):
    """Runs a test with the torch backend's default chunks and again walking the codebook 16 codes
    at a time, as the interpreted Triton kernel tiles it, so ties across its chunks are exercised."""
    if request.param == "16-code-chunks":
        monkeypatch.setattr(backends.common, "CHUNK_BYTES", 16 * torch_search._SLAB_BYTES_PER_SCORE)
        assert torch_search._chunk_sizes(20, 300)[1] == 16


def tied_inputs(dtype, device):
    """Rows close to one of two repeated codes, which beat every other code under every metric."""
    generator = torch.Generator().manual_seed(5)
    dim = 8
    codebook = 0.1 * torch.randn(300, dim, generator=generator)
    directions = torch.randn(len(DUPLICATE_GROUPS), dim, generator=generator)
    group_codes = 3.0 * torch.nn.functional.normalize(directions, dim=1)
    for group, positions in enumerate(DUPLICATE_GROUPS):
        codebook[list(positions)] = group_codes[group]
    group_of_row = torch.arange(20) % len(DUPLICATE_GROUPS)
    z = group_codes[group_of_row] + 0.01 * torch.randn(20, dim, generator=generator)
    expected = torch.tensor([DUPLICATE_GROUPS[group][0] for group in group_of_row.tolist()])
    return z.to(device=device, dtype=dtype), codebook.to(device=device, dtype=dtype), expected


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ties_go_to_the_lowest_index_whatever_the_tiling(backend, device, dtype, metric, torch_chunking):
    z, codebook, expected = tied_inputs(dtype, device)
    indices, distances = fastvq.nearest_code(z, codebook, metric=metric)
    assert torch.equal(indices.cpu(), expected), f"got {indices.tolist()}, expected {expected.tolist()}"
    _, loss_indices, _ = fastvq.vector_quantize(z, codebook, metric=metric)
    assert torch.equal(loss_indices.cpu(), expected)


@pytest.mark.parametrize("metric", METRICS)
def test_all_equal_codebook_gives_index_zero(backend, device, metric, torch_chunking):
    generator = torch.Generator().manual_seed(6)
    codebook = torch.randn(1, 17, generator=generator).expand(100, 17).contiguous().to(device)
    z = torch.randn(40, 17, generator=generator).to(device)
    indices, _ = fastvq.nearest_code(z, codebook, metric=metric)
    assert not indices.any(), f"non-zero indices at rows {indices.nonzero().flatten().tolist()}"


# --------------------------------------------------------------------------- NaN and Inf


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nan_codes_never_win(backend, device, dtype, metric):
    generator = torch.Generator().manual_seed(7)
    z = torch.randn(50, 17, generator=generator)
    codebook = torch.randn(40, 17, generator=generator)
    nan_codes = [0, 17, 39]
    codebook[nan_codes, 5] = float("nan")
    z, codebook = z.to(device=device, dtype=dtype), codebook.to(device=device, dtype=dtype)
    indices, distances, codes = fastvq.nearest_code(z, codebook, metric=metric, return_codes=True)
    assert not torch.isin(indices.cpu(), torch.tensor(nan_codes)).any()
    assert distances.isfinite().all()
    assert_search_parity(z, codebook, metric, indices, distances, codes)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nan_rows_get_index_zero_and_nan_distance(backend, device, dtype, metric):
    generator = torch.Generator().manual_seed(8)
    z = torch.randn(50, 17, generator=generator)
    codebook = torch.randn(40, 17, generator=generator)
    nan_rows = [0, 21, 49]
    z[nan_rows, 3] = float("nan")
    z, codebook = z.to(device=device, dtype=dtype), codebook.to(device=device, dtype=dtype)
    indices, distances, codes = fastvq.nearest_code(z, codebook, metric=metric, return_codes=True)
    assert not indices[nan_rows].any()
    assert distances[nan_rows].isnan().all()
    assert torch.equal(codes[nan_rows], codebook[[0, 0, 0]])
    assert_search_parity(z, codebook, metric, indices, distances, codes)


def test_nan_row_turns_the_loss_nan(backend, device):
    z = torch.randn(30, 9, device=device)
    z[4, 2] = float("nan")
    _, indices, loss = fastvq.vector_quantize(z, torch.randn(12, 9, device=device))
    assert loss.isnan() and indices[4] == 0


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("metric", METRICS)
def test_inf_inputs_do_not_crash(backend, device, metric):
    generator = torch.Generator().manual_seed(9)
    z = torch.randn(40, 17, generator=generator)
    codebook = torch.randn(30, 17, generator=generator)
    inf_codes, inf_rows = [2, 29], [5, 6]
    codebook[2, 4] = float("inf")
    codebook[29] = float("-inf")
    z[5, 1] = float("inf")
    z[6] = float("-inf")
    z, codebook = z.to(device), codebook.to(device)
    indices, distances, codes = fastvq.nearest_code(z, codebook, metric=metric, return_codes=True)
    assert ((indices >= 0) & (indices < codebook.shape[0])).all()
    assert torch.equal(codes, codebook[indices])
    if metric != "dot":  # an infinite code is infinitely far under l2 and cosine, never nearest
        finite_rows = torch.ones(40, dtype=torch.bool)
        finite_rows[inf_rows] = False
        assert not torch.isin(indices[finite_rows].cpu(), torch.tensor(inf_codes)).any()
        assert_search_parity(z[finite_rows], codebook, metric, indices[finite_rows], distances[finite_rows])


def test_zero_vectors_have_cosine_distance_one(backend, device):
    """A zero vector has cosine 0 to every code (F.normalize's convention): all tie, index 0."""
    z = torch.randn(6, 5, device=device)
    z[2] = 0
    codebook = torch.randn(7, 5, device=device)
    codebook[4] = 0
    indices, distances = fastvq.nearest_code(z, codebook, metric="cosine")
    assert indices[2] == 0 and distances[2] == 1
    assert_search_parity(z, codebook, "cosine", indices, distances)


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("z_dtype", "codebook_dtype"),
    [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
     (torch.float16, torch.float32)],
    ids=["fp32", "fp16", "bf16", "fp16-fp32"],
)
def test_empty_batch_returns_empty_outputs(backend, device, z_dtype, codebook_dtype):
    z = torch.empty(0, 13, device=device, dtype=z_dtype)
    codebook = torch.randn(7, 13, device=device).to(codebook_dtype)
    out_dtype = torch.promote_types(z_dtype, codebook_dtype)
    indices, distances, codes = fastvq.nearest_code(z, codebook, return_codes=True)
    assert indices.shape == (0,) and indices.dtype == torch.int64 and indices.device == z.device
    assert distances.shape == (0,) and distances.dtype == torch.float32
    assert codes.shape == (0, 13) and codes.dtype == out_dtype
    quantized, indices, loss = fastvq.vector_quantize(z, codebook)
    assert quantized.shape == (0, 13) and quantized.dtype == out_dtype and indices.shape == (0,)
    assert loss.dtype == torch.float32 and float(loss) == 0.0


def test_single_code_and_single_dimension(backend, device):
    z = torch.randn(37, 1, device=device)
    indices, distances, codes = fastvq.nearest_code(z, torch.tensor([[0.5]], device=device), return_codes=True)
    assert not indices.any()
    torch.testing.assert_close(distances, (z[:, 0] - 0.5) ** 2)
    assert torch.equal(codes, torch.full((37, 1), 0.5, device=device))


# --------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("codebook_layout", list(CODEBOOK_LAYOUTS))
@pytest.mark.parametrize("z_layout", list(Z_LAYOUTS))
def test_search_ignores_layout(backend, device, z_layout, codebook_layout, metric):
    z, codebook = layout_inputs(device)
    expected = fastvq.nearest_code(z, codebook, metric=metric, return_codes=True)
    actual = fastvq.nearest_code(Z_LAYOUTS[z_layout](z), CODEBOOK_LAYOUTS[codebook_layout](codebook), metric=metric,
                                 return_codes=True)
    differing = (actual[0] != expected[0]).nonzero().flatten()
    assert not differing.numel(), f"indices differ at rows {differing.tolist()}"
    torch.testing.assert_close(actual[1], expected[1], rtol=1e-6, atol=1e-6)
    assert torch.equal(actual[2], expected[2])


def test_search_of_broadcast_rows(backend, device):
    """A zero row stride (``expand``) reads the same row for every output."""
    z, codebook = layout_inputs(device)
    expanded = z[:1].expand(LAYOUT_ROWS, -1)
    indices, distances = fastvq.nearest_code(expanded, codebook)
    expected_indices, expected_distances = fastvq.nearest_code(z[:1].repeat(LAYOUT_ROWS, 1), codebook)
    assert torch.equal(indices, expected_indices) and torch.equal(distances, expected_distances)


@pytest.mark.parametrize("deterministic", [True, False], ids=["sorted", "atomic"])
def test_vector_quantize_ignores_layout(backend, device, deterministic):
    """Non-contiguous z, codebook and upstream gradient give the outputs and gradients of contiguous ones."""
    z, codebook = layout_inputs(device, seed=11)
    upstream = torch.randn_like(z)

    def run(z, codebook, upstream):
        z, codebook = z.detach().requires_grad_(True), codebook.detach().requires_grad_(True)
        quantized, indices, loss = fastvq.vector_quantize(z, codebook)
        torch.autograd.backward([quantized, loss], [upstream, torch.tensor(1.3, device=device)])
        return quantized.detach(), indices, loss.detach(), z.grad, codebook.grad

    with deterministic_algorithms(deterministic):
        expected = run(z, codebook, upstream)
        actual = run(transposed(z), strided(codebook), strided(upstream))
    for name, got, want in zip(("quantized", "indices", "loss", "grad of z", "grad of codebook"), actual, expected):
        # Float atomics may add the codebook gradient in another order: last-bit differences only.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("deterministic", [True, False], ids=["sorted", "atomic"])
def test_segment_reduce_and_ema_ignore_layout(backend, device, deterministic):
    values, _ = layout_inputs(device, seed=12)
    all_indices = torch.randint(9, (2 * LAYOUT_ROWS,), generator=torch.Generator().manual_seed(12)).to(device)
    indices = all_indices[::2]  # non-contiguous indices too
    expected = fastvq.segment_reduce(values, indices.contiguous(), 9, deterministic=deterministic)
    actual = fastvq.segment_reduce(strided(values), indices, 9, deterministic=deterministic)
    assert torch.equal(actual[0], expected[0])
    torch.testing.assert_close(actual[1], expected[1], rtol=1e-6, atol=1e-6)

    def ema_state():
        return torch.ones(9, 17, device=device), torch.ones(9, device=device), torch.ones(9, 17, device=device)

    expected_state, actual_state = ema_state(), ema_state()
    fastvq.ema_update_(*expected_state, values, indices.contiguous(), deterministic=deterministic)
    fastvq.ema_update_(*actual_state, transposed(values), indices, deterministic=deterministic)
    for got, want in zip(actual_state, expected_state):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(
    ("z_dtype", "codebook_dtype"),
    [(torch.float16, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)],
    ids=["fp16-fp32", "fp32-bf16", "bf16-fp16"],
)
def test_mixed_dtypes_are_promoted(backend, device, z_dtype, codebook_dtype, metric):
    generator = torch.Generator().manual_seed(13)
    z = torch.randn(50, 17, generator=generator).to(device=device, dtype=z_dtype)
    codebook = torch.randn(40, 17, generator=generator).to(device=device, dtype=codebook_dtype)
    indices, distances, codes = fastvq.nearest_code(z, codebook, metric=metric, return_codes=True)
    assert codes.dtype == torch.promote_types(z_dtype, codebook_dtype)
    assert_search_parity(z, codebook, metric, indices, distances, codes)


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_search_is_deterministic(backend, device, dtype, metric):
    z, codebook = layout_inputs(device, seed=14)
    z, codebook = z.to(dtype), codebook.to(dtype)
    first = fastvq.nearest_code(z, codebook, metric=metric, return_codes=True)
    second = fastvq.nearest_code(z, codebook, metric=metric, return_codes=True)
    for got, want in zip(first, second):
        assert torch.equal(got, want)
