"""FSQ, ResidualFSQ and GroupedResidualFSQ against vector-quantize-pytorch 1.32 itself: the same
state_dict and input in, the same outputs, indices, input and parameter gradients out (float64 and
float32), over several training steps where noise dropout draws random numbers."""

from __future__ import annotations

import pytest
import torch

import fastvq.nn as ours
from fastvq.functional import finite_scalar_quantize

vqp = pytest.importorskip("vector_quantize_pytorch")

FSQ_CONFIGS = {
    "default": dict(levels=[8, 5, 5, 5]),
    "even-levels": dict(levels=[8, 6, 4]),
    "projection-codebooks": dict(levels=[8, 6, 5], dim=12, num_codebooks=2),
    "symmetric": dict(levels=[4, 4, 3], preserve_symmetry=True),
    "hard-clamp": dict(levels=[7, 5, 4], bound_hard_clamp=True),
    "symmetric-level-2": dict(levels=[2, 3, 2], preserve_symmetry=True, bound_hard_clamp=True),
    "rotation": dict(levels=[5, 5, 5, 5], orthogonal_rotation=True, dim=6, projection_has_bias=False),
    "keep-codebook-axis": dict(levels=[5, 3], keep_num_codebooks_dim=True),
}


def _pair(klass: str, seed: int = 0, dtype=torch.float64, **kwargs):
    torch.manual_seed(seed)
    theirs = getattr(vqp, klass)(**kwargs)
    mine = getattr(ours, klass)(**kwargs)
    mine.load_state_dict(theirs.state_dict())
    return theirs.to(dtype), mine.to(dtype)


def _grads(module, x, out_grad, outputs):
    out = outputs[0]
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad((out * out_grad).sum(), [x, *params], allow_unused=True)
    return grads


def _compare(theirs, mine, x, *, atol, call=lambda m, t: m(t)):
    x_theirs, x_mine = x.clone().requires_grad_(), x.clone().requires_grad_()
    got_theirs, got_mine = call(theirs, x_theirs), call(mine, x_mine)
    assert len(got_theirs) == len(got_mine)
    for a, b in zip(got_theirs[1:], got_mine[1:]):
        if isinstance(a, tuple):
            a, b = torch.stack(a), torch.stack(b)
        if a is None:
            assert b is None
        elif a.is_floating_point():
            torch.testing.assert_close(b, a, atol=atol, rtol=0)
        else:
            assert a.dtype == b.dtype and torch.equal(a, b), (a.dtype, b.dtype)
    torch.testing.assert_close(got_mine[0], got_theirs[0], atol=atol, rtol=0)
    out_grad = torch.randn_like(got_theirs[0])
    for a, b in zip(_grads(theirs, x_theirs, out_grad, got_theirs), _grads(mine, x_mine, out_grad, got_mine)):
        if a is None:
            assert b is None or not b.abs().max()
        else:
            torch.testing.assert_close(b, a, atol=atol, rtol=0)
    return got_theirs, got_mine


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", list(FSQ_CONFIGS))
def test_fsq_matches_vector_quantize_pytorch(name, dtype):
    theirs, mine = _pair("FSQ", dtype=dtype, **FSQ_CONFIGS[name])
    x = (torch.randn(3, 29, theirs.dim, dtype=dtype) * 2)
    got_theirs, got_mine = _compare(theirs, mine, x, atol=1e-6 if dtype == torch.float32 else 1e-12)
    indices = got_mine[1]
    if dtype == torch.float32:  # theirs decodes in float32 whatever the projection's dtype
        assert torch.equal(mine.indices_to_codes(indices), theirs.indices_to_codes(got_theirs[1]))
    assert torch.equal(mine.implicit_codebook, theirs.implicit_codebook)
    codes = mine.project_in(x) if not mine.has_projections else None
    if codes is not None and mine.num_codebooks == 1 and not mine.orthogonal_rotation:
        quantized = mine.quantize(codes)
        assert torch.equal(mine.codes_to_indices(quantized),
                           theirs.codes_to_indices(quantized).long().to(indices.dtype))


