"""Every constructor argument, forward keyword and method of vector-quantize-pytorch 1.32's
``VectorQuantize``, checked against vector-quantize-pytorch itself: the same state_dict in, then
several training steps with the same inputs and the same random stream, and the same outputs,
indices, losses (and their breakdown), gradients and buffers out."""

from __future__ import annotations

import functools

import pytest
import torch
from vector_quantize_pytorch import VectorQuantize as TheirVectorQuantize

from fastvq.nn import VectorQuantize
from fastvq.nn.vector_quantize import LossBreakdown

DIM, CODES = 8, 24
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def _pair(make_kwargs, seed=0):
    torch.manual_seed(seed)
    theirs = TheirVectorQuantize(dim=DIM, codebook_size=CODES, **make_kwargs())
    torch.manual_seed(seed)
    ours = VectorQuantize(dim=DIM, codebook_size=CODES, **make_kwargs())
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _compare_state(theirs, ours, step):
    ours_state = ours.state_dict()
    for name, value in theirs.state_dict().items():
        assert name in ours_state, f"step {step}: fastvq has no {name}"
        torch.testing.assert_close(ours_state[name].float(), value.float(), **TOLERANCE,
                                   msg=lambda m: f"step {step}, {name}: {m}")
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters()}
    for name, parameter in ours.named_parameters():
        if theirs_grads.get(name) is None:
            assert parameter.grad is None or not parameter.grad.any(), f"step {step}: {name} has a gradient"
        else:
            torch.testing.assert_close(parameter.grad, theirs_grads[name], **TOLERANCE,
                                       msg=lambda m: f"step {step}, grad of {name}: {m}")


def _run(layer, x, upstream, forward_kwargs, seed):
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out = layer(x, **forward_kwargs)
    quantized, indices, loss = out[:3]
    if quantized.dim() > upstream.dim():  # top-k: the candidates' axis, last but for channel-last features
        upstream = upstream.unsqueeze(-2 if quantized.shape[-1] == upstream.shape[-1] else -1)
    total = (quantized * upstream).sum() + loss.sum()
    if total.requires_grad:
        total.backward()
    return out, x.grad


def assert_training_matches(make_kwargs, *, steps=3, shape=(2, 12, DIM), forward_kwargs=None, mask=False,
                            train=True, drift=0.3):
    forward_kwargs = dict(forward_kwargs or {})
    theirs, ours = _pair(make_kwargs)
    theirs.train(train)
    ours.train(train)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(shape, generator=generator) + drift * step
        upstream = torch.randn(shape, generator=generator)
        if mask:
            forward_kwargs["mask"] = torch.rand(shape[:2], generator=generator) > 0.3
        out_theirs, grad_theirs = _run(theirs, x, upstream, forward_kwargs, 100 + step)
        out_ours, grad_ours = _run(ours, x, upstream, forward_kwargs, 100 + step)
        assert len(out_ours) == len(out_theirs)
        assert torch.equal(out_ours[1], out_theirs[1]), f"step {step}: indices differ"
        torch.testing.assert_close(out_ours[0], out_theirs[0], **TOLERANCE, msg=lambda m: f"step {step} output: {m}")
        torch.testing.assert_close(out_ours[2], out_theirs[2], **TOLERANCE, msg=lambda m: f"step {step} loss: {m}")
        if out_theirs[3:]:
            assert isinstance(out_ours[3], LossBreakdown) and out_ours[3]._fields == out_theirs[3]._fields
            for field, mine, reference in zip(out_theirs[3]._fields, out_ours[3], out_theirs[3]):
                torch.testing.assert_close(mine, reference, **TOLERANCE, msg=lambda m: f"step {step} {field}: {m}")
        if grad_theirs is None:
            assert grad_ours is None or not grad_ours.any()
        else:
            torch.testing.assert_close(grad_ours, grad_theirs, **TOLERANCE, msg=lambda m: f"step {step} grad x: {m}")
        _compare_state(theirs, ours, step)
    return theirs, ours


def _bridge():
    return torch.nn.Sequential(torch.nn.Linear(DIM, DIM), torch.nn.Tanh(), torch.nn.Linear(DIM, DIM))


