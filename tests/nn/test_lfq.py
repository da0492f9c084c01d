"""LFQ, ResidualLFQ and GroupedResidualLFQ against vector-quantize-pytorch 1.32 itself: the same
state_dict and input in, the same outputs, indices, entropy and commitment losses (with the loss
breakdown) and input and parameter gradients out. float64 (``force_quantization_f32=False``, so
theirs computes in float64 too) checks the streamed entropy to rounding; float32 with their defaults
checks the drop-in path, where their N x 2^d softmax is the less accurate side."""

from __future__ import annotations

import pytest
import torch

import fastvq.nn as ours

vqp = pytest.importorskip("vector_quantize_pytorch")

LFQ_CONFIGS = {
    "default": dict(dim=8, codebook_size=256),
    "projection-codebooks-commitment": dict(dim=10, codebook_size=32, num_codebooks=2, commitment_loss_weight=0.3),
    "spherical": dict(codebook_size=128, spherical=True, codebook_scale=0.7),
    "fraction-softplus": dict(dim=5, codebook_size=16, frac_per_sample_entropy=0.5,
                              experimental_softplus_entropy_loss=True),
    "cosine-rotation-clamp": dict(dim=5, codebook_size=16, cosine_sim_project_in=True, orthogonal_rotation=True,
                                  soft_clamp_input_value=1.5, diversity_gamma=0.7),
    "odd-bits-activation": dict(codebook_size=2**9, straight_through_activation=torch.nn.Tanh(),
                                entropy_loss_weight=1.0),
}


def _pair(klass, dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    theirs = getattr(vqp, klass)(**kwargs).to(dtype)
    mine = getattr(ours, klass)(**kwargs).to(dtype)
    mine.load_state_dict(theirs.state_dict())
    return theirs, mine


def _run(module, x, seed=1, **kwargs):
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    outputs = module(x, **kwargs)
    return x, outputs


def _flatten(outputs):
    flat = []
    for item in outputs:
        if isinstance(item, (tuple, list)):
            flat += _flatten(item)
        else:
            flat.append(item)
    return flat


def _assert_parity(theirs, mine, x, *, atol, rtol=0.0, check_grads=True, **kwargs):
    x_theirs, got_theirs = _run(theirs, x, **kwargs)
    x_mine, got_mine = _run(mine, x, **kwargs)
    flat_theirs, flat_mine = _flatten(got_theirs), _flatten(got_mine)
    assert len(flat_theirs) == len(flat_mine)
    for index, (a, b) in enumerate(zip(flat_theirs, flat_mine)):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, atol=atol, rtol=rtol, msg=lambda m: f"output {index}: {m}")
        else:
            assert a.dtype == b.dtype and torch.equal(a, b), f"output {index}: {a.dtype} vs {b.dtype}"
    if not check_grads:
        return got_theirs, got_mine
    out_grad = torch.randn_like(flat_theirs[0])
    grads = []
    for module, x_leaf, flat in ((theirs, x_theirs, flat_theirs), (mine, x_mine, flat_mine)):
        loss = (flat[0] * out_grad).sum() + flat[2].sum()
        grads.append(torch.autograd.grad(loss, [x_leaf, *module.parameters()], allow_unused=True))
    for a, b in zip(*grads):
        if a is None:
            assert b is None or not b.abs().max()
        else:
            torch.testing.assert_close(b, a, atol=atol * max(1.0, float(a.abs().max())), rtol=rtol)
    return got_theirs, got_mine


@pytest.mark.parametrize("masked", [None, "rows", "samples"], ids=["all-rows", "mask", "sample-mask"])
@pytest.mark.parametrize("name", list(LFQ_CONFIGS))
def test_lfq_matches_vector_quantize_pytorch_float64(name, masked):
    theirs, mine = _pair("LFQ", **LFQ_CONFIGS[name], force_quantization_f32=False)
    generator = torch.Generator().manual_seed(3)
    # Unit-scale inputs with inv_temperature = 100 put most codes under the 1e-5 clamp; 0.01 does not.
    row_scales = torch.tensor([1.0, 0.01, 0.1])[:, None, None].double()
    x = torch.randn(3, 19, theirs.dim, generator=generator, dtype=torch.float64) * row_scales
    # A [B, n] mask keeps rows; a [B] mask keeps whole samples (the batch entropy over their mean distribution).
    mask = {None: None, "rows": torch.rand(3, 19, generator=generator) > 0.3,
            "samples": torch.tensor([True, False, True])}[masked]
    _assert_parity(theirs, mine, x, atol=1e-10, mask=mask, return_loss_breakdown=True)
    _assert_parity(theirs, mine, x, atol=1e-10, mask=mask, inv_temperature=7.0)
    theirs.eval(), mine.eval()
    _assert_parity(theirs, mine, x, atol=0.0, check_grads=False)  # eval: the codes, no gradient path


