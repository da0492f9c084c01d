"""``fastvq.nn.IBQ`` against ``reference.ibq_ref`` (SEED-Voken's ``IndexPropagationQuantize`` through
the logits and the soft and hard one-hot matrices): the output, the indices, every loss and every
gradient, in float64 on the PyTorch path and in float32 on the Triton kernels."""

from __future__ import annotations

import pytest
import torch
from _backends import HAS_TRITON

import fastvq
from fastvq import reference

ENTROPY_WEIGHT = 0.3


def ibq_inputs(batch, height, width, num_codes, dim, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, dim, height, width, generator=generator, dtype=torch.float64).to(dtype)
    codebook = torch.randn(num_codes, dim, generator=generator, dtype=torch.float64).to(dtype)
    upstream = torch.randn(batch, dim, height, width, generator=generator, dtype=torch.float64).to(dtype)
    return z, codebook, upstream


def run_layer(z, codebook, upstream, **kwargs):
    layer = fastvq.nn.IBQ(codebook.shape[0], codebook.shape[1], **kwargs).to(codebook.dtype)
    layer.embedding.weight.data.copy_(codebook)
    z = z.detach().requires_grad_(True)
    z_q, diff, (_, _, indices) = layer(z)
    losses = diff if isinstance(diff, tuple) else (diff,)
    objective = (z_q * upstream).sum() + losses[0] + (ENTROPY_WEIGHT * losses[-1] if len(losses) > 1 else 0)
    grad_z, grad_codebook = torch.autograd.grad(objective, [z, layer.embedding.weight])
    return z_q.detach(), indices, [loss.detach() for loss in losses], grad_z, grad_codebook


def run_reference(z, codebook, upstream, *, use_entropy_loss=False, cosine_similarity=False, beta=0.25, **weights):
    z = z.detach().double().requires_grad_(True)
    codebook = codebook.detach().double().requires_grad_(True)
    rows = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    quantized, indices, quant_loss, entropy = reference.ibq_ref(
        rows, codebook, beta, l2_normalize=cosine_similarity, **weights
    )
    batch, dim, height, width = z.shape
    z_q = quantized.reshape(batch, height, width, dim).permute(0, 3, 1, 2)
    losses = (quant_loss, *entropy) if use_entropy_loss else (quant_loss,)
    objective = (z_q * upstream.double()).sum() + quant_loss + (ENTROPY_WEIGHT * entropy[2] if use_entropy_loss else 0)
    grad_z, grad_codebook = torch.autograd.grad(objective, [z, codebook])
    return z_q.detach(), indices, [loss.detach() for loss in losses], grad_z, grad_codebook


def assert_matches(got, want, rtol):
    z_q, indices, losses, grad_z, grad_codebook = got
    assert torch.equal(indices, want[1])
    for name, actual, expected in [("z_q", z_q, want[0]), ("grad z", grad_z, want[3]),
                                   ("grad codebook", grad_codebook, want[4])]:
        scale = float(expected.abs().max())
        torch.testing.assert_close(actual.double(), expected, rtol=0, atol=rtol * scale, msg=name)
    assert len(losses) == len(want[2])
    for position, (actual, expected) in enumerate(zip(losses, want[2])):
        torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol, msg=f"loss {position}")


@pytest.mark.parametrize("use_entropy_loss", [False, True], ids=["quant-loss", "entropy-loss"])
@pytest.mark.parametrize("cosine_similarity", [False, True], ids=["dot", "l2-normalised"])
def test_ibq_matches_the_reference_in_float64(monkeypatch, use_entropy_loss, cosine_similarity):
    monkeypatch.setenv("FASTVQ_BACKEND", "torch")
    z, codebook, upstream = ibq_inputs(2, 3, 5, 300, 7, torch.float64)
    options = dict(use_entropy_loss=use_entropy_loss, cosine_similarity=cosine_similarity, beta=0.4,
                   entropy_temperature=0.05, sample_minimization_weight=0.7, batch_maximization_weight=1.3)
    got = run_layer(z, codebook, upstream, **options)
    want = run_reference(z, codebook, upstream, **options)
    assert_matches(got, want, rtol=1e-10)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_ibq_on_the_triton_kernels(monkeypatch):
    monkeypatch.setenv("FASTVQ_BACKEND", "triton")
    z, codebook, upstream = ibq_inputs(1, 3, 6, 40, 5, torch.float32)
    options = dict(use_entropy_loss=True, entropy_temperature=0.5)
    assert_matches(run_layer(z, codebook, upstream, **options), run_reference(z, codebook, upstream, **options),
                   rtol=1e-4)


def test_ibq_keeps_the_reference_interface():
    layer = fastvq.nn.IBQ(10, 4, 0.5, True)
    assert list(layer.state_dict()) == ["embedding.weight"]
    assert (layer.n_e, layer.e_dim, layer.beta, layer.use_entropy_loss, layer.entropy_temperature) == (10, 4, 0.5, True,
                                                                                                      0.01)
    indices = torch.tensor([3, 1, 4, 1, 5, 9])
    entry = layer.get_codebook_entry(indices, (1, 2, 3, 4))
    assert entry.shape == (1, 4, 2, 3)
    assert torch.equal(entry.permute(0, 2, 3, 1).reshape(-1, 4), layer.embedding.weight[indices])
    with pytest.raises(ValueError, match=r"remap='used.npy'\) is not supported"):
        fastvq.nn.IBQ(10, 4, remap="used.npy")
    with pytest.raises(ValueError, match=r"IBQ expects z of shape \[B, 4, H, W\], got \(2, 5, 3, 3\)"):
        layer(torch.zeros(2, 5, 3, 3))
    with pytest.raises(ValueError, match=r"entropy_temperature must be a finite float > 0"):
        fastvq.nn.IBQ(10, 4, entropy_temperature=0.0)


def test_ibq_compiles_without_graph_breaks(monkeypatch):
    monkeypatch.setenv("FASTVQ_BACKEND", "torch")
    layer = fastvq.nn.IBQ(50, 6, use_entropy_loss=True)
    z = torch.randn(2, 6, 3, 3, requires_grad=True)

    def step(z):
        z_q, (quant_loss, _, _, entropy_loss), (_, _, indices) = layer(z)
        return z_q.square().mean() + quant_loss + 0.1 * entropy_loss, indices

    loss, indices = torch.compile(step, fullgraph=True, backend="aot_eager")(z)
    loss.backward()
    eager_loss, eager_indices = step(z)
    assert torch.equal(indices, eager_indices)
    torch.testing.assert_close(loss, eager_loss)
