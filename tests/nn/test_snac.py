"""fastvq.nn.snac against SNAC's own ``snac.vq`` (loaded from its installed file with its ``snac.layers``), in
float64: per-level strides (average pooling, repeated outputs), codes, outputs, gradients, state_dict keys."""

import copy

import pytest
import torch
from _originals import load_original

from fastvq.nn import snac as ours_module

vq = load_original("snac.vq")

DIM, CODES, STRIDES = 10, 16, [4, 2, 1]


def _pair():
    torch.manual_seed(0)
    theirs = vq.ResidualVectorQuantize(input_dim=DIM, codebook_size=CODES, codebook_dim=3, vq_strides=STRIDES).double()
    return theirs, ours_module.ResidualVectorQuantize.from_original(copy.deepcopy(theirs))


def _run(module, z):
    z = z.clone().requires_grad_()
    module.zero_grad()
    z_q, codes = module(z)
    (z_q * torch.linspace(-1, 1, z_q.numel(), dtype=z.dtype).view_as(z_q)).sum().backward()
    return z_q, codes, z.grad, {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_snac(training):
    theirs, mine = _pair()
    theirs.train(training)
    mine.train(training)
    optimizers = [torch.optim.SGD(module.parameters(), lr=0.5) for module in (theirs, mine)]
    for _ in range(3):
        z = torch.randn(3, DIM, 16, dtype=torch.float64)
        z_q_theirs, codes_theirs, grad_theirs, params_theirs = _run(theirs, z)
        z_q_mine, codes_mine, grad_mine, params_mine = _run(mine, z)
        assert [c.shape[-1] for c in codes_mine] == [16 // stride for stride in STRIDES]
        assert all(torch.equal(a, b) for a, b in zip(codes_mine, codes_theirs))
        torch.testing.assert_close(z_q_mine, z_q_theirs)
        torch.testing.assert_close(grad_mine, grad_theirs)
        assert params_mine.keys() == params_theirs.keys()
        for name in params_theirs:
            torch.testing.assert_close(params_mine[name], params_theirs[name], msg=name)
        torch.testing.assert_close(mine.from_codes(codes_mine), theirs.from_codes(codes_theirs))
        for optimizer in optimizers:
            optimizer.step()


def test_state_dict_loads_strictly_both_ways():
    theirs, _ = _pair()
    mine = ours_module.ResidualVectorQuantize(input_dim=DIM, codebook_size=CODES, codebook_dim=3,
                                              vq_strides=STRIDES).double()
    assert mine.state_dict().keys() == theirs.state_dict().keys()
    assert "quantizers.0.in_proj.parametrizations.weight.original0" in mine.state_dict()
    mine.load_state_dict(theirs.state_dict(), strict=True)
    fresh = vq.ResidualVectorQuantize(input_dim=DIM, codebook_size=CODES, codebook_dim=3, vq_strides=STRIDES).double()
    fresh.load_state_dict(mine.state_dict(), strict=True)
    z = torch.randn(2, DIM, 8, dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(mine(z)[1], theirs(z)[1]))
    assert all(torch.equal(a, b) for a, b in zip(fresh(z)[1], theirs(z)[1]))


def test_from_original_gives_the_same_codes_on_float32():
    torch.manual_seed(2)
    theirs = vq.ResidualVectorQuantize(input_dim=DIM, codebook_size=CODES, codebook_dim=4, vq_strides=[2, 1]).eval()
    mine = ours_module.ResidualVectorQuantize.from_original(theirs)
    assert not mine.training
    z = torch.randn(4, DIM, 40)
    assert all(torch.equal(a, b) for a, b in zip(mine(z)[1], theirs(z)[1]))


@pytest.mark.parametrize("build, error, message", [
    (lambda: ours_module.ResidualVectorQuantize(vq_strides=[]), ValueError, "vq_strides"),
    (lambda: ours_module.ResidualVectorQuantize(vq_strides=[2, 0]), ValueError, "stride"),
    (lambda: ours_module.ResidualVectorQuantize(4, 8, 2, [4, 1])(torch.randn(1, 4, 6)), ValueError, "multiple"),
    (lambda: ours_module.ResidualVectorQuantize(4, 8, 2, [1])(torch.randn(1, 3, 6)), ValueError, r"\[B, 4, T\]"),
    (lambda: ours_module.ResidualVectorQuantize(4, 8, 2, [1, 1]).from_codes([torch.zeros(1, 2).long()]), ValueError,
     "2 tensors"),
], ids=["no-levels", "zero-stride", "length", "channels", "codes"])
def test_bad_arguments(build, error, message):
    with pytest.raises(error, match=message):
        build()
