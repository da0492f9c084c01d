"""fastvq.nn.VectorQuantize against vector-quantize-pytorch and against its own contracts."""

import copy

import pytest
import torch
from vector_quantize_pytorch import VectorQuantize as ReferenceVectorQuantize

import fastvq
from fastvq.nn import VectorQuantize


def _pair(use_cosine_sim=False, commitment_weight=0.7, decay=0.8, ema_update=True, **kwargs):
    torch.manual_seed(0)
    # rotation_trick=False: vector-quantize-pytorch's default gradient is the rotation trick,
    # fastvq's first layer implements the straight-through estimator.
    theirs = ReferenceVectorQuantize(
        dim=16,
        codebook_size=40,
        decay=decay,
        commitment_weight=commitment_weight,
        use_cosine_sim=use_cosine_sim,
        rotation_trick=False,
        ema_update=ema_update,
        **kwargs,
    )
    ours = VectorQuantize(
        16, 40, decay=decay, commitment_weight=commitment_weight, use_cosine_sim=use_cosine_sim,
        ema_update=ema_update, **kwargs,
    )
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


@pytest.mark.parametrize("use_cosine_sim", [False, True])
@pytest.mark.parametrize("ema_update", [True, False])
def test_matches_vector_quantize_pytorch_in_training(use_cosine_sim, ema_update):
    theirs, ours = _pair(use_cosine_sim=use_cosine_sim, ema_update=ema_update)
    for _ in range(4):
        x = torch.randn(3, 50, 16)
        x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        q_theirs, i_theirs, loss_theirs = theirs(x_theirs)
        q_ours, i_ours, loss_ours = ours(x_ours)
        upstream = torch.randn_like(q_theirs)
        ((q_theirs * upstream).sum() + loss_theirs).backward()
        ((q_ours * upstream).sum() + loss_ours).backward()
        assert torch.equal(i_theirs, i_ours)
        torch.testing.assert_close(q_ours, q_theirs, rtol=0, atol=1e-6)
        torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-5, atol=1e-6)
        for name in ("embed", "embed_avg", "cluster_size"):
            torch.testing.assert_close(
                getattr(ours._codebook, name), getattr(theirs._codebook, name), rtol=1e-5, atol=1e-6
            )


def test_codebook_moves_only_with_ema():
    _, ours = _pair(ema_update=True)
    before = ours.codebook.clone()
    ours(torch.randn(2, 30, 16))
    assert not torch.equal(before, ours.codebook)
    _, frozen = _pair(ema_update=False)
    before = frozen.codebook.clone()
    frozen(torch.randn(2, 30, 16))
    assert torch.equal(before, frozen.codebook)


def test_eval_matches_and_leaves_codebook_alone():
    theirs, ours = _pair()
    theirs.eval()
    ours.eval()
    before = ours.codebook.clone()
    x = torch.randn(2, 9, 16)
    q_theirs, i_theirs, _ = theirs(x)
    q_ours, i_ours, loss = ours(x)
    assert torch.equal(i_ours, i_theirs)
    torch.testing.assert_close(q_ours, q_theirs, rtol=0, atol=1e-6)
    assert loss.item() == 0.0
    assert torch.equal(before, ours.codebook)


@pytest.mark.parametrize(
    "kwargs, shape, index_shape",
    [
        ({}, (5, 16), (5,)),
        ({}, (2, 7, 16), (2, 7)),
        ({"channel_last": False}, (2, 16, 7), (2, 7)),
        ({"accept_image_fmap": True}, (2, 16, 3, 5), (2, 3, 5)),
    ],
)
def test_layouts_match_vector_quantize_pytorch(kwargs, shape, index_shape):
    theirs, ours = _pair(**kwargs)
    theirs.eval()
    ours.eval()
    x = torch.randn(shape)
    q_theirs, i_theirs, _ = theirs(x)
    q_ours, i_ours, _ = ours(x)
    assert q_ours.shape == x.shape and i_ours.shape == index_shape
    assert torch.equal(i_ours, i_theirs)
    torch.testing.assert_close(q_ours, q_theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.get_output_from_indices(i_ours), q_ours.detach(), rtol=0, atol=1e-6)


