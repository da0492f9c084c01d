"""fastvq.swap_quantizers on live models of Hugging Face transformers, vector-quantize-pytorch and taming.

The transformers models are randomly initialised from small configs (nothing is downloaded); Hugging Face zeroes
EnCodec's and Mimi's codebooks at init, so the tests fill them with random codes first. Each model is checked
against an un-swapped copy of itself: the same codes and decoded audio, the same state_dict (keys and the very
tensors), a strict load into a fresh un-swapped model, the same training step where the original trains, and a
second swap that replaces nothing.
"""

import copy
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from vector_quantize_pytorch import ResidualVQ as TheirResidualVQ
from vector_quantize_pytorch import VectorQuantize as TheirVectorQuantize

import fastvq
import fastvq.nn.transformers as fastvq_hf
from fastvq.nn._adopt import check_same_config
from fastvq.swap import REGISTRY, _class_key

try:
    import transformers
except ImportError:  # the vector-quantize-pytorch and taming tests below still run
    transformers = None

needs_transformers = pytest.mark.skipif(transformers is None, reason="pip install transformers (the [test] extra)")


def _encodec():
    config = transformers.EncodecConfig(
        num_filters=8, hidden_size=32, codebook_dim=32, codebook_size=64, num_lstm_layers=1,
        target_bandwidths=[1.5, 6.0],
    )
    model = transformers.EncodecModel(config)
    for module in model.modules():
        if type(module).__name__ == "EncodecEuclideanCodebook":
            module.embed.normal_()
    return model


def _mimi():
    config = transformers.MimiConfig(
        hidden_size=64, num_filters=8, codebook_size=64, codebook_dim=32, vector_quantization_hidden_dimension=32,
        num_quantizers=6, num_semantic_quantizers=1, num_hidden_layers=1, intermediate_size=128,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, upsample_groups=64,
    )
    model = transformers.MimiModel(config)
    for module in model.modules():
        if type(module).__name__ == "MimiEuclideanCodebook":
            module.embed_sum.normal_()
            module.cluster_usage.uniform_(0.5, 2.0)
    return model


def _dac():
    config = transformers.DacConfig(
        encoder_hidden_size=8, decoder_hidden_size=32, n_codebooks=4, codebook_size=64, codebook_dim=8,
        downsampling_ratios=[2, 4], upsampling_ratios=[4, 2], hidden_size=32, hop_length=8, quantizer_dropout=0.5,
    )
    return transformers.DacModel(config)


def _encodec_codes(model, audio, setting):
    return model.encode(audio, bandwidth=setting).audio_codes


def _encodec_audio(model, codes):
    return model.decode(codes, [None]).audio_values


def _mimi_codes(model, audio, setting):
    return model.encode(audio, num_quantizers=setting).audio_codes


def _mimi_audio(model, codes):
    return model.decode(codes).audio_values


def _dac_codes(model, audio, setting):
    return model.encode(audio, n_quantizers=setting).audio_codes


def _dac_audio(model, codes):
    return model.decode(audio_codes=codes).audio_values


# name -> (builder, model encode, model decode, two quantizer settings (all levels, fewer), samples, channels)
CODECS = {
    "encodec": (_encodec, _encodec_codes, _encodec_audio, (6.0, 1.5), 4800, 32),
    "mimi": (_mimi, _mimi_codes, _mimi_audio, (None, 3), 3840, 64),
    "dac": (_dac, _dac_codes, _dac_audio, (None, 2), 800, 32),
}


@pytest.fixture(scope="module")
def templates():
    torch.manual_seed(0)
    return {name: spec[0]().eval() for name, spec in CODECS.items()}


def _quantizer_outputs(name, quantizer, frames, setting):
    """Many more frames through the quantizer alone than the tiny models' audio gives, at one level setting."""
    if name == "dac":
        quantized, codes, latents, commitment, codebook = quantizer(frames, n_quantizers=setting)
        decoded = quantizer.from_codes(codes)[0], quantizer.from_latents(latents)[0]
        return codes, quantized, commitment, codebook, *decoded
    codes = quantizer.encode(frames, setting)
    return codes, quantizer.decode(codes if name == "encodec" else codes.transpose(0, 1))  # Mimi decodes [B, L, T]


def _known_modules(model):
    return [name for name, module in model.named_modules() if _class_key(type(module)) in REGISTRY]


