"""``soft_quantize`` and ``soft_entropy`` against ``reference``'s full-matrix formulas, and the op
contracts (DESIGN.md) on every backend: outputs and every gradient, Gumbel noise that is the same
on every backend and every tiling, ties, NaN and Inf, sizes, layouts, dtypes, bad input,
determinism, opcheck and torch.compile.

The Triton kernels run under the interpreter here, so their cases use a few tiny shapes, chosen
to span two 16-code tiles and both the one-slice and the sliced ``D`` loops.
"""

from __future__ import annotations

import pytest
import torch
from _backends import HAS_TRITON, backends_for
from _parity import DTYPE_IDS, DTYPES, assert_close_flash_rule

import fastvq
from fastvq import _philox, backends, reference
from fastvq.backends.soft_codebook import SOFT_METRICS
from fastvq.backends.torch import soft_quantize as torch_soft

# The parity cases run on the implementations (cuda routes these ops to Triton).
impl = backends_for("soft_quantize")
# fp32 results against the float64 truth, relative to the largest entry of the true tensor.
FP32_RTOL = 2e-5


def assert_scaled_close(actual: torch.Tensor, expected: torch.Tensor, name: str, rtol: float = FP32_RTOL) -> None:
    """``max |actual - expected| <= rtol * max |expected|`` (plus a hair), saying where it fails."""
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    if not expected.numel():
        return
    error = (actual.double() - expected.double()).abs()
    allowed = rtol * float(expected.double().abs().max()) + 1e-12
    worst = int(error.flatten().argmax())
    assert float(error.max()) <= allowed, (
        f"{name}: max error {float(error.max()):.3g} at flat index {worst} (got {actual.flatten()[worst].item():.6g}, "
        f"true {expected.flatten()[worst].item():.6g}) exceeds {allowed:.3g}"
    )


@pytest.fixture(params=["default-chunks", "small-chunks"])
def torch_chunking(request, monkeypatch):
    """The PyTorch path with its default chunks, and walking 16 codes and 7 rows at a time, so that
    the online softmax is rescaled across chunks and ties and noise cross chunk borders."""
    if request.param == "small-chunks":
        monkeypatch.setattr(backends.common, "CHUNK_BYTES", 16 * 7 * torch_soft._SLAB_BYTES_PER_LOGIT)
        monkeypatch.setattr(torch_soft, "_CODES_PER_CHUNK", 16)
        assert torch_soft._chunk_sizes(20, 300) == (7, 16)