def test_state_dict_round_trip_gives_same_outputs():
    _, ours = _pair()
    ours(torch.randn(2, 20, 16))
    clone = VectorQuantize(16, 40, decay=0.8, commitment_weight=0.7)
    clone.load_state_dict(ours.state_dict())
    ours.eval()
    clone.eval()
    x = torch.randn(3, 11, 16)
    assert torch.equal(ours(x)[1], clone(x)[1])
    theirs = ReferenceVectorQuantize(dim=16, codebook_size=40, rotation_trick=False)
    theirs.load_state_dict(ours.state_dict())
    theirs.eval()
    assert torch.equal(theirs(x)[1], clone(x)[1])


def test_output_keeps_input_dtype_under_autocast():
    _, ours = _pair()
    proj = torch.nn.Linear(16, 16)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            x = proj(torch.randn(2, 25, 16))
            q, _, loss = ours(x)
        assert q.dtype == x.dtype == dtype
        (q.float().square().mean() + loss).backward()
        assert torch.isfinite(proj.weight.grad).all() and torch.isfinite(ours.codebook).all()
        proj.zero_grad()


def test_runs_on_the_triton_kernels(monkeypatch):
    from conftest import TRITON_DEVICE

    monkeypatch.setenv("FASTVQ_BACKEND", "triton")
    theirs, ours = _pair()
    ours.to(TRITON_DEVICE)
    x = torch.randn(2, 20, 16)
    q_theirs, i_theirs, loss_theirs = theirs(x)
    q_ours, i_ours, loss_ours = ours(x.to(TRITON_DEVICE))
    assert torch.equal(i_ours.cpu(), i_theirs)
    torch.testing.assert_close(loss_ours.cpu(), loss_theirs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.codebook.cpu(), theirs.codebook, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ema_update", [True, False])
def test_trains_under_compile_fullgraph_like_eager(ema_update):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), VectorQuantize(16, 24, ema_update=ema_update))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    optim_eager = torch.optim.SGD(eager.parameters(), lr=0.1)
    optim_compiled = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        x = torch.randn(4, 10, 8)
        for net, optim in ((eager, optim_eager), (compiled, optim_compiled)):
            q, _, loss = net(x)
            (q.square().mean() + loss).backward()
            optim.step()
            optim.zero_grad()
    torch.testing.assert_close(model[1].codebook, eager[1].codebook, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[0].weight, eager[0].weight, rtol=1e-5, atol=1e-6)
    if ema_update:
        assert not torch.equal(model[1]._codebook.cluster_size, torch.ones_like(model[1]._codebook.cluster_size))


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((0, 8), {}, "dim"),
        ((8, 0), {}, "codebook_size"),
        ((8, 4), {"decay": 1.5}, "decay"),
        ((8, 4), {"eps": -1.0}, "eps"),
        ((8, 4), {"commitment_weight": -1.0}, "commitment_weight"),
    ],
)
def test_bad_constructor_arguments(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        VectorQuantize(*args, **kwargs)


def test_bad_inputs_name_the_shape():
    layer = VectorQuantize(8, 4)
    with pytest.raises(ValueError, match=r"\(2, 5, 7\)"):
        layer(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="accept_image_fmap"):
        VectorQuantize(8, 4, accept_image_fmap=True)(torch.randn(2, 8, 3))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(2, 5, 8, dtype=torch.int64))
    with pytest.raises(NotImplementedError, match="mask"):
        layer(torch.randn(2, 5, 8), mask=torch.ones(2, 5, dtype=torch.bool))


def test_exported_from_package():
    assert fastvq.VectorQuantize is VectorQuantize