def test_lfq_default_float32_and_image_input():
    theirs, mine = _pair("LFQ", dtype=torch.float32, dim=16, codebook_size=2**12, commitment_loss_weight=0.25)
    x = torch.randn(2, 16, 6, 5) * 0.3
    # fp32: their softmax over logits of a few hundred carries ~1e-4 relative error; ours is the float64 value's.
    got_theirs, got_mine = _assert_parity(theirs, mine, x, atol=2e-4, rtol=2e-3, return_loss_breakdown=True)
    assert got_mine[0].indices.shape == (2, 6, 5)
    indices = got_mine[0].indices
    assert torch.equal(mine.indices_to_codes(indices), theirs.indices_to_codes(indices))
    assert torch.equal(mine.codebook, theirs.codebook)


def test_lfq_sample_mask_on_images_matches_vector_quantize_pytorch():
    """A [B] mask on a channel-first image batch: their batch entropy over the kept image's mean distribution
    (not the [B, n] mask's per-row quirk: the entropy loss is not 0), the commitment over its rows only."""
    theirs, mine = _pair("LFQ", dtype=torch.float32, dim=12, codebook_size=2**10, commitment_loss_weight=0.25,
                         entropy_loss_weight=0.1, diversity_gamma=1.0)
    x = torch.randn(2, 12, 6, 5)
    mask = torch.tensor([True, False])
    got_theirs, got_mine = _assert_parity(theirs, mine, x, atol=2e-5, rtol=1e-4, mask=mask,
                                          return_loss_breakdown=True)
    breakdown = got_mine[1]
    assert float(breakdown.batch_entropy) > float(breakdown.per_sample_entropy) + 1.0
    _, (kept_only, _) = _run(mine, x[:1], return_loss_breakdown=True)
    torch.testing.assert_close(got_mine[0].entropy_aux_loss, kept_only.entropy_aux_loss, atol=1e-6, rtol=1e-5)


def test_lfq_correct_masked_batch_entropy():
    """fastvq's option: the batch entropy of the masked rows equals theirs over those rows alone."""
    theirs, mine = _pair("LFQ", dim=6, codebook_size=64, force_quantization_f32=False, commitment_loss_weight=0.5)
    mine.correct_masked_batch_entropy = True
    x = torch.randn(2, 13, 6, dtype=torch.float64) * 0.05
    mask = torch.rand(2, 13) > 0.4
    (_, _, loss), breakdown = mine(x, mask=mask, return_loss_breakdown=True)
    (_, _, their_loss), their_breakdown = theirs(x[mask][None], return_loss_breakdown=True)
    torch.testing.assert_close(loss, their_loss, atol=1e-12, rtol=0)
    for a, b in zip(breakdown, their_breakdown):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("config", [
    dict(dim=7, num_quantizers=3, codebook_size=32, commitment_loss_weight=0.1),
    dict(dim=5, num_quantizers=2, codebook_size=32, soft_clamp_input_value=2.0),
], ids=["projection", "soft-clamp"])
def test_residual_lfq_matches_vector_quantize_pytorch(config):
    theirs, mine = _pair("ResidualLFQ", **config, force_quantization_f32=False)
    x = torch.randn(2, 11, config["dim"], dtype=torch.float64) * 0.1
    mask = torch.rand(2, 11) > 0.2
    got_theirs, got_mine = _assert_parity(theirs, mine, x, atol=1e-10, mask=mask, return_all_codes=True)
    indices = got_mine[1]
    torch.testing.assert_close(mine.get_output_from_indices(indices), theirs.get_output_from_indices(indices))


def test_residual_lfq_quantize_dropout_fixed_seed():
    theirs, mine = _pair("ResidualLFQ", dim=6, num_quantizers=4, codebook_size=64, quantize_dropout=True,
                         force_quantization_f32=False)
    x = torch.randn(2, 9, 6, dtype=torch.float64) * 0.1
    for seed in (3, 8):
        _assert_parity(theirs, mine, x, atol=1e-10, rand_quantize_dropout_fixed_seed=seed)
    coarse = torch.randint(0, 64, (2, 9, 2))
    torch.testing.assert_close(mine.get_codes_from_indices(coarse), theirs.get_codes_from_indices(coarse))