def soft_inputs(num_rows, num_codes, dim, device, dtype=torch.float32, value_dim=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    z = 0.6 * torch.randn(num_rows, dim, generator=generator)
    codebook = 0.6 * torch.randn(num_codes, dim, generator=generator)
    values = None if value_dim is None else torch.randn(num_codes, value_dim, generator=generator)
    cast = dict(device=device, dtype=dtype)
    return z.to(**cast), codebook.to(**cast), None if values is None else values.to(**cast)


def run_soft(z, codebook, values, metric, temperature, seed, upstream_seed=1, *, oracle=False):
    """Forward and backward of ``sum(soft * g) + sum(lse * h)`` on leaf copies: the op's or, with
    ``oracle``, the float64 reference's. Returns ``(soft, indices, lse, grads...)``."""
    leaves = [t.detach().double().requires_grad_(True) if oracle else t.detach().requires_grad_(True)
              for t in (z, codebook) + ((values,) if values is not None else ())]
    leaf_values = leaves[2] if values is not None else None
    if oracle:
        soft, indices, lse = reference.soft_quantize_ref(
            leaves[0], leaves[1], metric, temperature, seed=None if seed is None else int(seed), values=leaf_values
        )
    else:
        soft, indices, lse = fastvq.soft_quantize(
            leaves[0], leaves[1], metric=metric, temperature=temperature, gumbel=seed is not None,
            seed=None if seed is None else torch.tensor(seed, device=z.device), values=leaf_values,
        )
    generator = torch.Generator().manual_seed(upstream_seed)
    upstream = torch.randn(soft.shape, generator=generator).to(soft.device, soft.dtype)
    upstream_lse = torch.randn(lse.shape, generator=generator).to(lse.device, lse.dtype)
    grads = torch.autograd.grad((soft * upstream).sum() + (lse * upstream_lse).sum(), leaves)
    return (soft.detach(), indices, lse.detach(), *grads)


def assert_hard_parity(z, codebook, metric, temperature, seed, indices):
    """The chosen code's noisy logit (float64) is within tolerance of the row's best, and the index is
    the reference's wherever the best beats the second best by more than that."""
    logits = reference.soft_logits_ref(z.cpu(), codebook.cpu(), metric, temperature)
    if seed is not None:
        rows = torch.arange(z.shape[0], dtype=torch.int64)
        logits = logits + _philox.gumbel_noise(seed, rows, 0, codebook.shape[0]).double()
    logits = logits.nan_to_num(nan=float("-inf"))
    top = logits.topk(min(2, logits.shape[1]), dim=1).values
    chosen = logits.gather(1, indices.cpu()[:, None]).squeeze(1)
    tolerance = 1e-5 * (1.0 + top[:, 0].abs())
    assert bool(((top[:, 0] - chosen) <= tolerance).all()), (indices, logits.argmax(1))
    if top.shape[1] == 2:
        clear = (top[:, 0] - top[:, 1]) > tolerance
        assert torch.equal(indices.cpu()[clear], logits.argmax(1)[clear])


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("metric", SOFT_METRICS)
@pytest.mark.parametrize("with_values", [False, True], ids=["codes", "values"])
def test_soft_quantize_matches_the_reference(impl, metric, with_values):
    _, device = impl
    num_rows, num_codes, dim = (21, 35, 5) if impl[0] == "triton" else (45, 150, 7)
    z, codebook, values = soft_inputs(num_rows, num_codes, dim, device, value_dim=3 if with_values else None)
    seed = 12345 + num_codes
    got = run_soft(z, codebook, values, metric, 0.8, seed)
    want = run_soft(z, codebook, values, metric, 0.8, seed, oracle=True)
    for name, actual, expected in zip(("soft", "lse"), (got[0], got[2]), (want[0], want[2])):
        assert_scaled_close(actual, expected, name)
    assert_hard_parity(z, codebook, metric, 0.8, seed, got[1])
    for name, actual, expected in zip(("grad z", "grad codebook", "grad values"), got[3:], want[3:]):
        assert_scaled_close(actual, expected, name)


def test_soft_quantize_torch_path_in_float64_and_small_chunks(torch_chunking, monkeypatch):
    monkeypatch.setenv("FASTVQ_BACKEND", "torch")
    for metric in SOFT_METRICS:
        z, codebook, values = soft_inputs(20, 40, 5, "cpu", dtype=torch.float64, value_dim=4)
        got = run_soft(z, codebook, values, metric, 0.5, seed=3)
        want = run_soft(z, codebook, values, metric, 0.5, seed=3, oracle=True)
        assert torch.equal(got[1], want[1]), metric
        for name, actual, expected in zip(("soft", "indices", "lse", "grad z", "grad codebook", "grad values"), got,
                                          want):
            if name != "indices":
                assert_scaled_close(actual, expected, f"{metric} {name}", rtol=1e-12)


@pytest.mark.parametrize("metric", SOFT_METRICS)
def test_soft_entropy_matches_the_reference(impl, metric):
    _, device = impl
    num_rows, num_codes, dim = (19, 33, 17) if impl[0] == "triton" else (50, 170, 13)
    z, codebook, _ = soft_inputs(num_rows, num_codes, dim, device)
    temperature = 0.3

    def run(oracle):
        leaves = [t.detach().double().requires_grad_(True) if oracle else t.detach().requires_grad_(True)
                  for t in (z, codebook)]
        if oracle:
            row_entropy, mean_probs = reference.soft_entropy_ref(*leaves, metric, temperature)
        else:
            row_entropy, mean_probs = fastvq.soft_entropy(*leaves, metric=metric, temperature=temperature)
        generator = torch.Generator().manual_seed(2)
        weights = (
            torch.randn(row_entropy.shape, generator=generator),
            torch.randn(mean_probs.shape, generator=generator),
        )
        objective = sum((out * w.to(out)).sum() for out, w in zip((row_entropy, mean_probs), weights))
        return (row_entropy.detach(), mean_probs.detach(), *torch.autograd.grad(objective, leaves))

    for name, actual, expected in zip(("row entropy", "mean probs", "grad z", "grad codebook"), run(False), run(True)):
        assert_scaled_close(actual, expected, f"{metric} {name}", rtol=1e-4 if "grad" in name else FP32_RTOL)


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=DTYPE_IDS[1:])
def test_low_precision_error_is_at_most_twice_pytorchs(impl, dtype):
    """flash-attention's rule, against the fp32 formula on the low-precision inputs."""
    _, device = impl
    z, codebook, _ = soft_inputs(13, 20, 17, device, dtype=dtype)
    got = run_soft(z, codebook, None, "dot", 1.0, None)
    truth = run_soft(z.float(), codebook.float(), None, "dot", 1.0, None)
    leaves = [t.detach().requires_grad_(True) for t in (z, codebook)]
    soft, _, lse = reference.soft_quantize_ref(*leaves, "dot", 1.0, upcast=False)
    generator = torch.Generator().manual_seed(1)
    upstream = torch.randn(soft.shape, generator=generator).to(soft)
    upstream_lse = torch.randn(lse.shape, generator=generator).to(lse)
    torch_grads = torch.autograd.grad((soft * upstream).sum() + (lse * upstream_lse).sum(), leaves)
    torch_result = (soft, lse, *torch_grads)
    slack = 4 * torch.finfo(dtype).eps
    for name, position, theirs in zip(("soft", "lse", "grad z", "grad codebook"), (0, 2, 3, 4), torch_result):
        scale = float(truth[position].abs().max())
        assert_close_flash_rule(got[position], theirs, truth[position], name, slack=slack * scale)


