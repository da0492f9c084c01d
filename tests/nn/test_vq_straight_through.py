"""VectorQuantize(straight_through=True) against vector-quantize-pytorch 1.32 itself.

Their Gumbel straight-through (``gumbel_sample(..., straight_through=True)``) makes the codebook's
output ``(one_hot + p - sg(p)) @ codes`` with ``p = softmax(-cdist / T)``; the layer then applies
the plain straight-through estimator ``x + sg(q - x)`` whenever its input requires a gradient, so
``p``'s gradient only survives when the input does not (a frozen input feeding ``project_in``).
Both cases are checked here: the first against their layer step for step, the second against
their ``project_in`` gradient, which flows through ``p`` (``fastvq.soft_quantize``, never N x K).
With ``stochastic_sample_codes`` the Gumbel noise cannot be made equal (theirs is an N x K draw
from torch's generator, ours Philox keyed by position), so the codes are checked against the
distribution ``softmax(-cdist / T)``, and the gradients where they do not depend on the noise.
"""

import pytest
import torch
import torch.nn.functional as F
from vector_quantize_pytorch import VectorQuantize as TheirVectorQuantize

from fastvq.nn import VectorQuantize

DIM, CODES = 16, 24


def _pair(seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs = dict(dict(dim=DIM, codebook_size=CODES, straight_through=True, rotation_trick=False), **kwargs)
    theirs = TheirVectorQuantize(**kwargs)
    ours = VectorQuantize(**kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _step(layer, x, upstream, input_grad=True):
    x = x.clone().requires_grad_(input_grad)
    quantized, indices, loss = layer(x)
    ((quantized * upstream).sum() + loss).backward()
    return quantized.detach(), indices, loss.detach(), x.grad


def _grads(layer):
    return {name: param.grad for name, param in layer.named_parameters() if param.grad is not None}


CONFIGS = {
    "l2": dict(commitment_weight=0.7),
    "cosine": dict(use_cosine_sim=True, commitment_weight=0.5, sample_codebook_temp=0.5),
    "heads": dict(heads=2, codebook_dim=8, sample_codebook_temp=2.0),
}


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_input_with_gradient_matches_vector_quantize_pytorch(config):
    """Input requiring a gradient: their straight-through output is ``x + sg(q - x)``; indices,
    output, loss, input gradient and EMA state over training steps are theirs."""
    theirs, ours = _pair(**CONFIGS[config])
    for step in range(2):
        x, upstream = torch.randn(2, 30, DIM) + 0.3 * step, torch.randn(2, 30, DIM)
        got, want = _step(ours, x, upstream), _step(theirs, x, upstream)
        assert torch.equal(got[1], want[1]), f"step {step}: indices differ"
        for name, a, b in zip(("quantized", "loss", "x.grad"), got[::2] + got[3:], want[::2] + want[3:]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}: {name}")
        for name in ("embed", "embed_avg", "cluster_size"):
            torch.testing.assert_close(getattr(ours._codebook, name), getattr(theirs._codebook, name),
                                       rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("config", ["l2", "cosine"])
def test_frozen_input_gradient_through_the_soft_assignment(config):
    """Input without a gradient, ``project_in`` trained: the gradient reaches ``project_in``
    through ``p = softmax(-cdist / T)`` (and the commitment loss), as theirs does.

    Their EMA step rewrites the codes in place (through ``.data``, unseen by autograd) before the
    backward, which then runs with the updated codes; fastvq's uses the codes of the forward. So
    the gradients are compared with their layer without the EMA update (same forward codes), and
    the EMA state with their layer that has it."""
    kwargs = dict(CONFIGS[config], codebook_dim=8)
    theirs, ours = _pair(**kwargs)
    theirs_frozen = TheirVectorQuantize(dim=DIM, codebook_size=CODES, straight_through=True, rotation_trick=False,
                                        ema_update=False, **kwargs)
    theirs_frozen.load_state_dict(theirs.state_dict())
    x, upstream = torch.randn(2, 30, DIM), torch.randn(2, 30, DIM)
    got = _step(ours, x, upstream, input_grad=False)
    want = _step(theirs_frozen, x, upstream, input_grad=False)
    _step(theirs, x, upstream, input_grad=False)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-6)
    grads_ours, grads_theirs = _grads(ours), _grads(theirs_frozen)
    assert grads_ours.keys() == grads_theirs.keys() and "project_in.weight" in grads_ours
    for name in grads_theirs:
        torch.testing.assert_close(grads_ours[name], grads_theirs[name], rtol=1e-4, atol=1e-6, msg=name)
    for name in ("embed", "embed_avg", "cluster_size"):
        torch.testing.assert_close(getattr(ours._codebook, name), getattr(theirs._codebook, name),
                                   rtol=1e-5, atol=1e-5, msg=name)
    # The soft part carries a gradient of its own: their layer without it gives project_in another one.
    plain = TheirVectorQuantize(dim=DIM, codebook_size=CODES, rotation_trick=False, ema_update=False, **kwargs)
    plain.load_state_dict(theirs_frozen.state_dict())
    _step(plain, x, upstream, input_grad=False)
    assert not torch.allclose(plain.project_in.weight.grad, grads_ours["project_in.weight"])


def test_stochastic_codes_follow_the_softmax_of_the_distances():
    """``stochastic_sample_codes``: each row's code is a sample of ``softmax(-|x - e| / T)``
    (their ``gumbel_sample``). 20 000 rows of one vector, total variation to the exact distribution
    (their layer's draws as the yardstick of sampling noise)."""
    temperature = 0.4
    theirs, ours = _pair(stochastic_sample_codes=True, sample_codebook_temp=temperature, ema_update=False)
    x = (0.05 * torch.randn(DIM)).expand(1, 20000, DIM).contiguous()
    codes = theirs._codebook.embed[0]
    expected = F.softmax(-torch.cdist(x[0, :1], codes) / temperature, dim=-1)[0]
    assert expected.max() < 0.5  # a spread distribution: the test can tell sampling from argmax
    torch.manual_seed(1)
    _, indices_ours, _ = ours(x.clone().requires_grad_())
    _, indices_theirs, _ = theirs(x.clone().requires_grad_())
    frequencies = [torch.bincount(indices.flatten(), minlength=CODES).double() / indices.numel()
                   for indices in (indices_ours, indices_theirs)]
    tv_ours, tv_theirs = (0.5 * (freq - expected.double()).abs().sum().item() for freq in frequencies)
    assert tv_ours < 0.05 and tv_theirs < 0.05, (tv_ours, tv_theirs)
    # Eval mode takes the nearest code, as theirs does.
    ours.eval()
    _, nearest, _ = ours(x[:, :3])
    assert torch.equal(nearest, torch.cdist(x[0, :3], codes).argmin(-1)[None])


def test_stochastic_frozen_input_gradient_does_not_depend_on_the_noise():
    """With sampled codes and no commitment loss, ``project_in``'s gradient is the soft part's alone,
    which has no noise in it (the noise only picks the hard code): equal to theirs though the codes
    they drew differ."""
    theirs, ours = _pair(stochastic_sample_codes=True, sample_codebook_temp=0.8, commitment_weight=0.0,
                         codebook_dim=8, ema_update=False)
    x, upstream = torch.randn(2, 30, DIM), torch.randn(2, 30, DIM)
    torch.manual_seed(3)
    got = _step(ours, x, upstream, input_grad=False)
    _step(theirs, x, upstream, input_grad=False)
    assert got[1].unique().numel() > 1
    torch.testing.assert_close(ours.project_in.weight.grad, theirs.project_in.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.project_in.bias.grad, theirs.project_in.bias.grad, rtol=1e-4, atol=1e-6)


def test_straight_through_argument_errors():
    with pytest.raises(ValueError, match="rotation_trick"):
        VectorQuantize(DIM, CODES, straight_through=True, rotation_trick=True)
    with pytest.raises(ValueError, match="learnable_codebook"):
        VectorQuantize(DIM, CODES, straight_through=True, rotation_trick=False, learnable_codebook=True,
                       ema_update=False)


def test_without_the_estimator_the_input_gets_the_soft_gradient():
    """``route_gradients_to_input=False``: no ``x + sg(q - x)``, so an input that requires a gradient
    gets the soft assignment's, as theirs does (without the EMA step, whose in-place update their
    backward would see)."""
    theirs, ours = _pair(route_gradients_to_input=False, ema_update=False, sample_codebook_temp=0.5)
    x, upstream = torch.randn(2, 30, DIM), torch.randn(2, 30, DIM)
    got, want = _step(ours, x, upstream), _step(theirs, x, upstream)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[3], want[3], rtol=1e-4, atol=1e-6)
    plain_theirs, _ = _pair(route_gradients_to_input=False, ema_update=False, straight_through=False)
    assert not torch.allclose(_step(plain_theirs, x, upstream)[3], got[3])