@needs_transformers
@pytest.mark.parametrize("name", list(CODECS))
def test_codec_swap_keeps_codes_audio_and_state(templates, name):
    builder, encode, decode, settings, samples, channels = CODECS[name]
    model = copy.deepcopy(templates[name])
    torch.manual_seed(1)
    audio = torch.randn(2, 1, samples)
    frames = torch.randn(3, channels, 40)
    state = model.state_dict(keep_vars=True)
    parameters = [id(p) for p in model.parameters()]
    with torch.no_grad():
        codes_before = encode(model, audio, settings[0])
        audio_before = decode(model, codes_before)
        quantizer_before = [_quantizer_outputs(name, model.quantizer, frames, setting) for setting in settings]
    original_class = type(model.quantizer)

    swapped = fastvq.swap_quantizers(model)

    assert swapped == [("quantizer", original_class, getattr(fastvq_hf, original_class.__name__))]
    assert _known_modules(model) == []
    with torch.no_grad():
        codes_after = encode(model, audio, settings[0])
        audio_after = decode(model, codes_after)
        quantizer_after = [_quantizer_outputs(name, model.quantizer, frames, setting) for setting in settings]
    assert torch.equal(codes_after, codes_before)
    torch.testing.assert_close(audio_after, audio_before, rtol=0, atol=0)
    assert quantizer_before[0][0].shape != quantizer_before[1][0].shape  # the second setting uses fewer levels
    for outputs_before, outputs_after in zip(quantizer_before, quantizer_after):
        assert torch.equal(outputs_after[0], outputs_before[0])
        for value_before, value_after in zip(outputs_before[1:], outputs_after[1:]):
            torch.testing.assert_close(value_after, value_before, rtol=0, atol=0)

    swapped_state = model.state_dict(keep_vars=True)
    assert list(swapped_state) == list(state)
    assert all(swapped_state[key] is state[key] for key in state)
    assert [id(p) for p in model.parameters()] == parameters

    fresh = type(model)(model.config).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert _known_modules(fresh) != []
    with torch.no_grad():
        assert torch.equal(encode(fresh, audio, settings[0]), codes_before)

    assert fastvq.swap_quantizers(model) == []


@needs_transformers
def test_dac_training_steps_match(templates):
    """DAC's quantizer trains by gradient, with per-sample quantizer dropout drawn from the global RNG."""
    original = copy.deepcopy(templates["dac"]).train()
    ours = copy.deepcopy(original)
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.1) for model in (original, ours)]  # built before the swap
    assert len(fastvq.swap_quantizers(ours)) == 1
    assert all(module.training for module in ours.modules())
    for step in range(2):
        audio = torch.randn(4, 1, 200)
        upstream = torch.randn(4, 200)
        results = []
        for model, optimizer in zip((original, ours), optimizers):
            torch.manual_seed(10 + step)
            optimizer.zero_grad()
            output = model(audio)
            (output.loss.sum() + (output.audio_values * upstream).sum()).backward()
            results.append((output, {n: p.grad.clone() for n, p in model.named_parameters()}))
            optimizer.step()
        (theirs, their_grads), (mine, my_grads) = results
        assert torch.equal(mine.audio_codes, theirs.audio_codes)
        torch.testing.assert_close(mine.loss, theirs.loss, rtol=0, atol=0)
        torch.testing.assert_close(mine.audio_values, theirs.audio_values, rtol=0, atol=0)
        assert list(my_grads) == list(their_grads)
        for key in their_grads:
            torch.testing.assert_close(my_grads[key], their_grads[key], rtol=1e-6, atol=1e-7, msg=key)
    for (key, theirs), mine in zip(original.state_dict().items(), ours.state_dict().values()):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7, msg=key)


@needs_transformers
def test_swap_keeps_dtype_device_and_training_flags():
    from transformers.models.encodec.modeling_encodec import EncodecResidualVectorQuantizer

    config = transformers.EncodecConfig(codebook_size=40, codebook_dim=12, target_bandwidths=[6.0])
    torch.manual_seed(2)
    quantizer = EncodecResidualVectorQuantizer(config)
    for layer in quantizer.layers:
        layer.codebook.embed.normal_()
    model = nn.ModuleDict({"head": nn.Linear(3, 3), "rvq": quantizer}).double().eval()
    model.rvq.layers[1].train()
    flags = {name: module.training for name, module in model.named_modules()}
    frames = torch.randn(2, 12, 30, dtype=torch.float64)
    codes = model.rvq.encode(frames)
    fastvq.swap_quantizers(model)
    assert {name: module.training for name, module in model.named_modules()} == flags
    assert {t.dtype for t in model.rvq.state_dict().values()} == {torch.float64}
    assert model.rvq.layers[0].codebook.embed.device == frames.device
    assert torch.equal(model.rvq.encode(frames), codes)
    torch.testing.assert_close(model.rvq.decode(codes), quantizer.decode(codes), rtol=0, atol=0)


