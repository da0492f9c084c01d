"""The vector-quantize op's options: the rotation-trick backward and Gumbel-max sampled codes."""

import pytest
import torch
import torch.nn.functional as F

import fastvq
from fastvq.reference import rotate_to_ref, vector_quantize_ref


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


@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
def test_gumbel_sampling_follows_the_softmax(backend, metric):
    _, device = backend
    generator = torch.Generator().manual_seed(3)
    codebook = torch.randn(12, 5, generator=generator) * 0.5
    row = torch.randn(1, 5, generator=generator)
    draws = 3000 if backend[0] == "triton" else 20000
    temperature = 0.7
    indices, _ = fastvq.nearest_code(
        row.repeat(draws, 1).to(device), codebook.to(device), metric=metric, sample_temperature=temperature,
        seed=torch.tensor(11, device=device),
    )
    frequencies = torch.bincount(indices.cpu(), minlength=12).double() / draws
    if metric == "l2":
        logits = -torch.cdist(row.double(), codebook.double())[0]
    elif metric == "cosine":
        logits = (F.normalize(row.double(), dim=1) @ F.normalize(codebook.double(), dim=1).T)[0]
    else:
        logits = (row.double() @ codebook.double().T)[0]
    probabilities = (logits / temperature).softmax(0)
    standard_error = (probabilities * (1 - probabilities) / draws).sqrt()
    assert ((frequencies - probabilities).abs() <= 5 * standard_error + 1e-3).all(), (frequencies, probabilities)


def test_sampling_is_reproducible_for_a_seed_and_varies_across_seeds(backend):
    _, device = backend
    generator = torch.Generator().manual_seed(5)
    z = torch.randn(64, 6, generator=generator).to(device)
    codebook = torch.randn(20, 6, generator=generator).to(device)
    draw = lambda seed: fastvq.nearest_code(z, codebook, sample_temperature=5.0, seed=torch.tensor(seed, device=device))[0]  # noqa: E731
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_sampling_arguments_are_checked():
    z, codebook = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="sample_temperature"):
        fastvq.nearest_code(z, codebook, sample_temperature=-1.0)
    with pytest.raises(TypeError, match="seed"):
        torch.ops.fastvq.nearest_code(z, codebook, "l2", False, 1.0, None)
    with pytest.raises(ValueError, match="seed"):
        fastvq.nearest_code(z, codebook, sample_temperature=1.0, seed=torch.tensor(1.5))