def test_grouped_residual_lfq_matches_vector_quantize_pytorch():
    theirs, mine = _pair("GroupedResidualLFQ", dim=8, groups=2, num_quantizers=2, codebook_size=16,
                         force_quantization_f32=False)
    x = torch.randn(2, 7, 8, dtype=torch.float64) * 0.1
    got_theirs, got_mine = _assert_parity(theirs, mine, x, atol=1e-10, return_all_codes=True)
    torch.testing.assert_close(mine.get_output_from_indices(got_mine[1]), theirs.get_output_from_indices(got_theirs[1]))


def test_lfq_bad_arguments():
    with pytest.raises(ValueError, match="power of 2"):
        ours.LFQ(codebook_size=100)
    with pytest.raises(ValueError, match="dim or codebook_size"):
        ours.LFQ()
    with pytest.raises(ValueError, match="frac_per_sample_entropy"):
        ours.LFQ(dim=4, frac_per_sample_entropy=0.0)
    lfq = ours.LFQ(dim=4)
    with pytest.raises(ValueError, match=r"\[B, n, 4\]"):
        lfq(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="mask"):
        lfq(torch.randn(2, 3, 4), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="floating-point"):
        lfq(torch.ones(2, 3, 4, dtype=torch.int64))


@pytest.mark.parametrize("num_codebooks", [1, 2])
def test_evo_lfq_matches_vector_quantize_pytorch(num_codebooks):
    latent = 4 * num_codebooks  # the bits are the latents: no projection (theirs cannot decode projected bits)

    def build(library):
        torch.manual_seed(0)
        encoder, decoder = torch.nn.Linear(5, latent), torch.nn.Linear(latent, 5)
        return library.EvoLFQ(encoder, decoder, dim=latent, codebook_size=16, num_codebooks=num_codebooks, pop_size=12)

    theirs, mine = build(vqp), build(ours)
    mine.load_state_dict(theirs.state_dict())
    x = torch.randn(6, 5)
    got_theirs, got_mine = theirs(x), mine(x)
    for a, b in zip(got_theirs, got_mine):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    assert torch.equal(mine.encode(x, return_signs=True), theirs.encode(x, return_signs=True))
    bits = theirs.encode(x)
    torch.testing.assert_close(mine.decode_bits(bits), theirs.decode_bits(bits))

    target = torch.randn(5)
    fitness = lambda decoded, bits: -(decoded - target).square().sum(dim=-1)  # noqa: E731
    runs = []
    for module in (theirs, mine):
        torch.manual_seed(4)
        population = module.init_population_from_data(x, mutation_rate=0.1)
        runs.append(list(module.evolve(fitness, pop_bits=population, generations=3, return_best_decoded=True)))
    for a, b in zip(*runs):
        assert torch.equal(a.pop_bits, b.pop_bits) and torch.equal(a.best_gene, b.best_gene)
        assert a.best_fitness == b.best_fitness
        torch.testing.assert_close(b.best_decoded, a.best_decoded)


def _distributed_lfq_worker(rank, world, store, out_dir):
    import os
    import sys

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        lfq = ours.LFQ(dim=6, codebook_size=64, force_quantization_f32=False).double()
        batch = torch.randn(2, 10, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.05
        shard = batch[rank : rank + 1].clone().requires_grad_()
        _, breakdown = lfq(shard, return_loss_breakdown=True)
        breakdown.batch_entropy.backward()
        torch.save((breakdown.batch_entropy.detach(), shard.grad), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see tests/app/test_distributed.py: gloo ranks can abort in interpreter teardown


def test_lfq_batch_entropy_is_averaged_over_ranks(tmp_path):
    """Two gloo ranks on halves of a batch see the batch entropy of the whole batch (their avg_prob
    is all-reduced, as vector-quantize-pytorch's); each rank's gradient is its rows' share of the
    whole batch's, summed over the two ranks' copies of the loss."""
    import torch.multiprocessing as mp

    mp.spawn(_distributed_lfq_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    torch.manual_seed(0)
    lfq = ours.LFQ(dim=6, codebook_size=64, force_quantization_f32=False).double()
    batch = torch.randn(2, 10, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.05
    whole = batch.clone().requires_grad_()
    _, breakdown = lfq(whole, return_loss_breakdown=True)
    breakdown.batch_entropy.backward()
    for rank, (entropy, grad) in enumerate(ranks):
        torch.testing.assert_close(entropy, breakdown.batch_entropy.detach(), atol=1e-12, rtol=0)
        torch.testing.assert_close(grad, 2 * whole.grad[rank : rank + 1], atol=1e-12, rtol=0)