@needs_transformers
def test_unknown_and_subclassed_modules_are_untouched_unless_named():
    from transformers.models.encodec.modeling_encodec import EncodecResidualVectorQuantizer

    class MyQuantizer(EncodecResidualVectorQuantizer):
        pass

    config = transformers.EncodecConfig(codebook_size=16, codebook_dim=4, target_bandwidths=[3.0])
    model = nn.ModuleDict({
        "linear": nn.Linear(4, 4), "ours": fastvq.nn.VectorQuantize(4, 8), "mine": MyQuantizer(config),
    })
    children = dict(model.named_children())
    swapped = fastvq.swap_quantizers(model)
    # The subclass is not replaced, but the walk goes on into it and replaces its known children.
    assert [s.name for s in swapped] == [f"mine.layers.{i}" for i in range(config.num_quantizers)]
    assert dict(model.named_children()) == children

    model["mine"] = MyQuantizer(config)
    row = {_class_key(MyQuantizer): "fastvq.nn.transformers:EncodecResidualVectorQuantizer"}
    swapped = fastvq.swap_quantizers(model, classes=row)
    assert [(s.name, s.original) for s in swapped] == [("mine", MyQuantizer)]
    assert type(model["mine"]) is fastvq_hf.EncodecResidualVectorQuantizer
    assert model["linear"] is children["linear"] and model["ours"] is children["ours"]


@needs_transformers
def test_a_module_under_two_names_gets_one_replacement():
    from transformers.models.encodec.modeling_encodec import EncodecVectorQuantization

    level = EncodecVectorQuantization(transformers.EncodecConfig(codebook_size=8, codebook_dim=4))
    model = nn.ModuleDict({"a": level, "b": nn.ModuleDict({"tied": level})})
    swapped = fastvq.swap_quantizers(model)
    assert [s.name for s in swapped] == ["a"]
    assert model["a"] is model["b"]["tied"] and type(model["a"]) is fastvq_hf.EncodecVectorQuantization


@needs_transformers
def test_refusals():
    from transformers.models.dac.modeling_dac import DacVectorQuantize

    level = DacVectorQuantize(transformers.DacConfig(codebook_size=8, codebook_dim=4, hidden_size=6))
    with pytest.raises(ValueError, match="from_original"):
        fastvq.swap_quantizers(level)
    hooked = copy.deepcopy(level)
    hooked.register_forward_hook(lambda *args: None)
    model = nn.Sequential(level, hooked)
    with pytest.raises(ValueError, match="hooks"):
        fastvq.swap_quantizers(model)
    assert model[0] is level and model[1] is hooked  # nothing replaced, not even the module before the refusal
    with pytest.raises(TypeError, match="model"):
        fastvq.swap_quantizers(level.state_dict())
    with pytest.raises(TypeError, match="classes"):
        fastvq.swap_quantizers(model, classes={"a:B": DacVectorQuantize})


# --------------------------------------------------------------------------- vector-quantize-pytorch

VQP_CONFIGS = {
    "vq-ema": (TheirVectorQuantize, dict(decay=0.9, commitment_weight=0.7)),
    "vq-cosine": (TheirVectorQuantize, dict(use_cosine_sim=True, commitment_weight=0.5, rotation_trick=False)),
    "vq-heads-kmeans": (TheirVectorQuantize, dict(
        codebook_dim=8, heads=2, separate_codebook_per_head=True, kmeans_init=True, kmeans_iters=3,
    )),
    "vq-learnable": (TheirVectorQuantize, dict(ema_update=False, learnable_codebook=True, rotation_trick=False)),
    "vq-dead-codes": (TheirVectorQuantize, dict(
        threshold_ema_dead_code=1.5, codebook_dim=6, layernorm_after_project_in=True,
    )),
    "rvq-dropout": (TheirResidualVQ, dict(num_quantizers=3, quantize_dropout=True, decay=0.9)),
    "rvq-shared-projected": (TheirResidualVQ, dict(num_quantizers=3, shared_codebook=True, codebook_dim=8)),
    "rvq-sizes-cosine": (TheirResidualVQ, dict(codebook_size=(16, 24), use_cosine_sim=True, rotation_trick=False)),
}


