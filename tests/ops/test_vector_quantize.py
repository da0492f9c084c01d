"""``vector_quantize`` against ``reference.vector_quantize_ref``: outputs and every gradient, also with
the rotation-trick backward.

The data is clustered around the codes (as a VQ layer sees it after a few steps), so every row
has a clear nearest code in every dtype and the indices, and with them the gradients, must agree
with the reference exactly; search parity on ambiguous rows is tests/ops/test_search.py's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
from _parity import DTYPE_IDS, DTYPES, METRICS, assert_close_flash_rule, deterministic_algorithms

import fastvq
from fastvq import reference
from fastvq.reference import rotate_to_ref, vector_quantize_ref

NUM_ROWS, NUM_CODES, DIM = 75, 37, 19
LOSS_WEIGHT = 1.7  # the upstream gradient of the loss, so that grad_loss != 1 is exercised
WEIGHTS = [
    pytest.param(0.25, 1.0, id="beta0.25-cw1"),
    pytest.param(1.0, 0.25, id="beta1-cw0.25"),  # taming-transformers' legacy form
    pytest.param(0.0, 2.0, id="beta0-cw2"),
]


@dataclass
class QuantizeRun:
    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    grad_z: torch.Tensor
    grad_codebook: Optional[torch.Tensor]


def clustered_inputs(num_rows, num_codes, dim, dtype, device, seed=0, codebook_dtype=None):
    generator = torch.Generator().manual_seed(seed)
    codebook = torch.randn(num_codes, dim, generator=generator)
    assignment = torch.randint(num_codes, (num_rows,), generator=generator)
    z = codebook[assignment] + 0.1 * torch.randn(num_rows, dim, generator=generator)
    # Scaled like the loss gradient (~1/(N D)), so that an error in either term shows in low precision.
    upstream = torch.randn(num_rows, dim, generator=generator) / (num_rows * dim)
    return (
        z.to(device=device, dtype=dtype),
        codebook.to(device=device, dtype=codebook_dtype or dtype),
        upstream.to(device=device, dtype=torch.promote_types(dtype, codebook_dtype or dtype)),
    )


def run_quantize(
    quantize: Callable, z, codebook, upstream, *, codebook_requires_grad=True, cast=None, **kwargs
) -> QuantizeRun:
    """Runs forward and backward of ``(quantized * upstream).sum() + LOSS_WEIGHT * loss`` on leaf
    copies of the inputs (cast to ``cast`` first, for a float64 or low-precision oracle)."""
    z = z.detach().to(cast or z.dtype).requires_grad_(True)
    codebook = codebook.detach().to(cast or codebook.dtype).requires_grad_(codebook_requires_grad)
    quantized, indices, loss = quantize(z, codebook, **kwargs)
    objective = (quantized * upstream.to(quantized.dtype)).sum() + LOSS_WEIGHT * loss
    objective.backward()
    return QuantizeRun(quantized.detach(), indices, loss.detach(), z.grad, codebook.grad)


def fastvq_quantize(z, codebook, *, beta=0.25, metric="l2", codebook_weight=1.0):
    return fastvq.vector_quantize(z, codebook, beta=beta, metric=metric, codebook_weight=codebook_weight)


def reference_quantize(z, codebook, *, beta=0.25, metric="l2", codebook_weight=1.0):
    return reference.vector_quantize_ref(z, codebook, beta, metric, codebook_weight=codebook_weight)


def assert_gradients_match(actual: QuantizeRun, z, codebook, upstream, dtype, **kwargs) -> None:
    """fp32 results match the fp32 reference tightly; fp16/bf16 ones follow flash-attention's rule
    against a float64 oracle, with PyTorch's own low-precision run as the yardstick."""
    if dtype == torch.float32:
        expected = run_quantize(reference_quantize, z, codebook, upstream, **kwargs)
        torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-7, msg="loss")
        torch.testing.assert_close(actual.grad_z, expected.grad_z, rtol=1e-5, atol=1e-6, msg="grad of z")
        if expected.grad_codebook is not None:
            torch.testing.assert_close(
                actual.grad_codebook, expected.grad_codebook, rtol=1e-5, atol=1e-6, msg="grad of codebook"
            )
        return
    truth = run_quantize(reference_quantize, z, codebook, upstream, cast=torch.float64, **kwargs)
    in_dtype = run_quantize(reference_quantize, z, codebook, upstream, **kwargs)
    eps = torch.finfo(dtype).eps
    assert_close_flash_rule(actual.loss, in_dtype.loss, truth.loss, "loss", slack=1e-6 * float(truth.loss.abs()))
    assert actual.grad_z.dtype == z.dtype
    assert_close_flash_rule(
        actual.grad_z, in_dtype.grad_z, truth.grad_z, "grad of z", slack=eps * float(truth.grad_z.abs().max())
    )
    if truth.grad_codebook is not None:
        assert actual.grad_codebook.dtype == codebook.dtype
        assert_close_flash_rule(
            actual.grad_codebook,
            in_dtype.grad_codebook,
            truth.grad_codebook,
            "grad of codebook",
            slack=eps * float(truth.grad_codebook.abs().max()),
        )


