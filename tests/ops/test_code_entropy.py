"""The code entropy op (LFQ's entropy terms without N x 2^d) on every backend, against
``reference.code_entropy_ref``, which builds every code's probability: values and gradients in
float64 where the backend computes in float64, fp32 tolerances where it computes in fp32."""

from __future__ import annotations

import pytest
import torch

import fastvq.functional as F
from fastvq.reference import code_entropy_ref

# (N, G, d, logit scale): odd sizes, one bit, odd bit counts, and logits large enough that most
# codes fall under the clamp (LFQ's inv_temperature = 100 makes logits of a few hundred).
SHAPES = [(1, 1, 1, 1.0), (7, 2, 3, 2.0), (19, 1, 6, 40.0), (13, 3, 5, 300.0)]
SHAPE_IDS = ["N1-d1", "N7-G2-d3", "N19-d6-clamped", "N13-G3-d5-saturated"]


def _check(bit_logits: torch.Tensor, atol: float) -> None:
    leaf = bit_logits.detach().clone().requires_grad_()
    sample, avg = F.code_entropy(leaf)
    truth_leaf = bit_logits.detach().double().cpu().requires_grad_()
    true_sample, true_avg = code_entropy_ref(truth_leaf)
    assert sample.shape == true_sample.shape and avg.shape == true_avg.shape
    expected_dtype = torch.float64 if bit_logits.dtype == torch.float64 else torch.float32
    assert sample.dtype == avg.dtype == expected_dtype
    torch.testing.assert_close(sample.cpu().double(), true_sample, atol=atol, rtol=0)
    torch.testing.assert_close(avg.cpu().double(), true_avg, atol=atol, rtol=0)
    generator = torch.Generator().manual_seed(1)
    grad_sample = torch.randn(true_sample.shape, generator=generator, dtype=torch.float64)
    grad_avg = torch.randn(true_avg.shape, generator=generator, dtype=torch.float64)
    true_grad = torch.autograd.grad((true_sample * grad_sample).sum() + (true_avg * grad_avg).sum(), truth_leaf)[0]
    loss = (sample * grad_sample.to(sample)).sum() + (avg * grad_avg.to(avg)).sum()
    (grad,) = torch.autograd.grad(loss, leaf)
    assert grad.dtype == bit_logits.dtype
    # The gradient is computed in fp32 and returned in the input's dtype, so a bf16 one is rounded.
    grad_atol = max(atol, torch.finfo(grad.dtype).eps) * max(1.0, float(true_grad.abs().max()))
    torch.testing.assert_close(grad.cpu().double(), true_grad, atol=grad_atol, rtol=0)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_code_entropy_matches_reference(backend, shape):
    num_rows, groups, num_bits, scale = shape
    generator = torch.Generator().manual_seed(num_rows * 31 + num_bits)
    logits = torch.randn(num_rows, groups, num_bits, generator=generator) * scale
    _check(logits.to(backend[1]), atol=2e-6)


@pytest.mark.parametrize("shape", SHAPES[1:3], ids=SHAPE_IDS[1:3])
def test_code_entropy_float64_is_exact(shape):
    """The PyTorch path in float64 (what the cpp and torch selections run) agrees to rounding."""
    num_rows, groups, num_bits, scale = shape
    logits = torch.randn(num_rows, groups, num_bits, dtype=torch.float64) * scale
    _check(logits, atol=1e-12)


def test_code_entropy_gradcheck():
    logits = torch.randn(6, 2, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: F.code_entropy(t, eps=1e-3), (logits,))


def test_code_entropy_layouts_dtypes_and_empty(backend):
    device = backend[1]
    logits = torch.randn(5, 9, 2, device=device).transpose(1, 2)  # [5, 2, 9], non-contiguous
    _check(logits, atol=2e-6)
    half = (torch.randn(6, 1, 4, device=device) * 3).to(torch.bfloat16)
    _check(half, atol=2e-6)  # computed in fp32 from the bf16 values
    sample, avg = F.code_entropy(torch.zeros(0, 2, 3, device=device, requires_grad=True))
    assert sample.shape == (0, 2) and avg.shape == (2, 8) and avg.isnan().all()
    poisoned = torch.randn(4, 1, 3, device=device)
    poisoned[1, 0, 2] = float("nan")  # a NaN logit turns its row and the mean NaN, visibly
    sample, avg = F.code_entropy(poisoned)
    assert sample[1].isnan().all() and not sample[[0, 2, 3]].isnan().any() and avg.isnan().all()


def test_code_entropy_opcheck(backend):
    logits = torch.randn(4, 1, 3, device=backend[1], requires_grad=True)
    torch.library.opcheck(torch.ops.fastvq.code_entropy.default, (logits, 1e-5))
    torch.library.opcheck(
        torch.ops.fastvq.code_entropy_backward.default,
        (torch.randn(4, 1, device=backend[1]), torch.randn(1, 8, device=backend[1]), logits.detach(), 1e-5),
    )


def test_code_entropy_never_builds_codes_by_rows():
    """At 2^22 codes the N x 2^d matrix of 256 rows would be 4 GiB; the op takes 2^11-wide slabs."""
    logits = torch.randn(256, 1, 22) * 0.1
    sample, avg = F.code_entropy(logits)
    torch.testing.assert_close(avg.sum(), torch.tensor(1.0), atol=1e-4, rtol=0)
    assert sample.shape == (256, 1) and bool((sample > 0).all())


def test_clamped_entropy():
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(F.clamped_entropy(probs), torch.tensor([0.6931472, 0.0]))


def test_code_entropy_bad_arguments():
    with pytest.raises(ValueError, match="3-D"):
        F.code_entropy(torch.randn(4, 3))
    with pytest.raises(TypeError, match="floating-point"):
        F.code_entropy(torch.ones(4, 1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="bits"):
        F.code_entropy(torch.randn(4, 1, 31))
    with pytest.raises(ValueError, match="eps"):
        F.code_entropy(torch.randn(4, 1, 3), eps=0.0)
    with pytest.raises(ValueError, match="grad_avg"):
        torch.ops.fastvq.code_entropy_backward(torch.zeros(4, 1), torch.zeros(1, 7), torch.randn(4, 1, 3), 1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the launch path below is the one every test runs")
def test_triton_launch_path_with_row_splits(monkeypatch):
    """The GPU launch configuration (its tiles, and the rows split across programs when there are
    few code tiles) run through the interpreter, so CI checks the split sums too."""
    from fastvq.backends.triton import code_entropy as kernels

    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    logits = torch.randn(70, 1, 5) * 3  # 3 row blocks of 32, split 3 ways
    sample, avg = kernels.code_entropy(logits, 1e-5)
    leaf = logits.double().requires_grad_()
    true_sample, true_avg = code_entropy_ref(leaf)
    torch.testing.assert_close(sample.double(), true_sample, atol=2e-6, rtol=0)
    torch.testing.assert_close(avg.double(), true_avg, atol=2e-6, rtol=0)
    grad_sample, grad_avg = torch.randn_like(sample), torch.randn_like(avg)
    grad = kernels.code_entropy_backward(grad_sample, grad_avg, logits, 1e-5)
    (true_grad,) = torch.autograd.grad((true_sample * grad_sample).sum() + (true_avg * grad_avg).sum(), leaf)
    torch.testing.assert_close(grad.double(), true_grad, atol=2e-6, rtol=0)
