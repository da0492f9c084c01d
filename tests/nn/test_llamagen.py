"""fastvq.nn.llamagen.VectorQuantizer against LlamaGen's own ``VectorQuantizer`` (vendored unmodified in
tests/originals/llamagen): strict state_dict loads both ways, the same outputs, indices, losses (the entropy
loss streamed here, over the full ``N x K`` softmax there), codebook usage, ``codebook_used`` buffer and
gradients over a few training steps, in float64."""

from __future__ import annotations

import pytest
import torch
from _vendored import load_vendored

from fastvq.nn.llamagen import VectorQuantizer

original_module = load_vendored("llamagen/vq_model.py")

CODES, DIM = 50, 6


def make_pair(l2_norm=True, entropy_loss_ratio=0.3, show_usage=True, beta=0.25):
    torch.manual_seed(0)
    original = original_module.VectorQuantizer(CODES, DIM, beta, entropy_loss_ratio, l2_norm, show_usage)
    # .double() also turns LlamaGen's Parameter-as-buffer codebook_used into a tensor that its in-place
    # update accepts (on CPU, as a Parameter, it raises).
    original = original.double()
    with torch.no_grad():
        original.embedding.weight.normal_()
    return original, VectorQuantizer.from_original(original)


def step(layer, z, upstream):
    z = z.clone().requires_grad_(True)
    layer.zero_grad()
    z_q, losses, (_, _, indices) = layer(z)
    vq_loss, commit_loss, entropy_loss, usage = losses
    objective = (z_q * upstream).sum() + vq_loss + commit_loss + entropy_loss
    objective.backward()
    detached = [loss.detach() for loss in (vq_loss, commit_loss, entropy_loss)]
    return z_q.detach(), indices, detached, usage, z.grad, layer.embedding.weight.grad.clone()


@pytest.mark.parametrize("l2_norm", [True, False], ids=["l2-normalised", "plain"])
def test_training_steps_match_llamagen_in_float64(l2_norm):
    original, ours = make_pair(l2_norm=l2_norm)
    optimizers = [torch.optim.SGD(layer.parameters(), lr=0.5) for layer in (original, ours)]
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        z = torch.randn(2, DIM, 4, 5, generator=generator, dtype=torch.float64)
        upstream = torch.randn(z.shape, generator=generator, dtype=torch.float64)
        want = step(original, z, upstream)
        got = step(ours, z, upstream)
        assert got[1].dtype == torch.int64 and torch.equal(got[1], want[1])
        assert len(torch.unique(want[1])) > 8
        torch.testing.assert_close(got[0], want[0], rtol=1e-11, atol=1e-12)
        for name, actual, expected in zip(("vq_loss", "commit_loss", "entropy_loss"), got[2], want[2]):
            torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12, msg=name)
        assert got[2][2].abs() > 1e-3  # the entropy loss is in play
        assert got[3] == want[3]
        for name, actual, expected in (("grad z", got[4], want[4]), ("grad codebook", got[5], want[5])):
            torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-11, msg=name)
        for optimizer in optimizers:
            optimizer.step()
    assert torch.equal(ours.codebook_used, original.codebook_used.detach())
    torch.testing.assert_close(ours.embedding.weight, original.embedding.weight, rtol=1e-9, atol=1e-11)


def test_eval_mode_and_no_entropy_loss_match_llamagen():
    original, ours = make_pair(entropy_loss_ratio=0.0)
    z = torch.randn(3, DIM, 2, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = original(z)
    got = ours(z)
    assert got[1][2] == want[1][2] == 0 and got[1][3] == want[1][3]
    original.eval()
    ours.eval()
    want = original(z)
    got = ours(z)
    assert got[1] == want[1] == (None, None, None, 0)
    assert torch.equal(got[2][2], want[2][2])
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-15)


def test_state_dicts_load_strictly_both_ways_and_codebook_entries_match():
    torch.manual_seed(0)
    original = original_module.VectorQuantizer(CODES, DIM, 0.25, 0.0, True, True)
    ours = VectorQuantizer(CODES, DIM, 0.25, 0.0, True, True)
    assert list(ours.state_dict()) == list(original.state_dict()) == ["codebook_used", "embedding.weight"]
    ours.load_state_dict(original.state_dict(), strict=True)
    torch.nn.init.normal_(ours.embedding.weight)
    ours.codebook_used[:3] = torch.tensor([4.0, 7.0, 9.0])
    original.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(original.codebook_used, ours.codebook_used)
    indices = torch.tensor([3, 1, 4, 1, 5, 9])
    for shape, channel_first in ((None, True), ((1, DIM, 2, 3), True), ((1, 2, 3, DIM), False)):
        torch.testing.assert_close(ours.get_codebook_entry(indices, shape, channel_first),
                                   original.get_codebook_entry(indices, shape, channel_first), rtol=0, atol=0)
    plain = VectorQuantizer(CODES, DIM, 0.25, 0.0, False, False)
    assert list(plain.state_dict()) == ["embedding.weight"]


def test_the_usage_window_keeps_the_latest_indices():
    layer = VectorQuantizer(4, 2, 0.25, 0.0, False, True)
    with torch.no_grad():
        layer.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]]))
    _, (_, _, _, usage), (_, _, indices) = layer(torch.tensor([[[[5.0, 0.1]], [[0.2, 5.0]]]]))
    assert indices.tolist() == [1, 2] and layer.codebook_used[-2:].tolist() == [1.0, 2.0]
    assert usage == 3 / 4  # the zeros the window starts with count code 0, as in LlamaGen


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="e_dim must be a positive int"):
        VectorQuantizer(8, 0, 0.25, 0.0, True, True)
    with pytest.raises(ValueError, match=r"z must be a feature map \[B, e_dim=4, H, W\], got shape \(2, 3, 5\)"):
        VectorQuantizer(8, 4, 0.25, 0.0, True, True)(torch.zeros(2, 3, 5))


def test_training_step_compiles_without_graph_breaks():
    layer = VectorQuantizer(CODES, DIM, 0.25, 0.1, True, False)

    def step(z):
        z_q, (vq_loss, commit_loss, entropy_loss, _), (_, _, indices) = layer(z)
        return (z_q * z_q).sum() + vq_loss + commit_loss + entropy_loss, indices

    z = torch.randn(2, DIM, 3, 3, requires_grad=True)
    loss, indices = torch.compile(step, fullgraph=True, backend="aot_eager")(z)
    eager_loss, eager_indices = step(z)
    assert torch.equal(indices, eager_indices)
    torch.testing.assert_close(loss, eager_loss)
