"""fastvq.nn.FactorizedL2Quantizer against ViT-VQGAN's formulas and fastvq.reference."""

import copy

import pytest
import torch
import torch.nn.functional as F
from _compile import assert_compiled_training_matches_eager

from fastvq import reference
from fastvq.nn import FactorizedL2Quantizer

DIM, CODES, CODE_DIM = 16, 30, 5


def _vit_vqgan_reference(layer, x):
    """ViT-VQGAN's factorised l2 quantizer as enhancing-transformers writes it, around the model's
    pre/post projections: normalise, search, beta on the commitment term, straight through to the
    projection before its normalisation."""
    projected = layer.project_in(x.reshape(-1, layer.dim))
    z = F.normalize(projected, dim=-1)
    codes = F.normalize(layer.codebook, dim=-1)
    indices, _, _ = reference.nearest_code_ref(z.detach(), codes.detach(), "cosine")
    q = codes[indices]
    loss = layer.beta * torch.mean((q.detach() - z) ** 2)
    if not layer.ema_update:
        loss = loss + torch.mean((q - z.detach()) ** 2)
    quantized = projected + (q - projected).detach()
    out = layer.project_out(quantized)
    return out.reshape(x.shape), loss, indices.reshape(x.shape[:-1]), z.detach()


def _step(layer, x, upstream, forward=None):
    x = x.clone().requires_grad_()
    layer.zero_grad()
    out, loss, indices, *_ = (forward or layer)(x)
    ((out * upstream).sum() + loss).backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    return out, loss, indices, x.grad, grads


def _reference_step(layer, x, upstream):
    return _step(layer, x, upstream, forward=lambda t: _vit_vqgan_reference(layer, t))


def _model(ema_update):
    return torch.nn.Sequential(
        torch.nn.Linear(8, DIM), FactorizedL2Quantizer(DIM, CODES, CODE_DIM, ema_update=ema_update)
    )


@pytest.mark.parametrize("shape", [(3, 11, DIM), (7, DIM), (1, 1, 1, DIM)])
def test_matches_the_vit_vqgan_formulas(shape):
    torch.manual_seed(0)
    ours = FactorizedL2Quantizer(DIM, CODES, CODE_DIM, beta=0.3)
    ref = copy.deepcopy(ours)
    x, upstream = torch.randn(shape), torch.randn(shape)
    out, loss, indices, gx, grads = _step(ours, x, upstream)
    out_ref, loss_ref, i_ref, gx_ref, grads_ref = _reference_step(ref, x, upstream)
    assert indices.shape == shape[:-1] and indices.dtype == torch.int64
    assert torch.equal(indices, i_ref)
    assert out.shape == shape
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    names = {"project_in.weight", "project_in.bias", "project_out.weight", "project_out.bias", "codebook"}
    assert set(grads) == set(grads_ref) == names
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_codes_lie_on_the_unit_sphere_and_indices_decode():
    torch.manual_seed(0)
    layer = FactorizedL2Quantizer(DIM, CODES, CODE_DIM)
    x = torch.randn(4, 6, DIM)
    out, _, indices = layer(x)
    torch.testing.assert_close(layer.normalized_codebook().norm(dim=-1), torch.ones(CODES), rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.indices_to_codes(indices), out, rtol=1e-6, atol=1e-6)