# --------------------------------------------------------------------------- Gumbel noise


def test_noise_is_the_same_on_every_backend_and_tiling(impl, monkeypatch):
    device = impl[1]
    """With zero logits the hard index is the argmax of the noise alone: every backend must pick the
    argmax of ``_philox.gumbel_noise`` for every row, across 4-code Philox groups and code tiles."""
    z = torch.zeros(40, 3, device=device)
    codebook = torch.randn(45, 3, device=device)
    expected = _philox.gumbel_noise(987654321, torch.arange(40), 0, 45).argmax(dim=1)
    _, indices, _ = fastvq.soft_quantize(
        z, codebook, metric="dot", gumbel=True, seed=torch.tensor(987654321, device=device)
    )
    assert torch.equal(indices.cpu(), expected)
    if impl[0] != "triton":
        per_logit = torch_soft._SLAB_BYTES_PER_LOGIT + torch_soft._NOISE_BYTES_PER_LOGIT
        monkeypatch.setattr(backends.common, "CHUNK_BYTES", 16 * 7 * per_logit)
        monkeypatch.setattr(torch_soft, "_CODES_PER_CHUNK", 13)
        _, chunked, _ = fastvq.soft_quantize(z, codebook, metric="dot", gumbel=True, seed=torch.tensor(987654321))
        assert torch.equal(chunked, indices)


def test_noise_chunks_agree_with_the_whole_matrix():
    rows = torch.tensor([0, 5, 2**32 + 3, 2**40])
    whole = _philox.gumbel_noise(7, rows, 0, 37)
    for start, stop in [(0, 1), (3, 11), (16, 37), (36, 37)]:
        assert torch.equal(_philox.gumbel_noise(7, rows, start, stop), whole[:, start:stop])
    assert not torch.equal(_philox.gumbel_noise(8, rows, 0, 37), whole)
    assert whole.isfinite().all()


def test_philox_matches_the_random123_known_answer():
    """Random123's known-answer vector for Philox-4x32-10 (counter and key all ones)."""
    ones = torch.full((1,), 0xFFFFFFFF, dtype=torch.int64)
    out = _philox.philox_uint32x4(0xFFFFFFFFFFFFFFFF, ones, ones, ones, ones)
    assert [int(word) for word in out] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def test_gumbel_max_samples_follow_the_softmax(monkeypatch):
    """Every row is the same vector, so the hard indices are 8 000 draws from ``softmax(logits)``:
    their frequencies match it (each within 5 standard errors)."""
    monkeypatch.setenv("FASTVQ_BACKEND", "torch")
    codebook = torch.tensor([[0.0], [0.5], [1.0], [-1.0], [2.0]])
    z = torch.ones(8000, 1)
    _, indices, _ = fastvq.soft_quantize(z, codebook, metric="dot", temperature=0.7, gumbel=True,
                                         seed=torch.tensor(42))
    probs = torch.softmax(codebook[:, 0].double() / 0.7, dim=0)
    frequencies = torch.bincount(indices, minlength=5).double() / z.shape[0]
    standard_error = (probs * (1 - probs) / z.shape[0]).sqrt()
    assert bool(((frequencies - probs).abs() <= 5 * standard_error).all()), (frequencies, probs)