@pytest.mark.parametrize("config", list(VQP_CONFIGS))
def test_vector_quantize_pytorch_trains_the_same_after_swap(config):
    their_class, kwargs = VQP_CONFIGS[config]
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(16, 16), their_class(dim=16, **{"codebook_size": 24, **kwargs}))
    ours = copy.deepcopy(original)
    state = ours.state_dict(keep_vars=True)
    swapped = fastvq.swap_quantizers(ours)
    assert [(s.name, s.replacement.__name__) for s in swapped] == [("1", their_class.__name__)]
    assert type(ours[1]).__module__.startswith("fastvq.nn.")
    assert all(ours.state_dict(keep_vars=True)[key] is value for key, value in state.items())
    assert list(ours.state_dict()) == list(state)
    for step in range(3):
        x = torch.randn(2, 30, 16) + 0.2 * step
        upstream = torch.randn(2, 30, 16)
        results = []
        for model in (original, ours):
            model.zero_grad()
            torch.manual_seed(5 + step)  # k-means, dead-code sampling and quantize dropout draw from it
            quantized, indices, loss = model[1](model[0](x))
            ((quantized * upstream).sum() + loss.sum()).backward()
            results.append((quantized, indices, loss, [p.grad for p in model.parameters()]))
        (q_theirs, i_theirs, l_theirs, g_theirs), (q_ours, i_ours, l_ours, g_ours) = results
        assert torch.equal(i_ours, i_theirs), f"step {step}"
        torch.testing.assert_close(q_ours, q_theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(l_ours, l_theirs, rtol=1e-5, atol=1e-6)
        for mine, theirs in zip(g_ours, g_theirs):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
        for (key, theirs), mine in zip(original.state_dict().items(), ours.state_dict().values()):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5, msg=key)
    assert fastvq.swap_quantizers(ours) == []


def test_residual_vq_refuses_what_it_cannot_read_back():
    model = nn.Sequential(TheirResidualVQ(dim=8, num_quantizers=2, codebook_size=8, implicit_neural_codebook=True))
    with pytest.raises(ValueError, match="implicit_neural_codebook"):
        fastvq.swap_quantizers(model)


def test_an_option_not_carried_is_named():
    theirs = TheirVectorQuantize(dim=8, codebook_size=16, decay=0.8)
    ours = fastvq.nn.VectorQuantize(8, 16, decay=0.5)
    with pytest.raises(ValueError, match="_codebook.decay"):
        check_same_config(ours, theirs)


# --------------------------------------------------------------------------- taming (a stand-in module)

TAMING = "taming.modules.vqvae.quantize"


class VectorQuantizer2(nn.Module):
    """taming's VectorQuantizer2, its forward's math written out (taming itself is not installable)."""

    __module__ = TAMING

    def __init__(self, n_e, e_dim, beta, remap=None, unknown_index="random", sane_index_shape=False, legacy=True):
        super().__init__()
        self.n_e, self.e_dim, self.beta, self.legacy = n_e, e_dim, beta, legacy
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        self.remap = remap
        if remap is not None:
            self.register_buffer("used", torch.tensor(np.load(remap)))
            self.re_embed = self.used.shape[0]
            self.unknown_index = unknown_index
            if unknown_index == "extra":
                self.unknown_index = self.re_embed
                self.re_embed += 1
        else:
            self.re_embed = n_e
        self.sane_index_shape = sane_index_shape

    def forward(self, z):
        z = rearrange(z, "b c h w -> b h w c")
        flat = z.reshape(-1, self.e_dim)
        weight = self.embedding.weight
        distances = (flat**2).sum(1, keepdim=True) + (weight**2).sum(1) - 2 * flat @ weight.t()
        indices = distances.argmin(1)
        z_q = self.embedding(indices).view(z.shape)
        commit, codebook = (1.0, self.beta) if self.legacy else (self.beta, 1.0)
        loss = commit * torch.mean((z_q.detach() - z) ** 2) + codebook * torch.mean((z_q - z.detach()) ** 2)
        z_q = rearrange(z + (z_q - z).detach(), "b h w c -> b c h w").contiguous()
        if self.remap is not None:
            match = indices[:, None] == self.used[None, :]
            position = match.long().argmax(1)
            indices = torch.where(match.any(1), position, torch.full_like(position, self.unknown_index))[:, None]
        if self.sane_index_shape:
            indices = indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (None, None, indices)