def test_fsq_image_input_and_bf16():
    theirs, mine = _pair("FSQ", dtype=torch.float32, levels=[8, 5, 5], dim=16)
    x = torch.randn(2, 16, 5, 7)
    _compare(theirs, mine, x, atol=1e-6)
    # bf16 activations are quantized in float32 (force_quantization_f32) and cast back.
    theirs, mine = theirs.bfloat16(), mine.bfloat16()
    out_theirs, idx_theirs = theirs(x.bfloat16())
    out_mine, idx_mine = mine(x.bfloat16())
    assert out_mine.dtype == torch.bfloat16 and torch.equal(out_mine, out_theirs) and torch.equal(idx_mine, idx_theirs)


def test_fsq_noise_dropout_training_steps():
    theirs, mine = _pair("FSQ", dtype=torch.float32, levels=[8, 8, 5], preserve_symmetry=True, noise_dropout=0.5)
    theirs.train(), mine.train()
    for step in range(3):
        x = torch.randn(2, 33, 3)
        torch.manual_seed(10 + step)
        out_theirs, idx_theirs = theirs(x)
        torch.manual_seed(10 + step)
        out_mine, idx_mine = mine(x)
        assert torch.equal(out_mine, out_theirs) and torch.equal(idx_mine, idx_theirs)
        assert idx_mine.min() >= 0 and idx_mine.max() < mine.codebook_size


@pytest.mark.parametrize("config", [
    dict(levels=[8, 5, 5], num_quantizers=3),
    dict(levels=[7, 6], num_quantizers=4, dim=5, bound_hard_clamp=False, soft_clamp_input_value=1.5),
    dict(levels=[5, 4, 3], num_quantizers=3, bound_hard_clamp=False),
], ids=["hard-clamp", "projection-soft-clamp", "tanh"])
def test_residual_fsq_matches_vector_quantize_pytorch(config):
    theirs, mine = _pair("ResidualFSQ", **config)
    x = torch.randn(2, 23, theirs.project_in.in_features if theirs.has_projections else len(config["levels"]),
                    dtype=torch.float64)
    call = lambda module, t: module(t, return_all_codes=True)  # noqa: E731
    got_theirs, got_mine = _compare(theirs, mine, x, atol=1e-12, call=call)
    all_indices = got_mine[1]
    torch.testing.assert_close(mine.get_output_from_indices(all_indices), theirs.get_output_from_indices(all_indices))


def test_residual_fsq_quantize_dropout_fixed_seed_and_channel_first():
    config = dict(levels=[8, 5, 5], num_quantizers=4, quantize_dropout=True, quantize_dropout_multiple_of=2,
                  is_channel_first=True, dim=6)
    theirs, mine = _pair("ResidualFSQ", **config)
    theirs.train(), mine.train()
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    for seed in (1, 2, 3, 4):
        call = lambda module, t: module(t, rand_quantize_dropout_fixed_seed=seed)  # noqa: E731
        got_theirs, got_mine = _compare(theirs, mine, x, atol=1e-12, call=call)
        assert got_mine[1].shape == (2, 4, 4, 5)
    # Coarse indices (fewer layers) decode with -1 padding, as theirs.
    coarse = torch.randint(0, mine.codebook_size, (2, 9, 2))
    torch.testing.assert_close(mine.get_codes_from_indices(coarse), theirs.get_codes_from_indices(coarse))


def test_residual_fsq_quantize_dropout_drawn_on_device():
    mine = ours.ResidualFSQ(levels=[5, 5], num_quantizers=5, quantize_dropout=True,
                            quantize_dropout_cutoff_index=1).train()
    torch.manual_seed(0)
    kept = set()
    for _ in range(30):
        _, indices = mine(torch.randn(1, 8, 2))
        dropped = (indices[0, 0] == -1).long()
        # dropped layers form a suffix that never reaches the cutoff layer
        assert torch.equal(dropped, dropped.sort().values) and not dropped[:2].any()
        kept.add(int((dropped == 0).sum()))
    assert kept == {2, 3, 4, 5}


