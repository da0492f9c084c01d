"""fastvq.nn.seed_voken against SEED-Voken's own files (vendored unmodified in tests/originals/seed_voken):
IBQ's ``IndexPropagationQuantize`` and Open-MAGVIT2's ``LFQ``. Strict state_dict loads both ways, the same
outputs, indices, losses and gradients over a few training steps, in float64."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _vendored import load_vendored

from fastvq.nn.seed_voken import LFQ, IndexPropagationQuantize

ibq_original = load_vendored("seed_voken/ibq_quantize.py")
lfq_original = load_vendored("seed_voken/lookup_free_quantize.py")

CODES, DIM = 64, 5


def ibq_pair(**kwargs):
    torch.manual_seed(0)
    original = ibq_original.IndexPropagationQuantize(CODES, DIM, **kwargs).double()
    return original, IndexPropagationQuantize.from_original(copy.deepcopy(original))


def ibq_step(layer, z, upstream):
    z = z.clone().requires_grad_(True)
    layer.zero_grad()
    z_q, diff, (_, _, indices) = layer(z)
    losses = diff if isinstance(diff, tuple) else (diff,)
    objective = (z_q * upstream).sum() + losses[0] + (0.3 * losses[-1] if len(losses) > 1 else 0)
    objective.backward()
    return z_q.detach(), indices, [loss.detach() for loss in losses], z.grad, layer.embedding.weight.grad.clone()


@pytest.mark.parametrize("use_entropy_loss", [False, True], ids=["quant-loss", "entropy-loss"])
def test_ibq_training_steps_match_seed_voken_in_float64(use_entropy_loss):
    original, ours = ibq_pair(beta=0.4, use_entropy_loss=use_entropy_loss, entropy_temperature=0.05,
                              sample_minimization_weight=0.7, batch_maximization_weight=1.3)
    optimizers = [torch.optim.SGD(layer.parameters(), lr=0.5) for layer in (original, ours)]
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        z = torch.randn(2, DIM, 3, 4, generator=generator, dtype=torch.float64)
        upstream = torch.randn(z.shape, generator=generator, dtype=torch.float64)
        want = ibq_step(original, z, upstream)
        got = ibq_step(ours, z, upstream)
        assert got[1].shape == want[1].shape == (24,) and torch.equal(got[1], want[1])
        assert len(torch.unique(want[1])) > 8
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
        assert len(got[2]) == len(want[2]) == (4 if use_entropy_loss else 1)
        for position, (actual, expected) in enumerate(zip(got[2], want[2])):
            torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12, msg=f"loss {position}")
        for name, actual, expected in (("grad z", got[3], want[3]), ("grad codebook", got[4], want[4])):
            torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-11, msg=name)
        for optimizer in optimizers:
            optimizer.step()
    torch.testing.assert_close(ours.embedding.weight, original.embedding.weight, rtol=1e-9, atol=1e-11)


def test_ibq_state_dict_codebook_entries_and_the_flags_seed_voken_ignores(tmp_path):
    torch.manual_seed(0)
    original = ibq_original.IndexPropagationQuantize(CODES, DIM)
    ours = IndexPropagationQuantize(CODES, DIM)
    assert list(ours.state_dict()) == list(original.state_dict()) == ["embedding.weight"]
    ours.load_state_dict(original.state_dict(), strict=True)
    torch.nn.init.normal_(ours.embedding.weight)
    original.load_state_dict(ours.state_dict(), strict=True)
    indices = torch.tensor([3, 1, 4, 1, 5, 9])
    for shape in ((1, 2, 3, DIM), None):
        torch.testing.assert_close(ours.get_codebook_entry(indices, shape),
                                   original.get_codebook_entry(indices, shape), rtol=0, atol=0)
    # SEED-Voken never reads cosine_similarity; here it normalises z and the codes.
    original, ours = ibq_pair(cosine_similarity=True)
    z = torch.randn(2, DIM, 3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        original.embedding.weight.copy_(F.normalize(original.embedding.weight, dim=1))
        want_q, _, (_, _, want_indices) = original(F.normalize(z, dim=1))
    got_q, _, (_, _, got_indices) = ours(z)
    assert torch.equal(got_indices, want_indices)
    torch.testing.assert_close(got_q.detach(), want_q, rtol=0, atol=1e-14)
    used = tmp_path / "used.npy"
    np.save(used, np.arange(4))
    with pytest.raises(AttributeError, match="n_embed"):  # SEED-Voken's constructor reads an attribute it never set
        ibq_original.IndexPropagationQuantize(CODES, DIM, remap=str(used))
    with pytest.raises(ValueError, match="remap"):
        IndexPropagationQuantize(CODES, DIM, remap=str(used))


def lfq_step(layer, x, upstream, mask=None):
    x = x.clone().requires_grad_(True)
    (quantized, entropy_aux_loss, indices), breakdown = layer(x, return_loss_breakdown=True, mask=mask)
    objective = (quantized * upstream).sum() + entropy_aux_loss + 0.7 * breakdown.commitment
    objective.backward()
    losses = [entropy_aux_loss.detach(), breakdown.per_sample_entropy.detach(), breakdown.codebook_entropy.detach(),
              breakdown.commitment.detach(), breakdown.avg_probs]
    return quantized.detach(), indices, losses, x.grad


LFQ_CASES = {
    "one-codebook": dict(codebook_size=2**6, sample_minimization_weight=0.8, batch_maximization_weight=1.1),
    "two-codebooks": dict(codebook_size=2**5, num_codebooks=2),
    "factorized": dict(codebook_size=2**6, token_factorization=True, factorized_bits=[2, 4]),
    "published-size": dict(codebook_size=2**18, dim=18),
}


@pytest.mark.parametrize("case", list(LFQ_CASES))
def test_lfq_matches_open_magvit2_in_float64(case):
    options = LFQ_CASES[case]
    original = lfq_original.LFQ(**options).double()
    ours = LFQ.from_original(original)
    assert (ours.dim, ours.codebook_size, ours.num_codebooks, ours.token_factorization) == (
        original.dim, original.codebook_size, original.num_codebooks, original.token_factorization)
    ours.load_state_dict(original.state_dict(), strict=True)
    original.load_state_dict(ours.state_dict(), strict=True)
    assert list(ours.state_dict()) == [] and ours.dtype == original.dtype == torch.float64
    generator = torch.Generator().manual_seed(5)
    batch, height, width = (1, 2, 3) if case == "published-size" else (2, 3, 4)
    # Scaled so that the bit logits 4 x / 0.01 are a few units: the entropies are then far from 0 and log K.
    x = torch.randn(batch, ours.dim, height, width, generator=generator, dtype=torch.float64) * 0.004
    upstream = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    mask = torch.rand(batch, height * width, generator=generator) > 0.3
    for step_mask in (None, mask):
        want = lfq_step(original, x, upstream, step_mask)
        got = lfq_step(ours, x, upstream, step_mask)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        if ours.token_factorization:
            assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got[1], want[1]))
        else:
            assert got[1].dtype == want[1].dtype and torch.equal(got[1], want[1])
        names = ("aux", "per-sample", "codebook", "commitment", "avg_probs")
        for name, actual, expected in zip(names, got[2], want[2]):
            torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12, msg=name)
        assert got[2][1] > 0.1 and got[2][2] > 0.1
        torch.testing.assert_close(got[3], want[3], rtol=1e-9, atol=1e-11)


def test_lfq_eval_mode_lookups_and_inv_temperature():
    original = lfq_original.LFQ(codebook_size=2**6)
    ours = LFQ(codebook_size=2**6)
    x = torch.randn(2, 6, 3, 3, generator=torch.Generator().manual_seed(6)) * 0.01
    for layer in (original, ours):
        layer.eval()
    (want_q, want_aux, want_indices), want_breakdown = original(x, return_loss_breakdown=True)
    (got_q, got_aux, got_indices), got_breakdown = ours(x, return_loss_breakdown=True)
    assert torch.equal(got_q, want_q) and torch.equal(got_indices, want_indices)
    assert got_aux == want_aux == 0 and tuple(got_breakdown) == tuple(want_breakdown) == (0, 0, 0, 0)
    assert torch.equal(ours.codebook, original.codebook)
    assert torch.equal(ours.decode(want_indices.reshape(2, 9, 1)), original.decode(want_indices.reshape(2, 9, 1)))
    bits = original.indices_to_bits(want_indices)
    assert torch.equal(ours.indices_to_bits(want_indices), bits)
    assert torch.equal(ours.bits_to_indices(bits), original.bits_to_indices(bits))
    entries = ours.get_codebook_entry(want_indices.reshape(2, 9), (2, 3, 3, 6), None)
    assert torch.equal(entries, original.get_codebook_entry(want_indices.reshape(2, 9), (2, 3, 3, 6), None))
    assert torch.equal(entries, want_q)
    # SEED-Voken ignores inv_temperature (always 1 / 0.01); here it is the temperature's inverse.
    ours.train()
    logits = 2 * torch.einsum("bnd,kd->bnk", x.flatten(2).transpose(1, 2), original.codebook)
    for inv_temperature in (100.0, 40.0):
        want = lfq_original.entropy_loss(logits, temperature=1 / inv_temperature)
        _, breakdown = ours(x, inv_temperature=inv_temperature, return_loss_breakdown=True)
        torch.testing.assert_close(breakdown.per_sample_entropy, want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(breakdown.codebook_entropy, want[1], rtol=1e-5, atol=1e-6)


def test_lfq_factorized_codebook_entries_and_bad_arguments():
    original = lfq_original.LFQ(codebook_size=2**6, token_factorization=True, factorized_bits=[2, 4])
    ours = LFQ(codebook_size=2**6, token_factorization=True, factorized_bits=[2, 4])
    indices = torch.tensor([[0, 3, 1, 2]])
    for order in ("pre", "post"):
        assert torch.equal(ours.get_codebook_entry(indices, (1, 2, 2, 2 if order == "pre" else 4), order),
                           original.get_codebook_entry(indices, (1, 2, 2, 2 if order == "pre" else 4), order))
    with pytest.raises(ValueError, match="codebook_size must be a power of 2"):
        LFQ(codebook_size=100)
    with pytest.raises(ValueError, match=r"dim must be log2\(codebook_size\) \* num_codebooks = 6"):
        LFQ(codebook_size=2**6, dim=8)
    with pytest.raises(ValueError, match="factorized_bits must be two positive sizes summing to"):
        LFQ(codebook_size=2**6, token_factorization=True)
    with pytest.raises(ValueError, match=r"x must be \[B, dim=6, \.\.\.\], got shape \(2, 5, 3\)"):
        ours(torch.zeros(2, 5, 3))


def test_lfq_training_step_compiles_without_graph_breaks():
    layer = LFQ(codebook_size=2**8).train()

    def step(x):
        (quantized, entropy_aux_loss, indices), breakdown = layer(x, return_loss_breakdown=True)
        return (quantized * quantized).sum() + entropy_aux_loss + breakdown.commitment, indices

    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    loss, indices = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    eager_loss, eager_indices = step(x)
    assert torch.equal(indices, eager_indices)
    torch.testing.assert_close(loss, eager_loss)