def assert_grad_only_on_chosen_codes(grad_codebook: torch.Tensor, indices: torch.Tensor) -> None:
    chosen = torch.zeros(grad_codebook.shape[0], dtype=torch.bool, device=grad_codebook.device)
    chosen[indices] = True
    touched = (~chosen & (grad_codebook != 0).any(dim=1)).nonzero().flatten()
    assert not touched.numel(), f"codes {touched.tolist()} were not chosen but have a gradient"
    rows_with_grad = (grad_codebook != 0).any(dim=1)
    without_grad = (chosen & ~rows_with_grad).nonzero().flatten()
    assert not without_grad.numel(), f"chosen codes without gradient: {without_grad.tolist()}"


@pytest.mark.parametrize("codebook_requires_grad", [True, False], ids=["codebook-grad", "codebook-frozen"])
@pytest.mark.parametrize(("beta", "codebook_weight"), WEIGHTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_vector_quantize_matches_reference(backend, device, dtype, beta, codebook_weight, codebook_requires_grad):
    z, codebook, upstream = clustered_inputs(NUM_ROWS, NUM_CODES, DIM, dtype, device)
    options = dict(beta=beta, codebook_weight=codebook_weight, codebook_requires_grad=codebook_requires_grad)
    actual = run_quantize(fastvq_quantize, z, codebook, upstream, **options)
    expected_indices, _, expected_codes = reference.nearest_code_ref(z, codebook)

    assert actual.indices.dtype == torch.int64
    assert torch.equal(actual.indices, expected_indices)
    assert actual.quantized.dtype == dtype
    assert torch.equal(actual.quantized, expected_codes), "the forward value of quantized is the chosen code itself"
    assert actual.loss.dtype == torch.float32 and actual.loss.shape == ()
    assert_gradients_match(actual, z, codebook, upstream, dtype, **options)
    if codebook_requires_grad:
        assert_grad_only_on_chosen_codes(actual.grad_codebook, actual.indices)
    else:
        assert actual.grad_codebook is None


@pytest.mark.parametrize("metric", METRICS)
def test_vector_quantize_metrics_match_reference(backend, device, metric):
    """The metric changes the search only; the losses stay squared errors to the chosen code."""
    z, codebook, upstream = clustered_inputs(NUM_ROWS, NUM_CODES, DIM, torch.float32, device, seed=1)
    actual = run_quantize(fastvq_quantize, z, codebook, upstream, metric=metric)
    expected = run_quantize(reference_quantize, z, codebook, upstream, metric=metric)
    assert torch.equal(actual.indices, expected.indices)
    assert torch.equal(actual.quantized, codebook[expected.indices])
    assert_gradients_match(actual, z, codebook, upstream, torch.float32, metric=metric)


@pytest.mark.parametrize(
    ("z_dtype", "codebook_dtype"),
    [(torch.float16, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)],
    ids=["fp16-fp32", "fp32-bf16", "bf16-fp16"],
)
def test_vector_quantize_promotes_mixed_dtypes(backend, device, z_dtype, codebook_dtype):
    z, codebook, upstream = clustered_inputs(NUM_ROWS, NUM_CODES, DIM, z_dtype, device, codebook_dtype=codebook_dtype)
    actual = run_quantize(fastvq_quantize, z, codebook, upstream)
    expected = run_quantize(reference_quantize, z, codebook, upstream)
    assert actual.quantized.dtype == torch.promote_types(z_dtype, codebook_dtype)
    assert torch.equal(actual.indices, expected.indices)
    assert torch.equal(actual.quantized, codebook.to(actual.quantized.dtype)[expected.indices])
    assert actual.grad_z.dtype == z_dtype and actual.grad_codebook.dtype == codebook_dtype
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-7)
    # Both gradients are computed in fp32 and rounded once to their leaf's dtype.
    tolerance = dict(rtol=torch.finfo(z_dtype).eps, atol=1e-6)
    torch.testing.assert_close(actual.grad_z.float(), expected.grad_z.float(), **tolerance)
    tolerance = dict(rtol=torch.finfo(codebook_dtype).eps, atol=1e-6)
    torch.testing.assert_close(actual.grad_codebook.float(), expected.grad_codebook.float(), **tolerance)