CONFIGS = {
    "decay-1-mask": (lambda: dict(decay=1.0, commitment_weight=0.5), dict(mask=True)),
    "cross-entropy": (lambda: dict(commitment_use_cross_entropy_loss=True, ema_update=False), {}),
    # With the EMA moving the codes, vector-quantize-pytorch's backward of its logits reads the codes
    # the update wrote after the forward (its saved tensor aliases the buffer), fastvq's the codes the
    # search saw; decay 1 keeps them equal, so both compute the same gradient.
    "cross-entropy-ema": (lambda: dict(commitment_use_cross_entropy_loss=True, rotation_trick=False, decay=1.0), {}),
    "cross-entropy-mask-heads": (lambda: dict(commitment_use_cross_entropy_loss=True, heads=2, codebook_dim=4,
                                              ema_update=False), {}),
    "cross-entropy-cosine-mask": (lambda: dict(commitment_use_cross_entropy_loss=True, use_cosine_sim=True,
                                               ema_update=False), dict(mask=True)),
    "orthogonal": (lambda: dict(orthogonal_reg_weight=0.7), {}),
    "orthogonal-active": (lambda: dict(orthogonal_reg_weight=0.7, orthogonal_reg_active_codes_only=True), {}),
    "orthogonal-max-codes": (lambda: dict(orthogonal_reg_weight=0.7, orthogonal_reg_max_codes=10), {}),
    "orthogonal-active-max": (lambda: dict(orthogonal_reg_weight=0.7, orthogonal_reg_active_codes_only=True,
                                           orthogonal_reg_max_codes=5), {}),
    "orthogonal-heads": (lambda: dict(orthogonal_reg_weight=0.3, heads=2, separate_codebook_per_head=True,
                                      codebook_dim=4), {}),
    "diversity": (lambda: dict(codebook_diversity_loss_weight=0.4, codebook_diversity_temperature=3.0,
                               ema_update=False), {}),
    "diversity-ema": (lambda: dict(codebook_diversity_loss_weight=0.4, decay=1.0), {}),
    "diversity-cosine-heads": (lambda: dict(codebook_diversity_loss_weight=0.4, use_cosine_sim=True, heads=2,
                                            codebook_dim=4, decay=1.0), {}),
    "directional-reparam": (lambda: dict(directional_reparam=True, threshold_ema_dead_code=0.5), {}),
    "affine": (lambda: dict(affine_param=True, affine_param_batch_decay=0.5, affine_param_codebook_decay=0.6), {}),
    "affine-mask": (lambda: dict(affine_param=True), dict(mask=True)),
    "sync-update-v": (lambda: dict(learnable_codebook=True, ema_update=False, sync_update_v=0.4,
                                   rotation_trick=False), {}),
    "vq-bridge": (lambda: dict(vq_bridge=_bridge()), {}),
    "manual-ema": (lambda: dict(manual_ema_update=True), {}),
    "in-place-optimizer": (lambda: dict(learnable_codebook=True, ema_update=False,
                                        in_place_codebook_optimizer=functools.partial(torch.optim.SGD, lr=0.5)), {}),
    "in-place-optimizer-mask": (lambda: dict(learnable_codebook=True, ema_update=False,
                                             in_place_codebook_optimizer=functools.partial(torch.optim.Adam, lr=0.1)),
                                dict(mask=True)),
    "no-route-to-input": (lambda: dict(route_gradients_to_input=False, learnable_codebook=True, ema_update=False), {}),
    "dead-codes": (lambda: dict(threshold_ema_dead_code=1.5, decay=0.5), {}),
    "dead-codes-mask-cosine": (lambda: dict(threshold_ema_dead_code=1.5, decay=0.5, use_cosine_sim=True),
                               dict(mask=True)),
    "dead-codes-heads": (lambda: dict(threshold_ema_dead_code=2.0, decay=0.5, heads=2, codebook_dim=4,
                                      separate_codebook_per_head=True), {}),
    "dead-codes-more-than-rows": (lambda: dict(threshold_ema_dead_code=3.0, decay=0.2), dict(shape=(1, 5, DIM))),
}


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_constructor_arguments_train_like_vector_quantize_pytorch(config):
    make_kwargs, options = CONFIGS[config]
    assert_training_matches(make_kwargs, forward_kwargs=dict(return_loss_breakdown=True), **options)