def test_seed_makes_the_noise_reproducible(impl):
    device = impl[1]
    z, codebook, _ = soft_inputs(20, 30, 4, device)
    torch.manual_seed(3)
    first = fastvq.soft_quantize(z, codebook, temperature=50.0, gumbel=True)[1]
    torch.manual_seed(3)
    second = fastvq.soft_quantize(z, codebook, temperature=50.0, gumbel=True)[1]
    third = fastvq.soft_quantize(z, codebook, temperature=50.0, gumbel=True)[1]
    assert torch.equal(first, second) and not torch.equal(first, third)


# --------------------------------------------------------------------------- ties, NaN, sizes


@pytest.mark.parametrize("metric", SOFT_METRICS)
def test_ties_go_to_the_lowest_index_whatever_the_tiling(impl, metric, torch_chunking):
    device = impl[1]
    generator = torch.Generator().manual_seed(5)
    codebook = 0.1 * torch.randn(70, 6, generator=generator)
    target = torch.randn(6, generator=generator)
    codebook[[9, 16 + 9, 48, 69]] = target
    z = (target + 0.001 * torch.randn(12, 6, generator=generator)).to(device)
    _, indices, _ = fastvq.soft_quantize(z, codebook.to(device), metric=metric, temperature=0.01)
    assert torch.equal(indices.cpu(), torch.full((12,), 9))


def test_non_finite_codes_are_excluded_and_nan_rows_are_visible(impl):
    device = impl[1]
    z, codebook, _ = soft_inputs(20, 33, 5, device)
    codebook[3, 1] = float("nan")
    codebook[17, 0] = float("inf")
    codebook[32] = float("-inf")
    z[4, 2] = float("nan")
    z, codebook = z.requires_grad_(True), codebook.requires_grad_(True)
    soft, indices, lse = fastvq.soft_quantize(z, codebook, metric="l2")
    finite_rows = torch.ones(20, dtype=torch.bool)
    finite_rows[4] = False
    assert not torch.isin(indices.cpu(), torch.tensor([3, 17, 32])).any()
    assert indices[4] == 0 and soft[4].isnan().all() and lse[4].isnan()
    assert soft[finite_rows.to(device)].isfinite().all() and lse[finite_rows.to(device)].isfinite().all()
    clean = codebook.detach().clone()
    clean[[3, 17, 32]] = 0
    kept = [k for k in range(33) if k not in (3, 17, 32)]
    want = reference.soft_quantize_ref(z.detach()[finite_rows.to(device)], clean[kept], "l2")
    assert_scaled_close(soft.detach()[finite_rows.to(device)], want[0], "soft without the excluded codes")
    soft, _, _ = fastvq.soft_quantize(z[finite_rows.to(device)], codebook, metric="l2")
    soft.sum().backward()
    assert not codebook.grad[[3, 17, 32]].any() and codebook.grad.isfinite().all()


def test_empty_batch_single_code_and_single_dimension(impl):
    device = impl[1]
    soft, indices, lse = fastvq.soft_quantize(torch.empty(0, 4, device=device), torch.randn(3, 4, device=device))
    assert soft.shape == (0, 4) and indices.shape == (0,) and lse.shape == (0,) and lse.dtype == torch.float32
    z = torch.randn(9, 1, device=device, requires_grad=True)
    codebook = torch.tensor([[0.5]], device=device, requires_grad=True)
    soft, indices, lse = fastvq.soft_quantize(z, codebook, metric="l2")
    assert torch.equal(soft, torch.full((9, 1), 0.5, device=device)) and not indices.any()
    torch.testing.assert_close(lse, -((z.detach()[:, 0] - 0.5) ** 2))
    soft.sum().backward()
    assert torch.equal(z.grad, torch.zeros_like(z)) and float(codebook.grad) == 9.0
    row_entropy, mean_probs = fastvq.soft_entropy(torch.empty(0, 4, device=device), torch.randn(3, 4, device=device))
    assert row_entropy.shape == (0,) and torch.equal(mean_probs, torch.zeros(3, device=device))


def test_layouts_and_mixed_dtypes(impl):
    device = impl[1]
    z, codebook, _ = soft_inputs(24, 30, 7, device)
    expected = fastvq.soft_quantize(z, codebook, metric="cosine")
    strided_z = torch.full((48, 21), float("nan"), device=device)[::2, ::3]
    strided_z.copy_(z)
    actual = fastvq.soft_quantize(strided_z, codebook.T.contiguous().T, metric="cosine")
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    soft, _, lse = fastvq.soft_quantize(z.half(), codebook, metric="cosine")
    assert soft.dtype == torch.float32 and lse.dtype == torch.float32
    soft, _, lse = fastvq.soft_quantize(z.bfloat16(), codebook.half(), values=codebook.bfloat16())
    assert soft.dtype == torch.float32 and lse.dtype == torch.float32


