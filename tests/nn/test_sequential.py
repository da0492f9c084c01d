"""fastvq.nn.Sequential against vector-quantize-pytorch 1.32's Sequential: the same state_dict and
input in, the same outputs, indices, losses and gradients out; its argument checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastvq.nn as ours

vqp = pytest.importorskip("vector_quantize_pytorch")


def _chain(library, quantizer):
    return library.Sequential(nn.Linear(6, 4), quantizer, nn.Linear(4, 6))


@pytest.mark.parametrize(
    "klass, kwargs, call_kwargs",
    [
        ("FSQ", dict(levels=[5, 5, 4, 3]), {}),
        ("LFQ", dict(dim=4, codebook_size=16, force_quantization_f32=False), dict(inv_temperature=7.0)),
    ],
)
def test_sequential_matches_vector_quantize_pytorch(klass, kwargs, call_kwargs):
    torch.manual_seed(0)
    theirs = _chain(vqp, getattr(vqp, klass)(**kwargs)).double()
    mine = _chain(ours, getattr(ours, klass)(**kwargs)).double()
    assert mine.state_dict().keys() == theirs.state_dict().keys()
    mine.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    x_theirs, x_mine = x.clone().requires_grad_(), x.clone().requires_grad_()
    got_theirs, got_mine = theirs(x_theirs, **call_kwargs), mine(x_mine, **call_kwargs)
    assert len(got_mine) == len(got_theirs)
    torch.testing.assert_close(got_mine[0], got_theirs[0], atol=1e-12, rtol=0)
    assert torch.equal(got_mine[1], got_theirs[1])
    for a, b in zip(got_theirs[2:], got_mine[2:]):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=0)
    out_grad = torch.randn_like(got_theirs[0])
    loss_theirs = (got_theirs[0] * out_grad).sum() + sum(t.sum() for t in got_theirs[2:])
    loss_mine = (got_mine[0] * out_grad).sum() + sum(t.sum() for t in got_mine[2:])
    grads_theirs = torch.autograd.grad(loss_theirs, [x_theirs, *theirs.parameters()])
    grads_mine = torch.autograd.grad(loss_mine, [x_mine, *mine.parameters()])
    for a, b in zip(grads_theirs, grads_mine):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=0)


def test_sequential_needs_exactly_one_quantizer():
    with pytest.raises(ValueError, match="exactly one quantizer.*got 0"):
        ours.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="exactly one quantizer.*got 2"):
        ours.Sequential(ours.FSQ(levels=[5, 5]), ours.FSQ(levels=[5, 5]))
    with pytest.raises(TypeError, match=r"fns\[1\] must be an nn.Module"):
        ours.Sequential(ours.FSQ(levels=[5, 5]), lambda x: x)
    # vector-quantize-pytorch's own classes are not fastvq's quantizers
    with pytest.raises(ValueError, match="got 0"):
        ours.Sequential(vqp.FSQ(levels=[5, 5]))
