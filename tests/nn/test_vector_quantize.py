"""fastvq.nn.VectorQuantize against vector-quantize-pytorch itself and against its own contracts."""

import copy

import pytest
import torch
from vector_quantize_pytorch import VectorQuantize as TheirVectorQuantize

import fastvq
from fastvq.nn import VectorQuantize

DIM, CODES = 16, 40


def _pair(seed=0, dim=DIM, codebook_size=CODES, **kwargs):
    """The same configuration in both libraries, ours loaded from theirs' state_dict."""
    torch.manual_seed(seed)
    theirs = TheirVectorQuantize(dim=dim, codebook_size=codebook_size, **kwargs)
    ours = VectorQuantize(dim, codebook_size, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _step(layer, x, upstream, **kwargs):
    x = x.clone().requires_grad_()
    quantized, indices, loss = layer(x, **kwargs)
    ((quantized * upstream).sum() + loss).backward()
    return quantized.detach(), indices, loss.detach(), x.grad


def _assert_same_state(theirs, ours):
    for name in ("embed", "embed_avg", "cluster_size"):
        torch.testing.assert_close(
            getattr(ours._codebook, name), getattr(theirs._codebook, name), rtol=1e-5, atol=1e-5, msg=name
        )


CONFIGS = {
    "ema": dict(decay=0.8, commitment_weight=0.7),
    "ema-ste": dict(commitment_weight=0.7, rotation_trick=False),
    "cosine": dict(use_cosine_sim=True, commitment_weight=0.5),
    "frozen": dict(ema_update=False),
    "learnable": dict(ema_update=False, learnable_codebook=True, rotation_trick=False),
    "heads": dict(codebook_dim=8, heads=2),
    "projected": dict(codebook_dim=6, layernorm_after_project_in=True),
    "separate-heads": dict(heads=2, separate_codebook_per_head=True, codebook_dim=8),
    "kmeans": dict(kmeans_init=True, kmeans_iters=4),
}


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_training_matches_vector_quantize_pytorch(config):
    kwargs = CONFIGS[config]
    theirs, ours = _pair(**kwargs)
    for step in range(3):
        x = torch.randn(3, 50, DIM) + 0.3 * step
        upstream = torch.randn(3, 50, DIM)
        # k-means seeds come from torch's RNG: both libraries must see the same stream.
        torch.manual_seed(100 + step)
        q_theirs, i_theirs, loss_theirs, g_theirs = _step(theirs, x, upstream)
        torch.manual_seed(100 + step)
        q_ours, i_ours, loss_ours, g_ours = _step(ours, x, upstream)
        assert torch.equal(i_ours, i_theirs), f"step {step}: indices differ"
        torch.testing.assert_close(q_ours, q_theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-5)
        _assert_same_state(theirs, ours)
        if config == "learnable":
            torch.testing.assert_close(ours._codebook.embed.grad, theirs._codebook.embed.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, shape, index_shape",
    [
        ({}, (5, DIM), (5,)),
        ({}, (2, 7, DIM), (2, 7)),
        ({"channel_last": False}, (2, DIM, 7), (2, 7)),
        ({"accept_image_fmap": True}, (2, DIM, 3, 5), (2, 3, 5)),
        ({"accept_3d_fmap": True}, (2, DIM, 2, 3, 2), (2, 2, 3, 2)),
        ({"heads": 4, "codebook_dim": 4}, (2, 7, DIM), (2, 7, 4)),
        ({"heads": 2, "separate_codebook_per_head": True, "accept_image_fmap": True}, (2, DIM, 3, 3), (2, 3, 3, 2)),
    ],
)
def test_eval_layouts_match_vector_quantize_pytorch(kwargs, shape, index_shape):
    theirs, ours = _pair(**kwargs)
    theirs.eval()
    ours.eval()
    x = torch.randn(shape)
    q_theirs, i_theirs, _ = theirs(x)
    q_ours, i_ours, loss = ours(x)
    assert q_ours.shape == x.shape and i_ours.shape == index_shape
    assert torch.equal(i_ours, i_theirs)
    torch.testing.assert_close(q_ours, q_theirs, rtol=1e-5, atol=1e-5)
    assert loss.item() == 0.0
    torch.testing.assert_close(ours.get_output_from_indices(i_ours), q_ours, rtol=1e-5, atol=1e-5)
    # With several heads vector-quantize-pytorch's get_*_from_indices return other layouts than
    # its forward (or fail before project_out); fastvq returns the forward layout in every case.
    if kwargs.get("heads", 1) == 1:
        torch.testing.assert_close(ours.get_codes_from_indices(i_ours), theirs.get_codes_from_indices(i_theirs))
        torch.testing.assert_close(ours.get_output_from_indices(i_ours), theirs.get_output_from_indices(i_theirs))


def test_mask_matches_vector_quantize_pytorch():
    theirs, ours = _pair(commitment_weight=0.6)
    x = torch.randn(3, 20, DIM)
    mask = torch.rand(3, 20) > 0.3
    upstream = torch.randn(3, 20, DIM)
    q_theirs, i_theirs, loss_theirs, g_theirs = _step(theirs, x, upstream, mask=mask)
    q_ours, i_ours, loss_ours, g_ours = _step(ours, x, upstream, mask=mask)
    assert torch.equal(i_ours, i_theirs) and (i_ours[~mask] == -1).all()
    torch.testing.assert_close(q_ours, q_theirs, rtol=1e-5, atol=1e-5)
    assert (q_ours[~mask] == 0).all()
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-5)
    _assert_same_state(theirs, ours)


