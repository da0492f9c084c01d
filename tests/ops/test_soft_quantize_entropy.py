"""``soft_quantize_entropy`` (the soft codes and the entropies of one logit matrix, IBQ's pair) against
``reference.soft_quantize_entropy_ref`` and against the two ops it fuses, on every backend: outputs and
every gradient at two different temperatures, excluded codes across the C++ kernels' tiles, empty
batches, bad input before any kernel, the table's routes, opcheck and torch.compile; and the IBQ layer
making one call of it per step."""

from __future__ import annotations

import pytest
import torch
from _backends import HAS_CPP, backends_for

import fastvq
from fastvq import backends, reference
from fastvq.backends.soft_codebook import SOFT_METRICS

impl = backends_for("soft_quantize_entropy")
# fp32 results against the float64 truth, relative to the largest entry of the true tensor (the
# entropies' gradients carry 1 / entropy_temperature, as in test_soft_quantize.py).
FP32_RTOL, FP32_GRAD_RTOL = 2e-5, 1e-4
TEMPERATURE, ENTROPY_TEMPERATURE = 0.8, 0.3
NAMES = ("soft", "indices", "row entropy", "mean probs", "grad z", "grad codebook", "grad values")


def inputs(num_rows, num_codes, dim, device, dtype=torch.float32, value_dim=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    z = 0.6 * torch.randn(num_rows, dim, generator=generator)
    codebook = 0.6 * torch.randn(num_codes, dim, generator=generator)
    values = None if value_dim is None else torch.randn(num_codes, value_dim, generator=generator)
    cast = dict(device=device, dtype=dtype)
    return z.to(**cast), codebook.to(**cast), None if values is None else values.to(**cast)


def run(z, codebook, values, metric, how="fused"):
    """Forward and backward of a random linear function of the soft codes, row entropies and mean
    probabilities, on leaf copies: ``how`` is ``"fused"`` (the op), ``"separate"`` (``soft_quantize`` and
    ``soft_entropy``) or ``"reference"`` (float64 full matrices). Returns the outputs, then the gradients."""
    upcast = how == "reference"
    leaves = [t.detach().double().requires_grad_(True) if upcast else t.detach().requires_grad_(True)
              for t in (z, codebook) + ((values,) if values is not None else ())]
    leaf_values = leaves[2] if values is not None else None
    if how == "fused":
        soft, indices, row_entropy, mean_probs = fastvq.soft_quantize_entropy(
            leaves[0], leaves[1], metric=metric, temperature=TEMPERATURE, entropy_temperature=ENTROPY_TEMPERATURE,
            values=leaf_values,
        )
    elif how == "separate":
        soft, indices, _ = fastvq.soft_quantize(leaves[0], leaves[1], metric=metric, temperature=TEMPERATURE,
                                                values=leaf_values)
        row_entropy, mean_probs = fastvq.soft_entropy(leaves[0], leaves[1], metric=metric,
                                                      temperature=ENTROPY_TEMPERATURE)
    else:
        soft, indices, row_entropy, mean_probs = reference.soft_quantize_entropy_ref(
            leaves[0], leaves[1], metric, TEMPERATURE, ENTROPY_TEMPERATURE, values=leaf_values
        )
    generator = torch.Generator().manual_seed(7)
    objective = sum((out * torch.randn(out.shape, generator=generator).to(out)).sum()
                    for out in (soft, row_entropy, mean_probs))
    grads = torch.autograd.grad(objective, leaves)
    return (soft.detach(), indices, row_entropy.detach(), mean_probs.detach(), *grads)


def assert_scaled_close(actual, expected, name, rtol):
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    if not expected.numel():
        return
    error = (actual.double() - expected.double()).abs()
    allowed = rtol * float(expected.double().abs().max()) + 1e-12
    worst = int(error.flatten().argmax())
    assert float(error.max()) <= allowed, (
        f"{name}: max error {float(error.max()):.3g} at flat index {worst} exceeds {allowed:.3g}"
    )


@pytest.mark.parametrize("metric", SOFT_METRICS)
@pytest.mark.parametrize("with_values", [False, True], ids=["codes", "values"])
def test_matches_the_reference(impl, metric, with_values):
    _, device = impl
    num_rows, num_codes, dim = (19, 33, 5) if impl[0] == "triton" else (45, 150, 7)
    z, codebook, values = inputs(num_rows, num_codes, dim, device, value_dim=3 if with_values else None)
    got, want = run(z, codebook, values, metric), run(z, codebook, values, metric, "reference")
    logits = reference.soft_logits_ref(z.cpu(), codebook.cpu(), metric, TEMPERATURE)
    top = logits.topk(2, dim=1).values
    clear = (top[:, 0] - top[:, 1]) > 1e-5 * (1 + top[:, 0].abs())
    assert torch.equal(got[1].cpu()[clear], want[1][clear])
    for name, actual, expected in zip(NAMES, got, want):
        if name != "indices":
            assert_scaled_close(actual, expected, f"{metric} {name}", FP32_GRAD_RTOL if "grad" in name else FP32_RTOL)


@pytest.mark.skipif(not HAS_CPP, reason="fastvq._C is not built")
@pytest.mark.parametrize("metric", SOFT_METRICS)
@pytest.mark.parametrize("with_values", [False, True], ids=["codes", "values"])
def test_cpp_fused_kernels_match_the_separate_ops_across_tiles(metric, with_values, monkeypatch):
    """float64, 70 rows (two 64-row tiles) and 300 codes (three 128-code tiles, ragged register blocks),
    one excluded code: the fused kernels' one product per tile gives what the two ops' passes give."""
    monkeypatch.setenv("FASTVQ_BACKEND", "cpp")
    z, codebook, values = inputs(70, 300, 37, "cpu", torch.float64, value_dim=5 if with_values else None, seed=1)
    codebook[7] = float("nan")
    fused, separate = run(z, codebook, values, metric), run(z, codebook, values, metric, "separate")
    for name, actual, expected in zip(NAMES, fused, separate):
        if name == "indices":
            assert torch.equal(actual, expected)
        else:
            torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-11, equal_nan=True, msg=name)
    if metric != "cosine":  # cosine chains the gradient through the NaN code's normalisation, as soft_quantize does
        assert not fused[5][7].any() and fused[5].isfinite().all()


