"""Arguments that used to reach a kernel or poison state: sparse tensors, in-place outputs that share
memory, unbatched convolution inputs, and float arguments that are NaN, infinite or out of range."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastvq
from fastvq import reference
from fastvq.nn import MaskedConv2d


def test_sparse_tensors_are_a_type_error_naming_the_argument():
    z, codebook = torch.randn(6, 4), torch.randn(5, 4)
    sparse = z.to_sparse()
    for call, name in [
        (lambda: fastvq.nearest_code(sparse, codebook), "z"),
        (lambda: fastvq.nearest_code(z, codebook.to_sparse()), "codebook"),
        (lambda: fastvq.vector_quantize(sparse, codebook), "z"),
        (lambda: fastvq.segment_reduce(sparse, torch.zeros(6, dtype=torch.long), 5), "values"),
        (lambda: fastvq.masked_conv2d(torch.randn(1, 2, 5, 5).to_sparse(), torch.randn(3, 2, 3, 3)), "x"),
        (lambda: fastvq.soft_quantize(sparse, codebook), "z"),
    ]:
        with pytest.raises(TypeError, match=f"^{name} must be a dense"):
            call()


@pytest.mark.parametrize("name", ["codebook", "cluster_size", "embed_avg"])
def test_ema_update_refuses_state_that_shares_memory(name):
    state = {"codebook": torch.randn(5, 4), "cluster_size": torch.ones(5), "embed_avg": torch.randn(5, 4)}
    state[name] = state[name][:1].expand(state[name].shape)
    with pytest.raises(ValueError, match=f"^{name} is updated in place but several of its elements share memory"):
        fastvq.ema_update_(state["codebook"], state["cluster_size"], state["embed_avg"], torch.randn(3, 4),
                           torch.tensor([0, 1, 2]), decay=0.9, eps=1e-5)


def test_masked_conv_takes_unbatched_input_as_conv2d_does():
    layer = MaskedConv2d("B", 3, 4, 3, padding=1)
    x = torch.randn(3, 7, 6)
    expected = F.conv2d(x, layer.weight * reference.pixelcnn_mask_ref("B", 3), layer.bias, padding=1)
    out = layer(x)
    assert out.shape == (4, 7, 6)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, layer(x[None])[0])
    functional = fastvq.masked_conv2d(x, layer.weight, layer.bias, mask_type="B", padding=1)
    torch.testing.assert_close(functional, expected)
    out.sum().backward()  # the gradient flows through the unbatched call too
    assert layer.weight.grad is not None
    with pytest.raises(ValueError, match=r"x must be 3-D \[C_in, H, W\] \(unbatched\) or 4-D"):
        layer(torch.randn(7, 6))