FORWARD_KEYWORDS = {
    "lens": dict(lens=torch.tensor([12, 7])),
    "ema-update-weight-tensor": dict(ema_update_weight=torch.linspace(0.0, 1.0, CODES)),
    "ema-update-weight-callable": dict(ema_update_weight=lambda embed_sum, cluster_size: (cluster_size > 0).float()),
    "accum-ema-update": dict(accum_ema_update=True),
    "ema-update-false": dict(ema_update=False),
    "freeze": dict(freeze_codebook=True),
    "temperature-zero": dict(sample_codebook_temp=0.0),
}


@pytest.mark.parametrize("name", list(FORWARD_KEYWORDS), ids=list(FORWARD_KEYWORDS))
def test_forward_keywords_match_vector_quantize_pytorch(name):
    assert_training_matches(lambda: dict(threshold_ema_dead_code=0.5), forward_kwargs=FORWARD_KEYWORDS[name])


def test_accumulated_statistics_fold_into_the_next_update():
    theirs, ours = _pair(lambda: dict())
    generator = torch.Generator().manual_seed(2)
    for step, accumulate in enumerate((True, True, False)):
        x = torch.randn(2, 10, DIM, generator=generator)
        theirs(x, accum_ema_update=accumulate)
        ours(x, accum_ema_update=accumulate)
        _compare_state(theirs, ours, step)


def test_codebook_transform_fn_matches_vector_quantize_pytorch():
    """Per-position codebooks, as QINCo passes them: ``[C, K, d] -> [C, B, N, K, d]``."""
    shift = torch.randn(2, 12, 1, DIM)

    def transform(embed):
        return embed[:, None, None] * 1.5 + shift[None]

    assert_training_matches(lambda: dict(learnable_codebook=True, ema_update=False),
                            forward_kwargs=dict(codebook_transform_fn=transform, return_loss_breakdown=True))
    assert_training_matches(lambda: dict(), forward_kwargs=dict(codebook_transform_fn=transform), train=False)


@pytest.mark.parametrize("heads", [1, 2])
def test_indices_return_the_cross_entropy(heads):
    # decay 1: the codes the EMA writes are the ones the search saw (see "cross-entropy-ema").
    make = lambda: dict(heads=heads, codebook_dim=DIM // heads, decay=1.0)  # noqa: E731
    theirs, ours = _pair(make)
    x = torch.randn(2, 12, DIM)
    targets = torch.randint(0, CODES, (2, 12) if heads == 1 else (2, 12, heads))
    targets[0, :3] = -1
    x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    q_theirs, ce_theirs = theirs(x_theirs, indices=targets)
    q_ours, ce_ours = ours(x_ours, indices=targets)
    assert q_ours.shape == q_theirs.shape
    torch.testing.assert_close(q_ours, q_theirs, **TOLERANCE)
    torch.testing.assert_close(ce_ours, ce_theirs, **TOLERANCE)
    ce_theirs.backward()
    ce_ours.backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, **TOLERANCE)
    _compare_state(theirs, ours, 0)


def test_methods_match_vector_quantize_pytorch():
    theirs, ours = _pair(lambda: dict(heads=2, separate_codebook_per_head=True, codebook_dim=4,
                                      threshold_ema_dead_code=2.5, decay=0.3))
    x = torch.randn(2, 10, DIM)
    split_theirs, split_ours = theirs.maybe_split_heads_from_input(x), ours.maybe_split_heads_from_input(x)
    assert torch.equal(split_ours, split_theirs) and split_ours.shape == (2, 2, 10, 4)
    indices = torch.randint(0, CODES, (2, 10, 2))
    for method in ("update_indices", "update_ema_indices"):
        for layer in (theirs, ours):
            torch.manual_seed(4)
            getattr(layer, method)(x, indices)
        _compare_state(theirs, ours, method)
    torch.manual_seed(5)
    theirs.expire_codes_(x)
    torch.manual_seed(5)
    ours.expire_codes_(x)
    _compare_state(theirs, ours, "expire_codes_")
    shared_theirs, shared_ours = _pair(lambda: dict(heads=2, codebook_dim=4))
    assert torch.equal(shared_ours.maybe_split_heads_from_input(x), shared_theirs.maybe_split_heads_from_input(x))


def test_manual_in_place_optimizer_update():
    make = lambda: dict(learnable_codebook=True, ema_update=False, manual_in_place_optimizer_update=True,  # noqa: E731
                        in_place_codebook_optimizer=functools.partial(torch.optim.SGD, lr=0.5))
    theirs, ours = _pair(make)
    x = torch.randn(2, 10, DIM)
    for layer in (theirs, ours):
        layer(x)
        layer.update_in_place_optimizer()
    _compare_state(theirs, ours, "manual step")
    before = ours.codebook.clone()
    ours(x, freeze_codebook=True)
    ours.update_in_place_optimizer()
    assert torch.equal(before, ours.codebook), "a frozen codebook takes no in-place step"


