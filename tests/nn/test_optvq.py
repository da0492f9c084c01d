"""fastvq.nn.optvq against OptVQ's own quantizer module (vendored unmodified in tests/originals/optvq/): the same
state_dict keys both ways, and the same outputs, codes, losses and gradients, and the same weights after a few
training steps, for every loss, input layout, head count and Sinkhorn normalisation."""

from __future__ import annotations

import pytest
import torch
from _optvq import load_optvq_quantizer

from fastvq.nn import optvq


@pytest.fixture(scope="module")
def original():
    return load_optvq_quantizer()


def _pair(original, name, **kwargs):
    torch.manual_seed(0)
    theirs = getattr(original, name)(**kwargs)
    ours = getattr(optvq, name)(**kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def _train_and_compare(ours, theirs, shape, steps=2, seed=0):
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.5) for model in (ours, theirs)]
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.randn(shape, generator=generator)
        results = []
        for model, optimizer in zip((ours, theirs), optimizers):
            inputs = x.clone().requires_grad_()
            torch.manual_seed(100 + step)  # the same draws for use_prob's sampling
            x_q, loss, indices = model(inputs)
            (x_q.square().sum() * 0.01 + loss).backward()
            results.append((x_q.detach(), loss.detach(), indices, inputs.grad,
                            {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}))
            optimizer.step()
            optimizer.zero_grad()
        (ours_q, ours_loss, ours_idx, ours_dx, ours_grads), (q, loss, idx, dx, grads) = results
        assert torch.equal(ours_idx, idx), f"step {step}: codes differ"
        torch.testing.assert_close(ours_q, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours_loss, loss, rtol=1e-5, atol=1e-6)
        # OptVQ computes in float32 whatever the module's dtype (x.float()): the cross-entropy's gradient, a
        # tiled recomputation of the softmax here and cdist's backward there, agrees to float32 rounding.
        torch.testing.assert_close(ours_dx, dx, rtol=1e-3, atol=3e-5)
        assert ours_grads.keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(ours_grads[name], grads[name], rtol=1e-3, atol=3e-5, msg=name)
    for (name, ours_param), their_param in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(ours_param, their_param, rtol=1e-3, atol=3e-5, msg=name)


@pytest.mark.parametrize("loss_q_type", ["ce", "l2", "l1"])
@pytest.mark.parametrize("shape, num_head, use_proj", [((2, 8, 3, 5), 1, True), ((3, 7, 8), 2, False)],
                         ids=["image", "sequence-2-heads"])
def test_vector_quantizer_matches_optvq(original, loss_q_type, shape, num_head, use_proj):
    channels = shape[1] if len(shape) == 4 else shape[2]
    ours, theirs = _pair(original, "VectorQuantizer", n_e=12, e_dim=channels, beta=0.25, use_proj=use_proj,
                         loss_q_type=loss_q_type, num_head=num_head)
    _train_and_compare(ours, theirs, shape)


@pytest.mark.parametrize("normalize_mode, use_prob", [("all", False), ("all", True), ("dim", False), ("null", True)])
def test_sinkhorn_quantizer_matches_optvq(original, normalize_mode, use_prob):
    ours, theirs = _pair(original, "VectorQuantizerSinkhorn", epsilon=10.0 if normalize_mode == "all" else 1.0,
                         n_iters=5, normalize_mode=normalize_mode, use_prob=use_prob, n_e=16, e_dim=6)
    _train_and_compare(ours, theirs, (2, 6, 4, 5))


def test_sinkhorn_quantizer_balances_where_the_nearest_code_collapses(original):
    """The point of OptVQ: with every row nearest one code, the Sinkhorn codes still use most of the codebook."""
    torch.manual_seed(0)
    layer = optvq.VectorQuantizerSinkhorn(epsilon=10.0, n_iters=5, use_prob=False, n_e=16, e_dim=4, use_proj=False)
    with torch.no_grad():
        layer.embedding.weight.mul_(5).add_(3)
        layer.embedding.weight[0] = 0
    x = 0.3 * torch.randn(1, 256, 4)
    plain = optvq.VectorQuantizer(n_e=16, e_dim=4, use_proj=False)
    plain.load_state_dict(layer.state_dict())
    assert plain(x)[2].unique().numel() <= 2
    assert layer(x)[2].unique().numel() >= 12


def test_identity_and_embed_code_match_optvq(original):
    ours, theirs = _pair(original, "Identity", n_e=8, e_dim=4)
    x = torch.randn(2, 4, 3, 3)
    for result, expected in zip(ours(x), theirs(x)):
        assert (result is None and expected is None) or torch.equal(result, expected)
    ours, theirs = _pair(original, "VectorQuantizer", n_e=8, e_dim=4, num_head=2)
    code = torch.randint(0, 8, (2, 2 * 9))
    torch.testing.assert_close(ours.embed_code(code), theirs.embed_code(code))
    torch.testing.assert_close(ours.embed_code(code, code_format="sequence"),
                               theirs.embed_code(code, code_format="sequence"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(use_norm=True), "use_norm"), (dict(loss_q_type="mse"), "loss_q_type"),
    (dict(e_dim=6, num_head=4), "num_head"), (dict(n_e=0), "n_e"),
])
def test_bad_arguments_name_themselves(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optvq.VectorQuantizer(**{"n_e": 8, "e_dim": 4, **kwargs})
    with pytest.raises(ValueError, match="normalize_mode"):
        optvq.VectorQuantizerSinkhorn(normalize_mode="max", n_e=8, e_dim=4)
