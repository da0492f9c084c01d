"""LatentQuantize, FSP and BinaryMapper against vector-quantize-pytorch 1.32 itself: the same
state_dict, input and random draws in, the same outputs, indices, losses and gradients out."""

from __future__ import annotations

import pytest
import torch

import fastvq.nn as ours

vqp = pytest.importorskip("vector_quantize_pytorch")


def _pair(klass, *args, dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    theirs = getattr(vqp, klass)(*args, **kwargs).to(dtype)
    mine = getattr(ours, klass)(*args, **kwargs).to(dtype)
    mine.load_state_dict(theirs.state_dict())
    return theirs, mine


def _tensors(outputs):
    """The tensors of a (nested) output structure, in order, dict values by key."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        return [t for key in sorted(outputs) for t in _tensors(outputs[key])]
    return [t for item in outputs for t in _tensors(item)]


def _compare(theirs, mine, x, *, atol=1e-12, seed=2, skip=(), **kwargs):
    results = []
    for module in (theirs, mine):
        leaf = x.clone().requires_grad_()
        torch.manual_seed(seed)
        outputs = module(leaf, **kwargs)
        tensors = _tensors(outputs)
        differentiable = [t for t in tensors if t.requires_grad]
        grad = None
        if differentiable:
            weights = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i), dtype=t.dtype)
                       for i, t in enumerate(differentiable)]
            (grad,) = torch.autograd.grad(sum((t * w).sum() for t, w in zip(differentiable, weights)), leaf)
        results.append((tensors, grad))
    (theirs_out, theirs_grad), (mine_out, mine_grad) = results
    assert len(theirs_out) == len(mine_out)
    for index, (a, b) in enumerate(zip(theirs_out, mine_out)):
        assert a.shape == b.shape, (index, a.shape, b.shape)
        if index in skip:
            continue
        if a.is_floating_point():
            torch.testing.assert_close(b.to(a.dtype), a, atol=atol, rtol=0, msg=lambda m: f"output {index}: {m}")
        else:
            assert torch.equal(a.long(), b.long()), f"output {index}"
    assert (theirs_grad is None) == (mine_grad is None)
    if theirs_grad is not None:
        torch.testing.assert_close(mine_grad, theirs_grad, atol=atol, rtol=0)
    return mine_out


@pytest.mark.parametrize("config", [
    dict(levels=[5, 3, 7], dim=3),
    dict(levels=[4, 4, 3], dim=8, num_codebooks=2),
    dict(levels=5, dim=4, codebook_dim=4, optimize_values=False, commitment_loss_weight=0.3),
], ids=["odd-levels", "projection-codebooks", "int-levels-fixed"])
def test_latent_quantize_matches_vector_quantize_pytorch(config):
    theirs, mine = _pair("LatentQuantize", **config)
    x = torch.randn(2, config["dim"], 5, 3, dtype=torch.float64)
    # Indices (output 1) are checked below: theirs truncates float levels (see the next test).
    _compare(theirs, mine, x, skip=(1,))
    theirs.eval(), mine.eval()
    out, indices, _ = _compare(theirs, mine, x, skip=(1,))
    # fastvq's index is each dimension's argmin level; theirs' float levels, rounded instead of truncated, agree.
    codes = mine.project_in(out.movedim(1, -1)) if not mine.has_projections else None
    if codes is not None:
        levels = theirs._scale_and_shift(codes.unflatten(-1, (mine.num_codebooks, -1))).round()
        expected = (levels * theirs._basis).sum(dim=-1).long()
        assert torch.equal(indices.long(), expected if mine.keep_num_codebooks_dim else expected[..., 0])
    assert torch.equal(mine.implicit_codebook, theirs.implicit_codebook)
    theirs, mine = theirs.float(), mine.float()  # theirs decodes in float32 whatever the projection's dtype
    torch.testing.assert_close(mine.indices_to_codes(indices), theirs.indices_to_codes(indices))


def test_latent_quantize_even_level_indices_are_exact():
    """Theirs truncates 4.9999998 to 4 at level 6 (two codes, one index); fastvq's index is the level."""
    mine = ours.LatentQuantize(levels=[6], dim=1)
    values = mine.values_per_latent[0].detach()
    _, indices, _ = mine(values.reshape(1, 1, 6))
    assert torch.equal(indices.flatten().long(), torch.arange(6))


@pytest.mark.parametrize("config", [
    dict(levels=[8, 5, 5]),
    dict(levels=[7, 4], dim=6, act_name="sigmoid", need_inv_act=True, quantize_rate=0.5, vector_norm="kurt"),
    dict(levels=[3, 3, 3], act_name="normal", quantize_rate=1.0, channel_first=True),
    dict(levels=[4, 6], act_name="laplace", need_inv_act=True, vector_norm="var_laplace"),
    dict(levels=[5, 5], act_name="cauchy", vector_norm="none"),
], ids=["tanh-perturb-all", "sigmoid-inverse-half", "normal-channel-first", "laplace-inverse", "cauchy"])
def test_fsp_matches_vector_quantize_pytorch(config):
    theirs, mine = _pair("FSP", **config)
    shape = (3, theirs.dim, 7) if config.get("channel_first") else (3, 7, theirs.dim)
    x = torch.randn(*shape, dtype=torch.float64)
    _compare(theirs, mine, x, atol=1e-10)
    theirs.eval(), mine.eval()
    _compare(theirs, mine, x, atol=1e-10)
    theirs, mine = theirs.float(), mine.float()  # theirs decodes in float32 whatever the projection's dtype
    _, indices, _, _ = mine(x.float())
    torch.testing.assert_close(mine.indices_to_codes(indices), theirs.indices_to_codes(indices))
    assert repr(mine) == repr(theirs)


@pytest.mark.parametrize("bits", [1, 5, 8])
def test_binary_mapper_matches_vector_quantize_pytorch(bits):
    # float32: theirs' straight-through einsum multiplies the logits with float32 codes
    theirs, mine = _pair("BinaryMapper", bits=bits, dtype=torch.float32)
    logits = torch.randn(3, 4, bits)
    _compare(theirs, mine, logits, atol=1e-6, return_indices=True, reduce_aux_kl_loss=False)
    _compare(theirs, mine, logits, atol=1e-6, temperature=0.5)
    theirs.eval(), mine.eval()
    _compare(theirs, mine, logits, atol=1e-6, deterministic=True, return_indices=True)
    indices = torch.randint(0, 2**bits, (3, 4))
    torch.testing.assert_close(mine.log_prob(logits, indices=indices), theirs.log_prob(logits, indices=indices))
    one_hot = torch.nn.functional.one_hot(indices, 2**bits)
    torch.testing.assert_close(mine.log_prob(logits, one_hot=one_hot, sum_bits=False),
                               theirs.log_prob(logits, one_hot=one_hot, sum_bits=False))


def test_scalar_quantizers_bad_arguments():
    with pytest.raises(ValueError, match="codebook_dim"):
        ours.LatentQuantize(levels=5, dim=4)
    with pytest.raises(ValueError, match=r"\[B, 3, \.\.\.\]"):
        ours.LatentQuantize(levels=[5, 3, 3], dim=3)(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="quantize_rate"):
        ours.FSP(levels=[5], quantize_rate=1.5)
    with pytest.raises(ValueError, match="activation"):
        ours.FSP(levels=[5], act_name="relu")
    with pytest.raises(ValueError, match="last dimension of 3"):
        ours.BinaryMapper(bits=3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="exactly one"):
        ours.BinaryMapper(bits=3).log_prob(torch.randn(2, 3))