def test_dead_codes_are_replaced_by_batch_vectors():
    torch.manual_seed(0)
    layer = VectorQuantize(DIM, CODES, threshold_ema_dead_code=2.0, decay=0.5)
    # Shift the data away from the initial codes so most codes die in the first step.
    x = torch.randn(2, 64, DIM) * 0.1 + 5.0
    layer(x)
    rows = x.reshape(-1, DIM)
    embed = layer.codebook
    dead_now = layer._codebook.cluster_size[0] == 2.0
    assert dead_now.sum() > CODES // 2
    for code in dead_now.nonzero().flatten().tolist():
        assert torch.isclose(rows, embed[code]).all(dim=1).any(), f"code {code} is not a batch vector"
        torch.testing.assert_close(layer._codebook.embed_avg[0, code], 2.0 * embed[code])
    before = layer.codebook.clone()
    layer.eval()
    layer(x)
    assert torch.equal(before, layer.codebook), "eval must not expire codes"


def test_freeze_codebook_and_frozen_ema():
    _, ours = _pair()
    before = ours.codebook.clone()
    ours(torch.randn(2, 30, DIM), freeze_codebook=True)
    assert torch.equal(before, ours.codebook)
    ours(torch.randn(2, 30, DIM))
    assert not torch.equal(before, ours.codebook)


def test_usage_statistics_after_each_forward():
    _, ours = _pair()
    ours.eval()
    codes = ours.codebook[:5].clone()
    x = codes.repeat(4, 1)[None]  # every vector is one of 5 codes, used equally often
    ours(x)
    assert ours.codes_used.item() == 5
    torch.testing.assert_close(ours.codebook_perplexity, torch.tensor(5.0))


def test_stochastic_codes_sample_in_training_only():
    torch.manual_seed(0)
    layer = VectorQuantize(DIM, CODES, stochastic_sample_codes=True, sample_codebook_temp=10.0, ema_update=False)
    x = torch.randn(1, 200, DIM)
    _, sampled, _ = layer(x)
    layer.eval()
    _, nearest, _ = layer(x)
    _, again, _ = layer(x)
    assert torch.equal(nearest, again)
    assert (sampled != nearest).float().mean() > 0.5  # T = 10 spreads the draws far from the argmin


def test_state_dict_round_trip():
    _, ours = _pair(kmeans_init=True)
    ours(torch.randn(2, 50, DIM))
    clone = VectorQuantize(DIM, CODES, kmeans_init=True)
    clone.load_state_dict(ours.state_dict())
    assert clone._codebook._initted, "loading an initialised state must skip k-means"
    ours.eval()
    clone.eval()
    x = torch.randn(3, 11, DIM)
    assert torch.equal(ours(x)[1], clone(x)[1])
    assert set(ours.state_dict()) == set(TheirVectorQuantize(dim=DIM, codebook_size=CODES).state_dict())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_trains_under_autocast_without_nan(dtype):
    torch.manual_seed(0)
    proj = torch.nn.Linear(DIM, DIM)
    layer = VectorQuantize(DIM, CODES, kmeans_init=True, threshold_ema_dead_code=1.0)
    optim = torch.optim.Adam(proj.parameters(), lr=1e-2)
    for _ in range(3):
        with torch.autocast("cpu", dtype=dtype):
            x = proj(torch.randn(2, 25, DIM))
            q, _, loss = layer(x)
        assert q.dtype == x.dtype == dtype
        (q.float().square().mean() + loss).backward()
        optim.step()
        optim.zero_grad()
        assert torch.isfinite(layer.codebook).all() and torch.isfinite(proj.weight).all()


