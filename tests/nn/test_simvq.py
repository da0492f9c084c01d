"""fastvq.nn.SimVQ against vector-quantize-pytorch's SimVQ and fastvq.reference."""

import pytest
import torch
import torch.nn.functional as F
from _compile import assert_compiled_training_matches_eager
from vector_quantize_pytorch import SimVQ as TheirSimVQ

from fastvq import reference
from fastvq.nn import SimVQ

DIM, CODES = 12, 50


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(DIM, 20), torch.nn.ReLU(), torch.nn.Linear(20, DIM))


def _step(layer, x, upstream):
    x = x.clone().requires_grad_()
    layer.zero_grad()
    quantized, indices, loss = layer(x)
    ((quantized * upstream).sum() + loss).backward()
    grads = [p.grad.clone() for p in layer.code_transform.parameters()]
    return quantized, indices, loss, x.grad, grads


def _rotation_reference(x, codes):
    """The rotation trick as Fifty et al. 2024 (section 4.2) write it, with the D x D matrix built."""
    u = F.normalize(x, dim=-1, eps=1e-6).detach()
    q = F.normalize(codes, dim=-1, eps=1e-6).detach()
    w = F.normalize(u + q, dim=-1, eps=1e-6)
    eye = torch.eye(x.shape[-1], dtype=x.dtype)
    rotation = eye - 2 * w[:, :, None] * w[:, None, :] + 2 * q[:, :, None] * u[:, None, :]
    scale = (codes.norm(dim=-1, keepdim=True) / x.norm(dim=-1, keepdim=True)).detach()
    return (rotation @ x[:, :, None]).squeeze(-1) * scale