class GumbelQuantize(nn.Module):
    """taming's GumbelQuantize (no remap), its forward's math written out."""

    __module__ = TAMING

    def __init__(self, num_hiddens, embedding_dim, n_embed, straight_through=True, kl_weight=5e-4, temp_init=1.0,
                 use_vqinterface=True, remap=None, unknown_index="random"):
        super().__init__()
        self.embedding_dim, self.n_embed = embedding_dim, n_embed
        self.straight_through, self.temperature, self.kl_weight = straight_through, temp_init, kl_weight
        self.proj = nn.Conv2d(num_hiddens, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embedding_dim)
        self.use_vqinterface = use_vqinterface
        self.remap = remap
        self.re_embed = n_embed

    def forward(self, z, temp=None):
        hard = self.straight_through if self.training else True
        logits = self.proj(z)
        one_hot = F.gumbel_softmax(logits, tau=self.temperature if temp is None else temp, dim=1, hard=hard)
        z_q = torch.einsum("bnhw,nd->bdhw", one_hot, self.embed.weight)
        probabilities = F.softmax(logits, dim=1)
        kl = torch.sum(probabilities * torch.log(probabilities * self.n_embed + 1e-10), dim=1).mean()
        return z_q, self.kl_weight * kl, (None, None, one_hot.argmax(dim=1))


@pytest.fixture
def taming_module(monkeypatch):
    for depth, name in enumerate(("taming", "taming.modules", "taming.modules.vqvae", TAMING)):
        module = types.ModuleType(name)
        if name == TAMING:
            module.VectorQuantizer2, module.GumbelQuantize = VectorQuantizer2, GumbelQuantize
        monkeypatch.setitem(sys.modules, name, module)
    return sys.modules[TAMING]


def _taming_steps(original, make_input, steps=2):
    ours = copy.deepcopy(original)
    state = ours.state_dict(keep_vars=True)
    swapped = fastvq.swap_quantizers(ours)
    assert [s.name for s in swapped] == ["0"] and type(ours[0]).__module__ == "fastvq.nn.taming"
    assert all(ours.state_dict(keep_vars=True)[key] is value for key, value in state.items())
    assert list(ours.state_dict()) == list(state)
    for step in range(steps):
        z = make_input()
        results = []
        for model in (original, ours):
            model.zero_grad()
            x = z.clone().requires_grad_()
            torch.manual_seed(20 + step)
            z_q, loss, (_, _, indices) = model[0](x)
            ((z_q * torch.linspace(-1, 1, z_q.numel()).view_as(z_q)).sum() + loss).backward()
            results.append((z_q, loss, indices, x.grad, [p.grad for p in model.parameters()]))
        theirs, mine = results
        assert torch.equal(mine[2], theirs[2])
        torch.testing.assert_close(mine[0], theirs[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(mine[1], theirs[1], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(mine[3], theirs[3], rtol=1e-5, atol=1e-7)
        for ours_grad, their_grad in zip(mine[4], theirs[4]):
            torch.testing.assert_close(ours_grad, their_grad, rtol=1e-5, atol=1e-8)
    assert fastvq.swap_quantizers(ours) == []
    return ours


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("unknown_index", [None, "extra", 1])
def test_taming_vector_quantizer2_swap(taming_module, tmp_path, legacy, unknown_index):
    remap = None
    if unknown_index is not None:
        remap = str(tmp_path / "used.npy")
        np.save(remap, np.array([5, 0, 9, 2, 11], dtype=np.int64))
    torch.manual_seed(3)
    original = nn.Sequential(taming_module.VectorQuantizer2(
        12, 4, 0.3, remap=remap, unknown_index=unknown_index, sane_index_shape=unknown_index is None, legacy=legacy,
    ))
    ours = _taming_steps(original, lambda: torch.randn(2, 4, 3, 5) * 0.3)
    assert ours[0].remap == remap


@pytest.mark.parametrize("straight_through", [True, False])
def test_taming_gumbel_quantize_swap(taming_module, straight_through):
    torch.manual_seed(4)
    original = nn.Sequential(
        taming_module.GumbelQuantize(6, 5, 10, straight_through=straight_through, kl_weight=0.1, temp_init=0.7)
    )
    _taming_steps(original, lambda: torch.randn(2, 6, 3, 4))