def test_runs_on_the_triton_kernels(monkeypatch):
    from _backends import TRITON_DEVICE

    monkeypatch.setenv("FASTVQ_BACKEND", "triton")
    theirs, ours = _pair()
    ours.to(TRITON_DEVICE)
    x = torch.randn(2, 20, DIM)
    upstream = torch.randn(2, 20, DIM)
    q_theirs, i_theirs, loss_theirs, g_theirs = _step(theirs, x, upstream)
    q_ours, i_ours, loss_ours, g_ours = _step(ours, x.to(TRITON_DEVICE), upstream.to(TRITON_DEVICE))
    assert torch.equal(i_ours.cpu(), i_theirs)
    torch.testing.assert_close(loss_ours.cpu(), loss_theirs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_ours.cpu(), g_theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.codebook.cpu(), theirs.codebook, rtol=1e-5, atol=1e-6)


COMPILE_CONFIGS = {
    "ema": dict(),
    "learnable": dict(ema_update=False, learnable_codebook=True),
    "dead-codes-kmeans": dict(threshold_ema_dead_code=1.0, kmeans_init=True, kmeans_iters=2),
    "sampled-heads": dict(stochastic_sample_codes=True, heads=2, separate_codebook_per_head=True),
}


@pytest.mark.parametrize("config", list(COMPILE_CONFIGS), ids=list(COMPILE_CONFIGS))
def test_trains_under_compile_fullgraph(config):
    kwargs = COMPILE_CONFIGS[config]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), VectorQuantize(16, 24, **kwargs))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    eager_optimizer = torch.optim.SGD(eager.parameters(), lr=0.1)
    compiled_optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        x = torch.randn(4, 10, 8)
        for net, optim in ((eager, eager_optimizer), (compiled, compiled_optimizer)):
            torch.manual_seed(step)
            q, _, loss = net(x)
            (q.square().mean() + loss).backward()
            optim.step()
            optim.zero_grad()
    # Inductor draws random numbers from its own generator, so configurations that draw (k-means
    # seeds, dead-code replacements, Gumbel noise) train differently, not wrongly: for them the
    # check is that the compiled graph ran whole (fullgraph) and moved the codebook sanely.
    if config in ("ema", "learnable"):
        torch.testing.assert_close(model[1].codebook, eager[1].codebook, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model[0].weight, eager[0].weight, rtol=1e-4, atol=1e-5)
    else:
        assert model[1]._codebook._initted
        assert not torch.equal(model[1].codebook, VectorQuantize(16, 24, **kwargs).to(torch.float32).codebook)
    assert torch.isfinite(model[1].codebook).all()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(dim=0), ValueError, "dim"),
        (dict(codebook_size=0), ValueError, "codebook_size"),
        (dict(decay=1.5), ValueError, "decay"),
        (dict(sync_update_v=0.5), ValueError, "sync_update_v"),
        (dict(directional_reparam=True), ValueError, "threshold_ema_dead_code"),
        (dict(vq_bridge=torch.nn.Identity(), learnable_codebook=False), ValueError, "vq_bridge"),
        (dict(affine_param=True, use_cosine_sim=True), ValueError, "affine_param"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(commitment_weight=-1.0), ValueError, "commitment_weight"),
        (dict(ema_update=True, learnable_codebook=True), ValueError, "learnable_codebook"),
        (dict(straight_through=True), ValueError, "at most one"),
        (dict(no_such_argument=1), TypeError, "no_such_argument"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, message):
    arguments = dict(dim=8, codebook_size=4)
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        VectorQuantize(**arguments)


def test_bad_inputs_name_the_shape():
    layer = VectorQuantize(8, 4)
    with pytest.raises(ValueError, match=r"\(2, 5, 7\)"):
        layer(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="accept_image_fmap"):
        VectorQuantize(8, 4, accept_image_fmap=True)(torch.randn(2, 8, 3))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(2, 5, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="mask"):
        layer(torch.randn(2, 5, 8), mask=torch.ones(2, 4, dtype=torch.bool))


def test_exported_from_package():
    assert fastvq.VectorQuantize is VectorQuantize