@pytest.mark.parametrize("rotation_trick", [True, False], ids=["rotation", "ste"])
@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(), (3, 17, DIM)),
        (dict(channel_first=True), (2, DIM, 5, 7)),
        (dict(frozen_codebook_dim=9), (4, DIM)),
        (dict(codebook_transform="mlp", commitment_weight=0.7, input_to_quantize_commit_loss_weight=0.4), (2, 9, DIM)),
    ],
    ids=["tokens", "channel-first", "frozen-dim", "mlp"],
)
def test_matches_vector_quantize_pytorch(rotation_trick, kwargs, shape):
    kwargs = dict(kwargs)
    make_transform = _mlp if kwargs.pop("codebook_transform", None) else (lambda: None)
    torch.manual_seed(0)
    theirs = TheirSimVQ(DIM, CODES, codebook_transform=make_transform(), rotation_trick=rotation_trick, **kwargs)
    ours = SimVQ(DIM, CODES, codebook_transform=make_transform(), rotation_trick=rotation_trick, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x, upstream = torch.randn(shape), torch.randn(shape)
    q_theirs, i_theirs, loss_theirs, gx_theirs, gw_theirs = _step(theirs, x, upstream)
    q_ours, i_ours, loss_ours, gx_ours, gw_ours = _step(ours, x, upstream)
    assert i_ours.dtype == torch.int64 and i_ours.shape == i_theirs.shape
    assert torch.equal(i_ours, i_theirs)
    torch.testing.assert_close(q_ours, q_theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(gx_ours, gx_theirs, rtol=1e-5, atol=1e-6)
    for ours_grad, their_grad in zip(gw_ours, gw_theirs):
        torch.testing.assert_close(ours_grad, their_grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.indices_to_codes(i_ours), theirs.indices_to_codes(i_theirs), rtol=0, atol=0)


@pytest.mark.parametrize("rotation_trick", [True, False], ids=["rotation", "ste"])
def test_matches_fastvq_reference(rotation_trick):
    torch.manual_seed(0)
    layer = SimVQ(DIM, CODES, rotation_trick=rotation_trick, commitment_weight=0.8)
    x, upstream = torch.randn(40, DIM), torch.randn(40, DIM)
    q, indices, loss, gx, (gw,) = _step(layer, x, upstream)

    weight = layer.code_transform.weight.detach().clone().requires_grad_()
    x_ref = x.clone().requires_grad_()
    codebook = layer.frozen_codebook @ weight.T
    q_ref, i_ref, loss_ref = reference.vector_quantize_ref(x_ref, codebook, beta=0.8 * 0.25, codebook_weight=0.8)
    if rotation_trick:
        q_ref = _rotation_reference(x_ref, codebook[i_ref].detach())
    ((q_ref * upstream).sum() + loss_ref).backward()
    assert torch.equal(indices, i_ref)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(gx, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, weight.grad, rtol=1e-5, atol=1e-7)


def test_init_fn_and_frozen_codebook_stays_frozen():
    torch.manual_seed(0)
    layer = SimVQ(DIM, CODES, init_fn=lambda t: t * 3.0, frozen_codebook_dim=5)
    assert layer.frozen_codebook.shape == (CODES, 5) and not layer.frozen_codebook.requires_grad
    assert [name for name, _ in layer.named_parameters()] == ["code_transform.weight"]
    frozen = layer.frozen_codebook.clone()
    optim = torch.optim.SGD(layer.parameters(), lr=0.5)
    before = layer.codebook.detach().clone()
    for _ in range(2):
        _, _, loss = layer(torch.randn(30, DIM))
        loss.backward()
        optim.step()
        optim.zero_grad()
    assert torch.equal(layer.frozen_codebook, frozen)
    assert not torch.equal(layer.codebook, before)


def test_accept_image_fmap_is_channel_first():
    torch.manual_seed(0)
    fmap = SimVQ(DIM, CODES, accept_image_fmap=True)
    channel_first = SimVQ(DIM, CODES, channel_first=True)
    channel_first.load_state_dict(fmap.state_dict())
    x = torch.randn(2, DIM, 3, 4)
    q_a, i_a, l_a = fmap(x)
    q_b, i_b, l_b = channel_first(x)
    assert q_a.shape == x.shape and i_a.shape == (2, 3, 4)
    assert torch.equal(q_a, q_b) and torch.equal(i_a, i_b) and torch.equal(l_a, l_b)
    with pytest.raises(ValueError, match=r"\[B, 12, H, W\].*\(2, 12, 3\)"):
        fmap(torch.randn(2, DIM, 3))


def test_state_dict_round_trip():
    torch.manual_seed(0)
    layer = SimVQ(DIM, CODES)
    assert list(layer.state_dict()) == ["frozen_codebook", "code_transform.weight"]
    clone = SimVQ(DIM, CODES)
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(3, 5, DIM)
    for a, b in zip(layer(x), clone(x)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_trains_under_autocast_without_nan(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, DIM), SimVQ(DIM, CODES))
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        with torch.autocast("cpu", dtype=dtype):
            x = model[0](torch.randn(2, 9, 8))
            q, _, loss = model[1](x)
        assert q.dtype == x.dtype == dtype
        (q.float().square().mean() + loss).backward()
        optim.step()
        optim.zero_grad()
        assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())


def test_trains_under_compile_fullgraph():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, DIM), SimVQ(DIM, CODES))
    assert_compiled_training_matches_eager(model, (3, 7, 8), lambda out: out[0].square().mean() + out[2])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(dim=0), ValueError, "dim"),
        (dict(codebook_size=-1), ValueError, "codebook_size"),
        (dict(frozen_codebook_dim=0), ValueError, "frozen_codebook_dim"),
        (dict(commitment_weight=-1.0), ValueError, "commitment_weight"),
        (dict(input_to_quantize_commit_loss_weight=float("nan")), ValueError, "input_to_quantize_commit_loss_weight"),
        (dict(init_fn=3), TypeError, "init_fn"),
        (dict(init_fn=lambda t: t[:2]), ValueError, "init_fn"),
        (dict(codebook_transform=lambda t: t), TypeError, "codebook_transform"),
        (dict(no_such_argument=1), TypeError, "no_such_argument"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, message):
    arguments = dict(dim=DIM, codebook_size=CODES)
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        SimVQ(**arguments)


def test_bad_inputs_name_the_shape():
    layer = SimVQ(DIM, CODES)
    with pytest.raises(ValueError, match=r"\[B, \.\.\., D\] with D = 12.*\(2, 5\)"):
        layer(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"\(12,\)"):
        layer(torch.randn(DIM))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, DIM, dtype=torch.int32))
    with pytest.raises(TypeError, match="indices"):
        layer.indices_to_codes(torch.zeros(3))
    wrong = SimVQ(DIM, CODES, codebook_transform=torch.nn.Linear(DIM, DIM + 1))
    with pytest.raises(ValueError, match=r"codebook_transform.*\(50, 13\)"):
        wrong(torch.randn(2, DIM))


def test_runs_on_the_triton_kernels(backend):
    torch.manual_seed(0)
    _, device = backend
    layer = SimVQ(4, 6, rotation_trick=False).to(device)
    x = torch.randn(2, 3, 4, device=device)
    q, indices, loss = layer(x)
    codebook = layer.codebook.detach()
    q_ref, i_ref, loss_ref = reference.vector_quantize_ref(x.reshape(-1, 4), codebook, beta=0.25, codebook_weight=1.0)
    assert torch.equal(indices.reshape(-1), i_ref)
    torch.testing.assert_close(q.reshape(-1, 4), q_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-8)