def test_ema_codebook_follows_the_reference_update():
    torch.manual_seed(0)
    layer = FactorizedL2Quantizer(DIM, CODES, CODE_DIM, ema_update=True, decay=0.9, eps=1e-4)
    ref = copy.deepcopy(layer)
    assert not isinstance(layer.codebook, torch.nn.Parameter)
    assert sorted(name for name, _ in layer.named_parameters()) == [
        "project_in.bias", "project_in.weight", "project_out.bias", "project_out.weight",
    ]
    for _ in range(3):
        x, upstream = torch.randn(5, 8, DIM), torch.randn(5, 8, DIM)
        out, loss, indices, gx, grads = _step(layer, x, upstream)
        out_ref, loss_ref, i_ref, gx_ref, grads_ref = _reference_step(ref, x, upstream)
        with torch.no_grad():
            z = F.normalize(ref.project_in(x.reshape(-1, DIM)), dim=-1)
            reference.ema_update_ref_(
                ref.codebook, ref.cluster_size, ref.embed_avg, z, i_ref.reshape(-1), decay=0.9, eps=1e-4
            )
            ref.codebook.copy_(F.normalize(ref.codebook, dim=-1))
        assert torch.equal(indices, i_ref)
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
        for name in ("codebook", "cluster_size", "embed_avg"):
            torch.testing.assert_close(getattr(layer, name), getattr(ref, name), rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(layer.codebook.norm(dim=-1), torch.ones(CODES), rtol=0, atol=1e-6)
    layer.eval()
    before = layer.codebook.clone()
    layer(torch.randn(3, DIM))
    assert torch.equal(layer.codebook, before)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    for ema_update, extra in ((False, []), (True, ["cluster_size", "embed_avg"])):
        layer = FactorizedL2Quantizer(DIM, CODES, CODE_DIM, ema_update=ema_update)
        assert sorted(layer.state_dict()) == sorted(
            ["codebook", "project_in.weight", "project_in.bias", "project_out.weight", "project_out.bias", *extra]
        )
        clone = FactorizedL2Quantizer(DIM, CODES, CODE_DIM, ema_update=ema_update)
        clone.load_state_dict(layer.state_dict())
        x = torch.randn(3, 4, DIM)
        for a, b in zip(layer.eval()(x), clone.eval()(x)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("ema_update", [False, True], ids=["grad", "ema"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_trains_under_autocast_without_nan(dtype, ema_update):
    torch.manual_seed(0)
    model = _model(ema_update)
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        with torch.autocast("cpu", dtype=dtype):
            out, loss, _ = model(torch.randn(2, 9, 8))
        assert out.dtype == dtype
        (out.float().square().mean() + loss).backward()
        optim.step()
        optim.zero_grad()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(t).all() for t in model.state_dict().values())


@pytest.mark.parametrize("ema_update", [False, True], ids=["grad", "ema"])
@pytest.mark.parametrize("replacement", [False, True], ids=["", "dead-codes"])
def test_trains_under_compile_fullgraph(ema_update, replacement):
    torch.manual_seed(0)
    model = _model(ema_update)
    if replacement:
        # A threshold no code falls below in 3 steps: the replacement is traced into the graph (no
        # break, no host sync) but replaces nothing, since compiled and eager random draws differ.
        model[1] = FactorizedL2Quantizer(DIM, CODES, CODE_DIM, ema_update=ema_update, decay=0.5,
                                         dead_code_threshold=1e-3)
    assert_compiled_training_matches_eager(model, (3, 7, 8), lambda out: out[0].square().mean() + out[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=0), "dim"),
        (dict(codebook_size=0), "codebook_size"),
        (dict(codebook_dim=-2), "codebook_dim"),
        (dict(beta=-0.1), "beta"),
        (dict(beta=float("inf")), "beta"),
        (dict(decay=1.0), "decay"),
        (dict(eps=-1.0), "eps"),
    ],
)
def test_bad_constructor_arguments(kwargs, message):
    arguments = dict(dim=DIM, codebook_size=CODES)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        FactorizedL2Quantizer(**arguments)


def test_bad_inputs_name_the_shape():
    layer = FactorizedL2Quantizer(DIM, CODES, CODE_DIM)
    with pytest.raises(ValueError, match=r"\[\.\.\., dim=16\].*\(2, 16, 3\)"):
        layer(torch.randn(2, DIM, 3))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, DIM, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer(None)
    with pytest.raises(TypeError, match="indices"):
        layer.indices_to_codes(torch.zeros(2))


def test_runs_on_the_triton_kernels(backend):
    torch.manual_seed(0)
    _, device = backend
    layer = FactorizedL2Quantizer(6, 5, 3).to(device)
    x, upstream = torch.randn(2, 4, 6, device=device), torch.randn(2, 4, 6, device=device)
    ref = copy.deepcopy(layer)
    out, loss, indices, gx, grads = _step(layer, x, upstream)
    out_ref, loss_ref, i_ref, gx_ref, grads_ref = _reference_step(ref, x, upstream)
    assert torch.equal(indices, i_ref)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(grads["codebook"], grads_ref["codebook"], rtol=1e-4, atol=1e-6)


def test_dead_codes_are_replaced_by_batch_rows():
    torch.manual_seed(0)
    for ema_update in (False, True):
        layer = FactorizedL2Quantizer(DIM, CODES, CODE_DIM, ema_update=ema_update, decay=0.5, dead_code_threshold=1.0)
        usage = layer.cluster_size if ema_update else layer.code_usage
        assert "code_usage" in layer.state_dict() or ema_update
        # Inputs whose projections all point one way choose one code: the others die and are re-seeded.
        x = torch.randn(1, DIM).expand(64, DIM) + 0.01 * torch.randn(64, DIM)
        for _ in range(4):
            _, _, indices = layer(x)
        z = F.normalize(layer.project_in(x), dim=-1).detach()
        codes = layer.normalized_codebook().detach()
        # Every replaced code is one of the batch's normalised rows.
        nearest = (codes @ z.T).max(dim=1).values
        assert int((nearest > 1 - 1e-5).sum()) >= CODES - 2
        assert bool((usage >= 0).all())
        layer.eval()
        before = layer.codebook.clone()
        layer(torch.randn(5, DIM))
        assert torch.equal(layer.codebook, before)


def test_a_gradient_codebook_with_replacement_trains():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, DIM),
                                FactorizedL2Quantizer(DIM, CODES, CODE_DIM, decay=0.5, dead_code_threshold=1.0))
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        out, loss, _ = model(torch.randn(4, 16, 8))
        (out.square().mean() + loss).backward()
        optim.step()
        optim.zero_grad()
    assert torch.isfinite(model[1].codebook).all()


def test_kmeans_init_starts_from_the_batch():
    torch.manual_seed(0)
    for ema_update in (False, True):
        layer = FactorizedL2Quantizer(DIM, 4, CODE_DIM, ema_update=ema_update, kmeans_init=True)
        centres = F.normalize(torch.randn(4, DIM), dim=-1) * 5
        x = (centres[:, None] + 0.05 * torch.randn(4, 50, DIM)).reshape(-1, DIM)
        assert not bool(layer.initted)
        _, _, indices = layer(x)
        assert bool(layer.initted)
        # Four tight clusters, four codes: k-means gives each cluster its own code.
        assert indices.reshape(4, 50).unique(dim=1).shape[1] == 1 and indices.unique().numel() == 4
        clone = FactorizedL2Quantizer(DIM, 4, CODE_DIM, ema_update=ema_update, kmeans_init=True)
        clone.load_state_dict(layer.state_dict())
        before = clone.codebook.clone()
        clone(x)
        if not ema_update:
            assert torch.equal(clone.codebook, before)  # initialised already: no second k-means


@pytest.mark.parametrize("kwargs, message", [(dict(dead_code_threshold=-1.0), "dead_code_threshold"),
                                             (dict(kmeans_iters=0), "kmeans_iters")])
def test_bad_replacement_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FactorizedL2Quantizer(DIM, CODES, **kwargs)