def test_update_ema_by_hand_with_manual_ema_update():
    theirs, ours = _pair(lambda: dict(manual_ema_update=True))
    x = torch.randn(2, 10, DIM)
    theirs(x)
    ours(x)
    _compare_state(theirs, ours, "before")
    theirs._codebook.update_ema()
    ours._codebook.update_ema()
    _compare_state(theirs, ours, "after")


def test_eval_returns_zero_loss_and_changes_nothing():
    theirs, ours = assert_training_matches(lambda: dict(orthogonal_reg_weight=0.5, codebook_diversity_loss_weight=0.2),
                                           train=False, forward_kwargs=dict(return_loss_breakdown=True))
    assert ours(torch.randn(2, 3, DIM))[2].item() == 0.0


def test_signature_is_vector_quantize_pytorchs():
    import inspect

    theirs = inspect.signature(TheirVectorQuantize.__init__).parameters
    ours = inspect.signature(VectorQuantize.__init__).parameters
    # their parameters in their order, then only fastvq's keyword-only extras with defaults (sinkhorn_iters, ...)
    assert list(ours)[: len(theirs)] == list(theirs)
    extras = list(ours.values())[len(theirs):]
    assert all(extra.kind is extra.KEYWORD_ONLY and extra.default is not extra.empty for extra in extras), extras
    for name, parameter in theirs.items():
        assert ours[name].default == parameter.default or name in ("self",), name
    # Every call theirs accepts works here: their parameters in their order, then only keyword-only extras with
    # defaults (``active``, ResidualVQ's on-device layer switch).
    their_forward = list(inspect.signature(TheirVectorQuantize.forward).parameters)
    our_forward = inspect.signature(VectorQuantize.forward).parameters
    assert list(our_forward)[: len(their_forward)] == their_forward
    for name in list(our_forward)[len(their_forward):]:
        assert our_forward[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert our_forward[name].default is not inspect.Parameter.empty, name
    for method in ("update_ema_indices", "expire_codes_", "maybe_split_heads_from_input", "update_in_place_optimizer",
                   "update_indices", "get_codes_from_indices", "get_output_from_indices"):
        assert callable(getattr(VectorQuantize, method)), method


TOPK_CASES = {
    "sequence": (lambda: dict(), (2, 12, DIM), {}),
    "sequence-ste-mask": (lambda: dict(rotation_trick=False, commitment_weight=0.4), (2, 12, DIM), dict(mask=True)),
    "no-commitment": (lambda: dict(commitment_weight=0.0), (2, 12, DIM), {}),
    "single-vectors": (lambda: dict(), (5, DIM), {}),
    "image": (lambda: dict(accept_image_fmap=True), (2, DIM, 3, 4), {}),
    "channels-first": (lambda: dict(channel_last=False), (2, DIM, 7), {}),
    "projected-cosine": (lambda: dict(codebook_dim=5, use_cosine_sim=True), (2, 9, DIM), {}),
    "learnable-orthogonal": (lambda: dict(learnable_codebook=True, ema_update=False, orthogonal_reg_weight=0.3),
                             (2, 9, DIM), {}),
}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(TOPK_CASES), ids=list(TOPK_CASES))
def test_topk_matches_vector_quantize_pytorch(case, train):
    """``forward(topk=k)``: the k nearest codes per position, their per-candidate losses, and no
    codebook update; fastvq searches them with ``nearest_codes`` (no N x K matrix)."""
    make_kwargs, shape, options = TOPK_CASES[case]
    assert_training_matches(make_kwargs, shape=shape, train=train, steps=2,
                            forward_kwargs=dict(topk=5, return_loss_breakdown=True), **options)


def test_topk_is_refused_where_theirs_is():
    with pytest.raises(ValueError, match="heads == 1"):
        VectorQuantize(DIM, CODES, heads=2, codebook_dim=4)(torch.randn(2, 3, DIM), topk=2)
    with pytest.raises(ValueError, match="cross_entropy"):
        VectorQuantize(DIM, CODES, commitment_use_cross_entropy_loss=True)(torch.randn(2, 3, DIM), topk=2)
