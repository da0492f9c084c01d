"""fastvq.nn.VectorQuantizer2 and GumbelQuantize against taming-transformers' formulas.

taming-transformers cannot be a test dependency (it pulls torchvision and pytorch-lightning), so
the references are fastvq.reference plus taming's formulas written out below.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _compile import assert_compiled_training_matches_eager
from einops import rearrange

from fastvq import reference
from fastvq.nn import GumbelQuantize, VectorQuantizer2

CODES, DIM, HIDDEN = 24, 6, 10
USED = [7, 3, 11, 0, 5, 20, 19, 2]


def _taming_vq2(layer, z):
    """taming's VectorQuantizer2.forward, with fastvq's reference search."""
    z = rearrange(z, "b c h w -> b h w c")
    flat = z.reshape(-1, layer.e_dim)
    weight = layer.embedding.weight
    indices, _, _ = reference.nearest_code_ref(flat.detach(), weight.detach())
    z_q = weight[indices].view(z.shape)
    if layer.legacy:
        loss = torch.mean((z_q.detach() - z) ** 2) + layer.beta * torch.mean((z_q - z.detach()) ** 2)
    else:
        loss = layer.beta * torch.mean((z_q.detach() - z) ** 2) + torch.mean((z_q - z.detach()) ** 2)
    z_q = z + (z_q - z).detach()
    return rearrange(z_q, "b h w c -> b c h w"), loss, indices


def _run(layer, z, upstream, forward=None):
    z = z.clone().requires_grad_()
    layer.zero_grad()
    z_q, loss, *rest = (forward or layer)(z)
    ((z_q * upstream).sum() + loss).backward()
    return z_q, loss, rest, z.grad


def _used_file(tmp_path):
    path = tmp_path / "used.npy"
    np.save(path, np.array(USED, dtype=np.int64))
    return str(path)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "fixed"])
@pytest.mark.parametrize("shape", [(3, DIM, 5, 7), (1, DIM, 1, 1), (2, DIM, 3, 1)])
def test_vector_quantizer2_matches_taming(legacy, shape):
    torch.manual_seed(0)
    ours = VectorQuantizer2(CODES, DIM, 0.3, legacy=legacy)
    ref = copy.deepcopy(ours)
    z = torch.randn(shape) * 0.05
    upstream = torch.randn(shape)
    q_ours, loss_ours, ((perplexity, min_encodings, indices),), g_ours = _run(ours, z, upstream)
    q_ref, loss_ref, _, g_ref = _run(ref, z, upstream, forward=lambda x: _taming_vq2(ref, x))
    _, _, ref_indices = _taming_vq2(ref, z)
    assert perplexity is None and min_encodings is None
    assert indices.shape == (shape[0] * shape[2] * shape[3],) and indices.dtype == torch.int64
    assert torch.equal(indices, ref_indices)
    assert q_ours.shape == shape and q_ours.is_contiguous()
    torch.testing.assert_close(q_ours, q_ref, rtol=0, atol=1e-7)
    torch.testing.assert_close(loss_ours, loss_ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(ours.embedding.weight.grad, ref.embedding.weight.grad, rtol=1e-5, atol=1e-9)


def test_legacy_puts_beta_on_the_codebook_term():
    torch.manual_seed(0)
    z = torch.randn(2, DIM, 3, 4)
    for legacy, codebook_scale in ((True, 0.3), (False, 1.0)):
        layer = VectorQuantizer2(CODES, DIM, 0.3, legacy=legacy)
        z_q, loss, _ = layer(z)
        loss.backward()
        flat = rearrange(z, "b c h w -> (b h w) c")
        _, indices, _ = reference.vector_quantize_ref(flat, layer.embedding.weight.detach())
        codes = layer.embedding.weight.detach()[indices]
        # d/de of codebook_scale * mean((sg[z] - e)^2), scattered onto the chosen codes
        expected = torch.zeros(CODES, DIM).index_add_(
            0, indices, 2 * codebook_scale * (codes - flat) / flat.numel()
        )
        torch.testing.assert_close(layer.embedding.weight.grad, expected, rtol=1e-5, atol=1e-9)


def test_index_shapes_and_codebook_entry():
    torch.manual_seed(0)
    z = torch.randn(2, DIM, 3, 4)
    flat_layer = VectorQuantizer2(CODES, DIM, 0.25)
    sane = copy.deepcopy(flat_layer)
    sane.sane_index_shape = True
    z_q, _, (_, _, flat_indices) = flat_layer(z)
    _, _, (_, _, sane_indices) = sane(z)
    assert flat_indices.shape == (24,) and sane_indices.shape == (2, 3, 4)
    assert torch.equal(flat_indices, sane_indices.reshape(-1))
    torch.testing.assert_close(flat_layer.get_codebook_entry(flat_indices, (2, 3, 4, DIM)), z_q, rtol=0, atol=1e-7)
    entries = flat_layer.get_codebook_entry(flat_indices, None)
    assert entries.shape == (24, DIM)
    assert torch.equal(entries, flat_layer.embedding.weight[flat_indices])


@pytest.mark.parametrize("unknown_index", ["extra", 2, "random"])
def test_vector_quantizer2_remap(tmp_path, unknown_index):
    torch.manual_seed(0)
    layer = VectorQuantizer2(CODES, DIM, 0.25, remap=_used_file(tmp_path), unknown_index=unknown_index)
    assert set(layer.state_dict()) == {"embedding.weight", "used"}
    assert layer.re_embed == len(USED) + (unknown_index == "extra")
    z = torch.randn(3, DIM, 5, 7) * 0.05
    _, _, (_, _, indices) = layer(z)
    assert indices.shape == (105, 1)
    full, _, _ = reference.nearest_code_ref(rearrange(z, "b c h w -> (b h w) c"), layer.embedding.weight.detach())
    known = torch.isin(full, torch.tensor(USED))
    assert 0 < known.sum() < full.numel()
    positions = torch.tensor([USED.index(i) if i in USED else -1 for i in full.tolist()])
    assert torch.equal(indices[known, 0], positions[known])
    unknown = indices[~known, 0]
    if unknown_index == "extra":
        assert (unknown == len(USED)).all()
    elif unknown_index == 2:
        assert (unknown == 2).all()
    else:
        assert ((unknown >= 0) & (unknown < len(USED))).all()
    # get_codebook_entry maps remapped indices back to the full codebook
    entries = layer.get_codebook_entry(indices.reshape(-1), (3, 5, 7, DIM))
    back = rearrange(entries, "b c h w -> (b h w) c")
    torch.testing.assert_close(back[known], layer.embedding.weight[full[known]], rtol=0, atol=0)
    assert torch.equal(layer.unmap_to_all(layer.remap_to_used(torch.tensor([USED]))), torch.tensor([USED]))


def test_remap_to_used_takes_the_first_position_of_a_duplicate_and_leaves_its_input_alone(tmp_path):
    layer = VectorQuantizer2(CODES, DIM, 0.25, remap=torch.tensor([4, 9, 4]), unknown_index="extra")
    inds = torch.tensor([[4, 9, 5], [23, 4, 0]])
    assert torch.equal(layer.remap_to_used(inds), torch.tensor([[0, 1, 3], [3, 0, 3]]))
    extra = torch.tensor([[3, 1]])
    assert torch.equal(layer.unmap_to_all(extra), torch.tensor([[4, 9]]))
    assert torch.equal(extra, torch.tensor([[3, 1]]))


def test_vector_quantizer2_state_dict_round_trip():
    torch.manual_seed(0)
    layer = VectorQuantizer2(CODES, DIM, 0.25)
    assert list(layer.state_dict()) == ["embedding.weight"]
    clone = VectorQuantizer2(CODES, DIM, 0.25)
    clone.load_state_dict(layer.state_dict())
    z = torch.randn(2, DIM, 3, 3)
    assert torch.equal(layer(z)[0], clone(z)[0])


# --------------------------------------------------------------------------- GumbelQuantize


def _taming_gumbel(layer, z, temp=None):
    """taming's GumbelQuantize.forward, written out."""
    hard = layer.straight_through if layer.training else True
    temp = layer.temperature if temp is None else temp
    logits = layer.proj(z)
    if layer.remap is not None:
        full_zeros = torch.zeros_like(logits)
        logits = logits[:, layer.used, ...]
    soft_one_hot = F.gumbel_softmax(logits, tau=temp, dim=1, hard=hard)
    if layer.remap is not None:
        full_zeros[:, layer.used, ...] = soft_one_hot
        soft_one_hot = full_zeros
    z_q = torch.einsum("b n h w, n d -> b d h w", soft_one_hot, layer.embed.weight)
    qy = F.softmax(logits, dim=1)
    diff = layer.kl_weight * torch.sum(qy * torch.log(qy * layer.n_embed + 1e-10), dim=1).mean()
    ind = soft_one_hot.argmax(dim=1)
    if layer.remap is not None:
        ind = layer.remap_to_used(ind)
    return z_q, diff, (None, None, ind), logits