def test_loss_alone_and_quantized_alone_backpropagate(backend, device):
    """With one output unused its incoming gradient is None, which the backward must treat as 0."""
    z, codebook, _ = clustered_inputs(NUM_ROWS, NUM_CODES, DIM, torch.float32, device)
    z_leaf, codebook_leaf = z.clone().requires_grad_(True), codebook.clone().requires_grad_(True)
    _, _, loss = fastvq.vector_quantize(z_leaf, codebook_leaf)
    loss.backward()
    z_ref, codebook_ref = z.clone().requires_grad_(True), codebook.clone().requires_grad_(True)
    reference.vector_quantize_ref(z_ref, codebook_ref)[2].backward()
    torch.testing.assert_close(z_leaf.grad, z_ref.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(codebook_leaf.grad, codebook_ref.grad, rtol=1e-5, atol=1e-7)

    z_leaf, codebook_leaf = z.clone().requires_grad_(True), codebook.clone().requires_grad_(True)
    quantized, _, _ = fastvq.vector_quantize(z_leaf, codebook_leaf)
    quantized.sum().backward()
    assert torch.equal(z_leaf.grad, torch.ones_like(z)), "the straight-through gradient is passed unchanged"
    assert codebook_leaf.grad is None or not codebook_leaf.grad.any()


def test_empty_batch_has_zero_loss_and_zero_gradients(backend, device):
    z = torch.empty(0, DIM, device=device, requires_grad=True)
    codebook = torch.randn(NUM_CODES, DIM, device=device, requires_grad=True)
    quantized, indices, loss = fastvq.vector_quantize(z, codebook)
    assert tuple(quantized.shape) == (0, DIM) and quantized.dtype == torch.float32
    assert tuple(indices.shape) == (0,) and indices.dtype == torch.int64
    assert loss.dtype == torch.float32 and torch.equal(loss.detach(), torch.zeros((), device=device))
    (quantized.sum() + loss).backward()
    assert tuple(z.grad.shape) == (0, DIM)
    assert codebook.grad is not None and not codebook.grad.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_deterministic_mode_gives_bitwise_identical_codebook_grads(backend, device, dtype):
    # Many rows on few codes: the case where float atomics would reorder the additions.
    z, codebook, upstream = clustered_inputs(300, 3, DIM, dtype, device, seed=4)
    with deterministic_algorithms():
        first = run_quantize(fastvq_quantize, z, codebook, upstream)
        second = run_quantize(fastvq_quantize, z, codebook, upstream)
    assert torch.equal(first.grad_codebook, second.grad_codebook)
    assert torch.equal(first.grad_z, second.grad_z)
    assert_gradients_match(first, z, codebook, upstream, dtype)


# --------------------------------------------------------------------------- the rotation trick


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_trick_matches_reference(backend, dtype):
    _, device = backend
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(37, 45, generator=generator).to(device=device, dtype=dtype)
    codebook = torch.randn(50, 45, generator=generator).to(device=device, dtype=dtype)
    upstream = torch.randn(37, 45, generator=generator).to(device=device, dtype=dtype)
    ours_z, ours_cb = z.clone().requires_grad_(), codebook.clone().requires_grad_()
    quantized, indices, loss = fastvq.vector_quantize(ours_z, ours_cb, beta=0.3, rotation_trick=True)
    ((quantized * upstream).sum() + loss).backward()
    ref_z, ref_cb = z.double().requires_grad_(), codebook.double().requires_grad_()
    ref_q, ref_indices, ref_loss = vector_quantize_ref(ref_z, ref_cb, beta=0.3, rotation_trick=True)
    ((ref_q * upstream.double()).sum() + ref_loss).backward()
    assert torch.equal(indices, ref_indices)
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(quantized.double(), ref_q.detach(), **tolerance)
    torch.testing.assert_close(ours_z.grad.double(), ref_z.grad, **tolerance)
    torch.testing.assert_close(ours_cb.grad.double(), ref_cb.grad, **tolerance)


def test_rotation_trick_reference_rotates_onto_the_code():
    z = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    codes = torch.randn(8, 5, dtype=torch.float64)
    rotated = rotate_to_ref(z, codes)
    torch.testing.assert_close(rotated.detach(), codes)
    # The gradient is a rotation scaled by |e|/|z|: it keeps the upstream gradient's norm ratio.
    upstream = torch.randn(8, 5, dtype=torch.float64)
    (rotated * upstream).sum().backward()
    ratio = z.grad.norm(dim=1) / upstream.norm(dim=1)
    torch.testing.assert_close(ratio, codes.norm(dim=1) / z.detach().norm(dim=1))