def test_forward_and_backward_are_deterministic(impl):
    device = impl[1]
    z, codebook, _ = soft_inputs(30, 40, 6, device)
    first = run_soft(z, codebook, None, "euclidean", 0.5, 77)
    second = run_soft(z, codebook, None, "euclidean", 0.5, 77)
    for got, want in zip(first, second):
        assert torch.equal(got, want)


# --------------------------------------------------------------------------- bad input

BAD_SOFT_INPUTS = [
    pytest.param(dict(z=torch.zeros(2, 3, 4)), ValueError, r"z must be 2-D.*\(2, 3, 4\)", id="z-rank-3"),
    pytest.param(dict(codebook=torch.zeros(5, 2)), ValueError, r"same last dimension.*\(4, 3\).*\(5, 2\)",
                 id="mismatched-D"),
    pytest.param(dict(codebook=torch.zeros(0, 3)), ValueError, r"K >= 1.*\(0, 3\)", id="K-0"),
    pytest.param(dict(z=torch.zeros(4, 3, dtype=torch.int64)), TypeError, r"z must be a floating-point.*int64",
                 id="z-int64"),
    pytest.param(dict(values=torch.zeros(4, 2)), ValueError, r"values must have one row per code.*\(5, 3\).*\(4, 2\)",
                 id="values-K"),
    pytest.param(dict(values=torch.zeros(5)), ValueError, r"values must be 2-D.*\(5,\)", id="values-rank-1"),
    pytest.param(dict(values=torch.zeros(5, 2, dtype=torch.int32)), TypeError, r"values must be a floating-point",
                 id="values-int32"),
    pytest.param(dict(values=torch.zeros(5, 2, device="meta")), ValueError, r"one device.*values on meta",
                 id="values-device"),
    pytest.param(dict(metric="l3"), ValueError, r"metric must be one of \('l2', 'cosine', 'dot', 'euclidean'\)",
                 id="metric"),
    pytest.param(dict(temperature=0.0), ValueError, r"temperature must be a finite float > 0, got 0.0", id="T-0"),
    pytest.param(dict(temperature=float("inf")), ValueError, r"temperature must be a finite float > 0", id="T-inf"),
    pytest.param(dict(gumbel=True, return_hard=False), ValueError, r"gumbel=True needs return_hard=True",
                 id="gumbel-no-hard"),
    pytest.param(dict(seed=torch.tensor(3)), ValueError, r"seed keys the Gumbel noise", id="seed-no-gumbel"),
    pytest.param(dict(gumbel=True, seed=torch.tensor([1, 2])), ValueError, r"seed must be a one-element int64",
                 id="seed-shape"),
]


def test_every_soft_op_runs_where_the_table_says(backend, device, monkeypatch):
    calls = []
    for name in ("torch", "triton", "cpp"):
        if name == "triton" and not HAS_TRITON:
            continue
        if name == "cpp":  # the binding module holds the C++ kernels' entry points
            module = backends.cpp
        else:
            module = __import__(f"fastvq.backends.{name}.soft_quantize", fromlist=["soft_quantize"])
        for function in ("soft_quantize", "soft_quantize_backward", "soft_entropy", "soft_entropy_backward"):
            def recording(*args, _original=getattr(module, function), _name=(name, function), **kwargs):
                calls.append(_name)
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, function, recording)
    z, codebook, _ = soft_inputs(5, 7, 3, device)
    z.requires_grad_(True)
    soft, _, _ = fastvq.soft_quantize(z, codebook)
    row_entropy, _ = fastvq.soft_entropy(z, codebook)
    (soft.sum() + row_entropy.sum()).backward()
    runs = {op: backends.route(op, backend[0]) for op in ("soft_quantize", "soft_entropy")}
    assert calls == [(runs["soft_quantize"], "soft_quantize"), (runs["soft_entropy"], "soft_entropy"),
                     (runs["soft_entropy"], "soft_entropy_backward"), (runs["soft_quantize"], "soft_quantize_backward")]