@pytest.mark.parametrize("straight_through", [True, False], ids=["hard", "soft"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("remap", [False, True], ids=["all", "remap"])
def test_gumbel_quantize_matches_taming(tmp_path, straight_through, training, remap):
    torch.manual_seed(0)
    ours = GumbelQuantize(
        HIDDEN, DIM, CODES, straight_through=straight_through, kl_weight=0.01, temp_init=0.7,
        remap=_used_file(tmp_path) if remap else None,
    )
    ours.train(training)
    ref = copy.deepcopy(ours)
    z = torch.randn(3, HIDDEN, 4, 5)
    upstream = torch.randn(3, DIM, 4, 5)
    outputs = {}
    for name, layer, forward in (("ours", ours, None), ("ref", ref, lambda x: _taming_gumbel(ref, x))):
        torch.manual_seed(7)
        z_q, diff, info, g = _run(layer, z, upstream, forward=forward or (lambda x: layer(x, return_logits=True)))
        outputs[name] = (z_q, diff, info[0][2], info[1], g, layer)
    (q, d, i, logits, g, _), (q_ref, d_ref, i_ref, logits_ref, g_ref, _) = outputs["ours"], outputs["ref"]
    assert i.shape == (3, 4, 5) and i.dtype == torch.int64
    assert torch.equal(i, i_ref)
    assert logits.shape == (3, len(USED) if remap else CODES, 4, 5)
    torch.testing.assert_close(logits, logits_ref, rtol=0, atol=0)
    torch.testing.assert_close(q, q_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d, d_ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    for name in ("proj.weight", "proj.bias", "embed.weight"):
        torch.testing.assert_close(
            ours.get_parameter(name).grad, ref.get_parameter(name).grad, rtol=1e-5, atol=1e-6, msg=name
        )
    if not training or straight_through:  # a hard sample is exactly the chosen code
        chosen = ours.unmap_to_all(i) if remap else i
        assert torch.equal(q, rearrange(ours.embed.weight[chosen], "b h w d -> b d h w"))


def test_gumbel_interfaces_temperature_and_codebook_entry():
    torch.manual_seed(0)
    layer = GumbelQuantize(HIDDEN, DIM, CODES, use_vqinterface=False)
    assert list(layer.state_dict()) == ["proj.weight", "proj.bias", "embed.weight"]
    z = torch.randn(2, HIDDEN, 3, 4)
    z_q, diff, ind = layer(z)
    assert z_q.shape == (2, DIM, 3, 4) and diff.shape == () and ind.shape == (2, 3, 4)
    torch.testing.assert_close(layer.get_codebook_entry(ind.reshape(-1), (2, 3, 4, DIM)), z_q, rtol=0, atol=0)
    # the temperature argument overrides self.temperature
    layer.straight_through = False
    torch.manual_seed(3)
    soft = layer(z, temp=0.3)[0]
    torch.manual_seed(3)
    torch.testing.assert_close(soft, _taming_gumbel(layer, z, temp=0.3)[0], rtol=1e-6, atol=1e-6)
    # eval mode samples hard codes by Gumbel-max: the argmax of logits plus Gumbel noise, not of the logits
    layer.eval()
    with torch.no_grad():
        torch.manual_seed(4)
        _, _, sampled = layer(z)
        torch.manual_seed(4)
        logits = layer.proj(z)
        noise = -torch.empty_like(logits).exponential_().log()
        assert torch.equal(sampled, (logits + noise).argmax(dim=1))
    layer.temperature = 0.5
    with pytest.raises(ValueError, match="temp"):
        layer(z, temp=0.0)


def test_gumbel_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    layer = GumbelQuantize(HIDDEN, DIM, CODES, remap=_used_file(tmp_path))
    assert set(layer.state_dict()) == {"proj.weight", "proj.bias", "embed.weight", "used"}
    clone = GumbelQuantize(HIDDEN, DIM, CODES, remap=torch.zeros(len(USED), dtype=torch.int64))
    clone.load_state_dict(layer.state_dict())
    assert torch.equal(clone.used, torch.tensor(USED))
    z = torch.randn(2, HIDDEN, 3, 3)
    torch.manual_seed(1)
    first = layer(z)
    torch.manual_seed(1)
    second = clone(z)
    assert torch.equal(first[0], second[0]) and torch.equal(first[2][2], second[2][2])


# --------------------------------------------------------------------------- both layers


def _models():
    vq = torch.nn.Sequential(torch.nn.Conv2d(3, DIM, 1), VectorQuantizer2(CODES, DIM, 0.25))
    gumbel = torch.nn.Sequential(torch.nn.Conv2d(3, HIDDEN, 1), GumbelQuantize(HIDDEN, DIM, CODES))
    return {"vq2": vq, "gumbel": gumbel}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["vq2", "gumbel"])
def test_trains_under_autocast_without_nan(dtype, name):
    torch.manual_seed(0)
    model = _models()[name]
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        with torch.autocast("cpu", dtype=dtype):
            z_q, loss, _ = model(torch.randn(2, 3, 4, 4))
        (z_q.float().square().mean() + loss).backward()
        optim.step()
        optim.zero_grad()
        assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["vq2", "gumbel"])
def test_trains_under_compile_fullgraph(name):
    torch.manual_seed(0)
    model = _models()[name]
    # Gumbel noise differs between eager and compiled RNG streams: the Gumbel layer is only kept finite.
    assert_compiled_training_matches_eager(model, (2, 3, 4, 4), lambda out: out[0].square().mean() + out[1],
                                           compare=name == "vq2")


@pytest.mark.parametrize(
    "factory, error, message",
    [
        (lambda: VectorQuantizer2(0, DIM, 0.25), ValueError, "n_e"),
        (lambda: VectorQuantizer2(CODES, 2.5, 0.25), ValueError, "e_dim"),
        (lambda: VectorQuantizer2(CODES, DIM, float("nan")), ValueError, "beta"),
        (lambda: VectorQuantizer2(CODES, DIM, -1.0), ValueError, "beta"),
        (lambda: VectorQuantizer2(CODES, DIM, 0.25, remap=torch.tensor([0, CODES])), ValueError, "remap"),
        (lambda: VectorQuantizer2(CODES, DIM, 0.25, remap=torch.ones(2, 2, dtype=torch.long)), ValueError, "remap"),
        (lambda: VectorQuantizer2(CODES, DIM, 0.25, remap=3), TypeError, "remap"),
        (
            lambda: VectorQuantizer2(CODES, DIM, 0.25, remap=torch.tensor([1, 2]), unknown_index=5),
            ValueError,
            "unknown_index",
        ),
        (lambda: GumbelQuantize(0, DIM, CODES), ValueError, "num_hiddens"),
        (lambda: GumbelQuantize(HIDDEN, DIM, -3), ValueError, "n_embed"),
        (lambda: GumbelQuantize(HIDDEN, DIM, CODES, temp_init=0.0), ValueError, "temp_init"),
        (lambda: GumbelQuantize(HIDDEN, DIM, CODES, kl_weight=float("inf")), ValueError, "kl_weight"),
    ],
)
def test_bad_constructor_arguments(factory, error, message):
    with pytest.raises(error, match=message):
        factory()


def test_bad_inputs_name_the_shape():
    vq = VectorQuantizer2(CODES, DIM, 0.25)
    gumbel = GumbelQuantize(HIDDEN, DIM, CODES)
    with pytest.raises(ValueError, match=r"\[B, e_dim=6, H, W\].*\(2, 5, 3, 3\)"):
        vq(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match=r"\(2, 6, 3\)"):
        vq(torch.randn(2, DIM, 3))
    with pytest.raises(TypeError, match="floating-point"):
        vq(torch.ones(2, DIM, 3, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        vq(np.zeros((2, DIM, 3, 3)))
    with pytest.raises(ValueError, match="temp"):
        vq(torch.randn(2, DIM, 3, 3), temp=0.5)
    with pytest.raises(ValueError, match="return_logits"):
        vq(torch.randn(2, DIM, 3, 3), return_logits=True)
    with pytest.raises(ValueError, match=r"num_hiddens=10.*\(2, 6, 3, 3\)"):
        gumbel(torch.randn(2, DIM, 3, 3))
    with pytest.raises(ValueError, match="shape"):
        vq.get_codebook_entry(torch.zeros(5, dtype=torch.long), (1, 2, 2, DIM))
    with pytest.raises(TypeError, match="integer"):
        gumbel.get_codebook_entry(torch.zeros(4), (1, 2, 2, DIM))


def test_runs_on_the_triton_kernels(backend):
    torch.manual_seed(0)
    name, device = backend
    layer = VectorQuantizer2(7, 3, 0.25).to(device)
    z = torch.randn(2, 3, 2, 3, device=device)
    z_q, loss, (_, _, indices) = layer(z)
    ref_q, ref_loss, ref_indices = _taming_vq2(layer, z)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(z_q, ref_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-8)