def test_grouped_residual_fsq_matches_vector_quantize_pytorch():
    theirs, mine = _pair("GroupedResidualFSQ", dim=8, groups=2, levels=[5, 5, 3], num_quantizers=2)
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    call = lambda module, t: module(t, return_all_codes=True)  # noqa: E731
    got_theirs, got_mine = _compare(theirs, mine, x, atol=1e-12, call=call)
    torch.testing.assert_close(mine.get_output_from_indices(got_mine[1]), theirs.get_output_from_indices(got_theirs[1]))


def test_paper_bound_keeps_large_levels_on_the_grid():
    levels = [1003, 5]
    x = torch.tensor([[[20.0, 0.0], [-20.0, 0.0], [0.3, 2.0]]])
    theirs = vqp.FSQ(levels=levels)
    _, their_indices = theirs(x)
    # vector-quantize-pytorch rounds past the top level: level 1003 of 1003 aliases into the next digit
    assert int(their_indices[0, 0]) == 1003 + 2 * 1003
    mine = ours.FSQ(levels=levels, paper_bound=True)
    out, indices = mine(x)
    assert indices.max() < mine.codebook_size
    assert torch.equal(mine.codes_to_indices(out), indices)
    assert torch.equal(mine.indices_to_codes(indices), out)
    assert float(out.max()) <= 1.0 and float(out.min()) >= -1.0


def test_finite_scalar_quantize_function():
    z = torch.randn(40, 3, requires_grad=True)
    codes, level_indices = finite_scalar_quantize(z, torch.tensor([8, 5, 3]))
    their_codes = vqp.FSQ(levels=[8, 5, 3]).quantize(z)
    assert torch.equal(codes, their_codes)
    assert level_indices.dtype == torch.int64 and level_indices.min() >= 0
    assert (level_indices < torch.tensor([8, 5, 3])).all()
    codes.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    nan_codes, nan_levels = finite_scalar_quantize(torch.full((1, 3), float("nan")), torch.tensor([8, 5, 3]))
    assert nan_codes.isnan().all() and torch.equal(nan_levels, torch.zeros(1, 3, dtype=torch.int64))


def test_fsq_bad_arguments():
    with pytest.raises(ValueError, match="preserve_symmetry"):
        ours.FSQ(levels=[2, 5])
    with pytest.raises(ValueError, match="levels"):
        ours.FSQ(levels=[8, 1], preserve_symmetry=True)
    with pytest.raises(ValueError, match="noise_dropout"):
        ours.FSQ(levels=[8, 5], noise_dropout=0.1)
    with pytest.raises(ValueError, match="keep_num_codebooks_dim"):
        ours.FSQ(levels=[8, 5], num_codebooks=2, keep_num_codebooks_dim=False)
    fsq = ours.FSQ(levels=[8, 5])
    with pytest.raises(ValueError, match=r"\[B, n, 2\]"):
        fsq(torch.randn(2, 7, 3))
    with pytest.raises(TypeError, match="floating-point"):
        fsq(torch.ones(2, 7, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="levels"):
        finite_scalar_quantize(torch.randn(4, 2), torch.tensor([8, 5, 5]))
    with pytest.raises(ValueError, match="groups"):
        ours.GroupedResidualFSQ(dim=7, groups=2, levels=[5], num_quantizers=2)
    rfsq = ours.ResidualFSQ(levels=[5, 5], num_quantizers=3)
    with pytest.raises(ValueError, match="quantize_dropout"):
        rfsq.get_codes_from_indices(torch.zeros(1, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 25\)"):
        rfsq.get_codes_from_indices(torch.full((1, 4, 3), 25))