@pytest.mark.parametrize("wanted", ["z", "codebook", "values"])
def test_only_the_gradients_asked_for_are_computed(impl, wanted):
    device = impl[1]
    z, codebook, values = inputs(9, 20, 4, device, value_dim=2)
    everything = run(z, codebook, values, "l2")
    leaves = {"z": z.clone(), "codebook": codebook.clone(), "values": values.clone()}
    leaves[wanted].requires_grad_(True)
    outputs = fastvq.soft_quantize_entropy(leaves["z"], leaves["codebook"], metric="l2", temperature=TEMPERATURE,
                                           entropy_temperature=ENTROPY_TEMPERATURE, values=leaves["values"])
    generator = torch.Generator().manual_seed(7)
    soft, _, row_entropy, mean_probs = outputs
    objective = sum((out * torch.randn(out.shape, generator=generator).to(out)).sum()
                    for out in (soft, row_entropy, mean_probs))
    (grad,) = torch.autograd.grad(objective, [leaves[wanted]])
    torch.testing.assert_close(grad, everything[4 + ["z", "codebook", "values"].index(wanted)])


def test_empty_batch(impl):
    device = impl[1]
    soft, indices, row_entropy, mean_probs = fastvq.soft_quantize_entropy(
        torch.empty(0, 4, device=device), torch.randn(3, 4, device=device)
    )
    assert soft.shape == (0, 4) and indices.shape == (0,) and row_entropy.shape == (0,)
    assert torch.equal(mean_probs, torch.zeros(3, device=device))


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(entropy_temperature=0.0), r"entropy_temperature must be a finite float > 0, got 0.0"),
    (dict(temperature=float("nan")), r"temperature must be a finite float > 0"),
    (dict(metric="l3"), r"metric must be one of"),
    (dict(values=torch.zeros(4, 2)), r"values must have one row per code"),
])
def test_bad_input_is_rejected_before_any_kernel(backend, monkeypatch, overrides, message):
    def refuse(*args, **kwargs):
        raise AssertionError("a kernel ran before the bad input was rejected")

    monkeypatch.setattr(backends.cpp, "soft_quantize_entropy", refuse)
    monkeypatch.setattr(__import__("fastvq.backends.torch.soft_quantize", fromlist=["x"]), "soft_quantize_entropy",
                        refuse)
    with pytest.raises(ValueError, match=message):
        fastvq.soft_quantize_entropy(torch.zeros(4, 3), torch.zeros(5, 3), **overrides)


def test_the_table_fuses_on_cpp_and_composes_elsewhere():
    for op in ("soft_quantize_entropy", "soft_quantize_entropy_backward"):
        routes = backends.TABLE[op]
        assert routes["cpp"].runs == "cpp" and routes["torch"].runs == "torch" and routes["triton"].runs == "triton"
        assert routes["cuda"].runs == "triton"


def test_opcheck(impl):
    device = impl[1]
    z, codebook, values = inputs(5, 18, 3, device, value_dim=2)
    leaves = [t.requires_grad_(True) for t in (z, codebook, values)]
    torch.library.opcheck(torch.ops.fastvq.soft_quantize_entropy.default, (*leaves, "euclidean", 0.7, 0.2))


def test_compiles_without_graph_breaks(impl):
    device = impl[1]
    z, codebook, _ = inputs(12, 20, 5, device)
    codebook.requires_grad_(True)

    def step(z, codebook):
        soft, indices, row_entropy, mean_probs = fastvq.soft_quantize_entropy(z, codebook, entropy_temperature=0.1)
        return soft.square().mean() + row_entropy.mean() - mean_probs.square().sum(), indices

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, indices = compiled(z, codebook)
    loss.backward()
    eager_loss, eager_indices = step(z, codebook.detach().requires_grad_(True))
    assert torch.equal(indices, eager_indices)
    torch.testing.assert_close(loss, eager_loss)


def test_ibq_with_the_entropy_loss_streams_the_logits_once_per_pass(monkeypatch):
    """The IBQ layer's soft codes and entropy terms come from one fused call, forward and backward; the
    two separate ops are not called."""
    calls = []
    for name in ("soft_quantize_entropy", "soft_quantize_entropy_backward", "soft_quantize", "soft_entropy",
                 "soft_quantize_backward", "soft_entropy_backward"):
        def recording(*args, _original=getattr(backends.cpp, name), _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(backends.cpp, name, recording)
    monkeypatch.setenv("FASTVQ_BACKEND", "cpp" if HAS_CPP else "torch")
    layer = fastvq.nn.IBQ(40, 6, use_entropy_loss=True)
    z = torch.randn(2, 6, 3, 3, requires_grad=True)
    z_q, (quant_loss, _, _, entropy_loss), _ = layer(z)
    (z_q.sum() + quant_loss + entropy_loss).backward()
    if HAS_CPP:
        assert calls == ["soft_quantize_entropy", "soft_quantize_entropy_backward"]
    assert z.grad.isfinite().all() and layer.embedding.weight.grad.isfinite().all()