@pytest.fixture
def no_soft_kernel_may_run(monkeypatch):
    for name in ("torch", "triton"):
        if name == "triton" and not HAS_TRITON:
            continue
        module = __import__(f"fastvq.backends.{name}.soft_quantize", fromlist=["soft_quantize"])
        for function in ("soft_quantize", "soft_entropy"):
            def refuse(*args, _name=f"{name}:{function}", **kwargs):
                raise AssertionError(f"{_name} ran before the bad input was rejected")

            monkeypatch.setattr(module, function, refuse)
    for function in ("soft_quantize", "soft_entropy"):
        def refuse_cpp(*args, _name=f"cpp:{function}", **kwargs):
            raise AssertionError(f"{_name} ran before the bad input was rejected")

        monkeypatch.setattr(backends.cpp, function, refuse_cpp)


@pytest.mark.parametrize(("overrides", "error", "message"), BAD_SOFT_INPUTS)
def test_bad_input_is_rejected_before_any_kernel(backend, no_soft_kernel_may_run, overrides, error, message):
    arguments = dict(z=torch.zeros(4, 3), codebook=torch.zeros(5, 3))
    arguments.update(overrides)
    z, codebook = arguments.pop("z"), arguments.pop("codebook")
    with pytest.raises(error, match=message):
        fastvq.soft_quantize(z, codebook, **arguments)
    if set(overrides) <= {"z", "codebook", "metric", "temperature"}:
        with pytest.raises(error, match=message):
            fastvq.soft_entropy(z, codebook, **{k: v for k, v in arguments.items()})


def test_operator_rejects_a_seed_without_the_hard_choice(backend, no_soft_kernel_may_run):
    with pytest.raises(ValueError, match=r"needs return_hard=True"):
        torch.ops.fastvq.soft_quantize(torch.zeros(4, 3), torch.zeros(5, 3), None, "l2", 1.0, torch.tensor(1), False)


# --------------------------------------------------------------------------- opcheck and compile


def test_soft_quantize_opcheck(impl):
    device = impl[1]
    z, codebook, values = soft_inputs(5, 18, 3, device, value_dim=2)
    leaves = [t.requires_grad_(True) for t in (z, codebook, values)]
    seed = torch.tensor(5, device=device)
    torch.library.opcheck(torch.ops.fastvq.soft_quantize.default, (*leaves, "euclidean", 0.7, seed, True))


def test_soft_entropy_opcheck(impl):
    device = impl[1]
    z, codebook, _ = soft_inputs(5, 18, 3, device)
    torch.library.opcheck(torch.ops.fastvq.soft_entropy.default,
                          (z.requires_grad_(True), codebook.requires_grad_(True), "cosine", 0.5))


def test_soft_quantize_compiles_without_graph_breaks(impl):
    device = impl[1]
    z, codebook, _ = soft_inputs(12, 20, 5, device)
    codebook.requires_grad_(True)

    def step(z, codebook):
        soft, indices, lse = fastvq.soft_quantize(z, codebook, metric="dot", gumbel=True)
        row_entropy, mean_probs = fastvq.soft_entropy(z, codebook, temperature=0.1)
        return soft.square().mean() + lse.mean() + row_entropy.mean() - mean_probs.square().sum(), indices

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    loss, indices = compiled(z, codebook)
    loss.backward()
    torch.manual_seed(0)
    eager_loss, eager_indices = step(z, codebook.detach().requires_grad_(True))
    assert torch.equal(indices, eager_indices)
    torch.testing.assert_close(loss, eager_loss)


@pytest.mark.parametrize("wanted", ["z", "codebook", "values"])
def test_only_the_gradients_asked_for_are_computed(impl, wanted):
    """A leaf that needs no gradient gets none; the others get what they get when all are asked."""
    device = impl[1]
    z, codebook, values = soft_inputs(9, 20, 4, device, value_dim=2)
    everything = run_soft(z, codebook, values, "l2", 0.9, None)
    leaves = {"z": z.clone(), "codebook": codebook.clone(), "values": values.clone()}
    leaves[wanted].requires_grad_(True)
    soft, _, lse = fastvq.soft_quantize(leaves["z"], leaves["codebook"], metric="l2", temperature=0.9,
                                        values=leaves["values"])
    generator = torch.Generator().manual_seed(1)
    upstream = torch.randn(soft.shape, generator=generator).to(soft)
    upstream_lse = torch.randn(lse.shape, generator=generator).to(lse)
    (grad,) = torch.autograd.grad((soft * upstream).sum() + (lse * upstream_lse).sum(), [leaves[wanted]])
    torch.testing.assert_close(grad, everything[3 + ["z", "codebook", "values"].index(wanted)])
