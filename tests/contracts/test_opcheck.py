"""Every torch.ops.fastvq operator passes torch.library.opcheck on every backend.

opcheck runs the op through its schema, fake (meta) implementation, autograd registration and
AOT dispatch, and fails if any of them disagrees with the real implementation.
"""

import pytest
import torch

import fastvq  # noqa: F401  (registers the ops)

DTYPES = [torch.float32, torch.bfloat16]


def _inputs(device, dtype, num_rows=19, num_codes=21, dim=18, requires_grad=False):
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(num_rows, dim, generator=generator).to(device=device, dtype=dtype)
    codebook = torch.randn(num_codes, dim, generator=generator).to(device=device, dtype=dtype)
    return z.requires_grad_(requires_grad), codebook.requires_grad_(requires_grad)


@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
@pytest.mark.parametrize("return_codes", [False, True])
def test_nearest_code_opcheck(backend, metric, return_codes):
    z, codebook = _inputs(backend[1], torch.float32)
    torch.library.opcheck(torch.ops.fastvq.nearest_code.default, (z, codebook, metric, return_codes))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codebook_grad", [True, False])
@pytest.mark.parametrize("rotation_trick", [False, True])
def test_vector_quantize_opcheck(backend, dtype, codebook_grad, rotation_trick):
    z, codebook = _inputs(backend[1], dtype, requires_grad=True)
    codebook.requires_grad_(codebook_grad)
    torch.library.opcheck(torch.ops.fastvq.vector_quantize.default, (z, codebook, "l2", 0.25, 1.0, rotation_trick))


def test_sampled_search_opcheck(backend):
    z, codebook = _inputs(backend[1], torch.float32)
    seed = torch.tensor(7, device=z.device)
    torch.library.opcheck(torch.ops.fastvq.nearest_code.default, (z, codebook, "l2", True, 0.5, seed))


def test_vector_quantize_backward_opcheck(backend):
    z, codebook = _inputs(backend[1], torch.float32)
    indices, _, quantized = torch.ops.fastvq.nearest_code(z, codebook, "l2", True)
    grad_quantized = torch.randn_like(z)
    grad_loss = torch.tensor(1.5, device=z.device)
    torch.library.opcheck(
        torch.ops.fastvq.vector_quantize_backward.default,
        (grad_quantized, grad_loss, z, quantized, indices, codebook.shape[0], 0.25, 1.0, True),
    )


@pytest.mark.parametrize("deterministic", [False, True])
def test_segment_reduce_opcheck(backend, deterministic):
    z, _ = _inputs(backend[1], torch.float32)
    indices = torch.randint(0, 7, (z.shape[0],), device=z.device)
    torch.library.opcheck(torch.ops.fastvq.segment_reduce.default, (z, indices, 7, deterministic))


@pytest.mark.parametrize("debias", [False, True])
def test_ema_update_opcheck(backend, debias):
    z, codebook = _inputs(backend[1], torch.float32)
    indices = torch.ops.fastvq.nearest_code(z, codebook, "l2", False)[0]
    cluster_size = torch.ones(codebook.shape[0], device=z.device)
    embed_avg = codebook.clone()
    step = torch.zeros((), dtype=torch.int64, device=z.device) if debias else None
    torch.library.opcheck(
        torch.ops.fastvq.ema_update_.default,
        (codebook, cluster_size, embed_avg, z, indices, 0.9, 1e-5, step, False),
    )
