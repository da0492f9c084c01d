"""The full models on tiny configurations: shapes, gradients, encode/decode, priors and their samplers."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastvq.models import (
    RQVAE,
    VQVAE,
    VQVAE2,
    GatedPixelCNN,
    GPTPrior,
    HierarchicalPrior,
    PatchDiscriminator,
    PixelCNN,
    ViTVQGAN,
    prior_loss,
    prior_sample,
)
from fastvq.models.gpt_prior import filter_logits
from fastvq.models.vit_vqgan import discriminator_loss, logit_laplace_nll, sincos_position_embedding_2d
from fastvq.train.data import load_dataset


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is faster than two on a small shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = dict(channels=16, res_channels=8, num_res_blocks=1, codebook_size=24, embedding_dim=6)


def _images(batch=5, channels=1, size=8, seed=0):
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


STAGE1 = {
    "vqvae-ema": lambda: VQVAE(1, downsamples=1, kmeans_init=True, dead_code_threshold=1.0, **TINY),
    "vqvae-gradient": lambda: VQVAE(1, downsamples=2, codebook="gradient", **TINY),
    "vqvae2": lambda: VQVAE2(1, bottom_downsamples=1, top_downsamples=1, top_codebook_size=10, **TINY),
    "rqvae-shared": lambda: RQVAE(1, downsamples=1, depth=3, **TINY),
    "rqvae-separate": lambda: RQVAE(1, downsamples=1, depth=2, shared_codebook=False, codebook="gradient", **TINY),
    "vit-vqgan": lambda: ViTVQGAN(8, 2, 1, dim=16, depth=1, heads=2, mlp_dim=32, codebook_size=24, codebook_dim=4),
}
CODE_SHAPES = {
    "vqvae-ema": (5, 4, 4), "vqvae-gradient": (5, 2, 2), "vqvae2": ((5, 2, 2), (5, 4, 4)),
    "rqvae-shared": (5, 4, 4, 3), "rqvae-separate": (5, 4, 4, 2), "vit-vqgan": (5, 4, 4),
}


def _shape(codes):
    return tuple(tuple(c.shape) for c in codes) if isinstance(codes, tuple) else tuple(codes.shape)


@pytest.mark.parametrize("name", list(STAGE1))
def test_stage1_forward_backward_and_shapes(name):
    torch.manual_seed(0)
    model = STAGE1[name]()
    x = _images().requires_grad_()
    out = model(x)
    assert out["reconstruction"].shape == x.shape
    for key in ("loss", "recon_loss", "vq_loss"):
        assert out[key].shape == () and out[key].dtype == torch.float32 and torch.isfinite(out[key]), key
    assert len(out["indices"]) == len(model.codebook_sizes)
    for indices, size in zip(out["indices"], model.codebook_sizes):
        assert indices.dtype == torch.int64 and int(indices.min()) >= 0 and int(indices.max()) < size
    out["loss"].backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trained), [n for n, p in model.named_parameters() if p.grad is None]
    assert _shape(model.encode(x.detach())) == CODE_SHAPES[name]


@pytest.mark.parametrize("name", list(STAGE1))
def test_encode_then_decode_is_the_eval_reconstruction(name):
    torch.manual_seed(0)
    model = STAGE1[name]()
    x = _images()
    model.train()
    model(x)  # initialises k-means codebooks and moves the EMA ones
    model.eval()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    codes = model.encode(x)
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before), "encode changed the model's state"
    with torch.no_grad():
        expected = model(x)["reconstruction"]
        decoded = model.decode_codes(codes)
    torch.testing.assert_close(decoded, expected, rtol=1e-5, atol=1e-5)


def test_vqvae_normalises_the_reconstruction_loss_by_the_data_variance():
    torch.manual_seed(0)
    plain = VQVAE(1, downsamples=1, **TINY).eval()
    scaled = VQVAE(1, downsamples=1, data_variance=0.25, **TINY).eval()
    scaled.load_state_dict(plain.state_dict() | {"data_variance": torch.tensor(0.25)})
    x = _images()
    with torch.no_grad():
        a, b = plain(x), scaled(x)
    torch.testing.assert_close(b["recon_loss"], a["recon_loss"] / 0.25)
    torch.testing.assert_close(a["recon_loss"], F.mse_loss(a["reconstruction"], x))


def test_vqvae2_bottom_is_conditioned_on_top():
    torch.manual_seed(0)
    model = STAGE1["vqvae2"]().eval()
    top, bottom = model.encode(_images())
    changed_top = (top + 1) % model.top_codebook_size
    with torch.no_grad():
        a = model.decode_codes((top, bottom))
        b = model.decode_codes((changed_top, bottom))
    assert not torch.allclose(a, b), "the decoder ignores the top codes"


@pytest.mark.parametrize("bad, error, match", [
    (torch.rand(2, 3, 8, 8), ValueError, r"\[B, 1, H, W\].*\(2, 3, 8, 8\)"),
    (torch.rand(2, 1, 6, 6), ValueError, "multiples of 4"),
    (torch.zeros(2, 1, 8, 8, dtype=torch.int64), TypeError, "floating-point"),
])
def test_bad_inputs_name_the_shape(bad, error, match):
    with pytest.raises(error, match=match):
        VQVAE(1, downsamples=2, **TINY)(bad)


def test_decode_checks_the_codes():
    model = VQVAE(1, downsamples=1, **TINY)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 24\), got values in \[0, 24\]"):
        model.decode_codes(torch.tensor([[[0, 24], [1, 2]]]))
    with pytest.raises(ValueError, match="int64 tensor with 3 dimensions"):
        model.decode_codes(torch.zeros(2, 2))


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="codebook must be"):
        VQVAE(1, codebook="kmeans", **TINY)
    with pytest.raises(ValueError, match="need the EMA codebook"):
        VQVAE(1, codebook="gradient", kmeans_init=True, **TINY)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViTVQGAN(10, 4, 1, dim=16, depth=1, heads=2, mlp_dim=32)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embedding_2d(6, 2, 2)


def test_short_training_lowers_the_loss():
    torch.manual_seed(0)
    data = load_dataset("digits")
    model = VQVAE(1, downsamples=1, kmeans_init=True, data_variance=data.variance(), **TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = data.batch(data.train[:128])
    first = None
    for _ in range(40):
        loss = model(x)["loss"]
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(model(x)["loss"].detach()) < 0.6 * first


# --------------------------------------------------------------------------- ViT-VQGAN pieces


def test_sincos_position_embedding():
    table = sincos_position_embedding_2d(8, 3, 4)
    assert table.shape == (12, 8)
    # Position (0, 0): sin 0 = 0 and cos 0 = 1 in both halves.
    assert table[0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    # The first half depends on the row only, the second on the column only.
    assert torch.equal(table[0, :4], table[3, :4]) and not torch.equal(table[0, :4], table[4, :4])
    assert torch.equal(table[0, 4:], table[4, 4:]) and not torch.equal(table[0, 4:], table[1, 4:])


def test_logit_laplace_nll_is_the_density():
    x = torch.tensor([0.0, 0.3, 1.0])
    mean, log_scale = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.0, -0.5, 0.3])
    eps = 0.1
    y = x * (1 - 2 * eps) + eps
    scale = log_scale.exp()
    expected = -torch.log(1 / (2 * scale * y * (1 - y)) * torch.exp(-(torch.logit(y) - mean).abs() / scale))
    torch.testing.assert_close(logit_laplace_nll(x, mean, log_scale), expected.mean())


def test_vit_vqgan_losses_discriminator_and_perceptual_network():
    torch.manual_seed(0)
    features = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Dropout(0.5))
    model = ViTVQGAN(8, 2, 1, dim=16, depth=1, heads=2, mlp_dim=32, codebook_size=24, codebook_dim=4,
                     perceptual_network=features)
    model.train()
    assert not features.training and not any(p.requires_grad for p in features.parameters())
    assert not any(name.startswith("perceptual_network") for name, p in model.named_parameters() if p.requires_grad)
    discriminator = PatchDiscriminator(1, 8, 2)
    x = _images()
    out = model(x, discriminator)
    for key in ("l2", "logit_laplace", "perceptual", "adversarial"):
        assert float(out[key].detach()) != 0.0, key
    expected = out["recon_loss"] + out["vq_loss"] + 0.1 * out["adversarial"]
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    logits_real, logits_fake = discriminator(x), discriminator(out["reconstruction"].detach())
    assert logits_real.shape == (5, 1, 2, 2)
    assert discriminator_loss(logits_real, logits_fake).shape == ()
    assert float(model(x)["adversarial"].detach()) == 0.0  # no discriminator: no adversarial term


# --------------------------------------------------------------------------- priors


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.5)) == [True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.6)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.96)) == [True, True, True, True]
    assert kept(filter_logits(logits, top_k=3, top_p=0.7)) == [True, True, False, False]


GPTS = {
    "flat": lambda: GPTPrior(12, 6, dim=16, num_layers=2, heads=2),
    "depth": lambda: GPTPrior(12, 6, depth=3, dim=16, num_layers=2, heads=2, depth_layers=1),
    "class": lambda: GPTPrior(12, 6, dim=16, num_layers=2, heads=2, num_classes=4),
    "codes": lambda: GPTPrior(12, 6, dim=16, num_layers=2, heads=2, cond_num_codes=5, cond_len=4),
}


def _gpt_inputs(name, batch=3):
    generator = torch.Generator().manual_seed(1)
    shape = (batch, 2, 3, 3) if name == "depth" else (batch, 2, 3)
    codes = torch.randint(0, 12, shape, generator=generator)
    cond = {"class": torch.randint(0, 4, (batch,), generator=generator),
            "codes": torch.randint(0, 5, (batch, 2, 2), generator=generator)}.get(name)
    return codes, cond


@pytest.mark.parametrize("name", list(GPTS))
def test_gpt_prior_is_causal_and_trains(name):
    torch.manual_seed(0)
    prior = GPTS[name]().eval()
    codes, cond = _gpt_inputs(name)
    logits = prior(codes, cond)
    depth = 3 if name == "depth" else 1
    assert logits.shape == ((3, 6, 3, 12) if depth > 1 else (3, 6, 12))
    # Changing the codes from position 4 on leaves the predictions of positions 0..4 unchanged.
    changed = codes.clone().reshape(3, 6, -1)
    changed[:, 4:] = (changed[:, 4:] + 1) % 12
    other = prior(changed.reshape(codes.shape), cond)
    torch.testing.assert_close(other[:, :4], logits[:, :4])
    # Position 4's first code is predicted before any of position 4's codes are known.
    first_code = (slice(None), 4, 0) if depth > 1 else (slice(None), 4)
    torch.testing.assert_close(other[first_code], logits[first_code])
    assert not torch.allclose(other[:, 5:], logits[:, 5:])
    if depth > 1:
        # Within a position, depth d sees only the codes of depths < d: the last code of position 3
        # changes none of position 3's predictions.
        deeper = codes.clone().reshape(3, 6, 3)
        deeper[:, 3, 2] = (deeper[:, 3, 2] + 1) % 12
        torch.testing.assert_close(prior(deeper.reshape(codes.shape), cond)[:, :4], logits[:, :4])
    prior.train()
    loss = prior.loss(codes, cond)
    assert math.isfinite(float(loss.detach()))
    loss.backward()


def _naive_gpt_sample(prior, n, cond, temperature, top_k, top_p, generator):
    """Sampling without the cache: the whole sequence through ``forward`` at every step."""
    codes = torch.zeros(n, prior.seq_len, prior.depth, dtype=torch.int64)
    for position in range(prior.seq_len):
        for level in range(prior.depth):
            logits = prior(codes if prior.depth > 1 else codes[..., 0], cond)
            step = logits[:, position, level] if prior.depth > 1 else logits[:, position]
            probs = filter_logits(step.float() / temperature, top_k, top_p).softmax(-1)
            codes[:, position, level] = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return codes if prior.depth > 1 else codes[..., 0]


@pytest.mark.parametrize("name", list(GPTS))
@pytest.mark.parametrize("options", [dict(temperature=1.0, top_k=None, top_p=None),
                                     dict(temperature=0.7, top_k=5, top_p=0.9)], ids=["plain", "filtered"])
def test_gpt_cached_sampling_equals_uncached(name, options):
    torch.manual_seed(0)
    prior = GPTS[name]().eval()
    _, cond = _gpt_inputs(name, batch=4)
    with torch.no_grad():
        cached = prior.sample(4, (2, 3), cond, generator=torch.Generator().manual_seed(5), **options)
        naive = _naive_gpt_sample(prior, 4, cond, generator=torch.Generator().manual_seed(5), **options)
    assert torch.equal(cached.reshape(naive.shape), naive)
    assert cached.shape == ((4, 2, 3, 3) if name == "depth" else (4, 2, 3))


def test_gpt_sample_argument_checks():
    prior = GPTS["flat"]()
    with pytest.raises(ValueError, match="H \\* W = 6"):
        prior.sample(2, (2, 2))
    with pytest.raises(ValueError, match="top_p"):
        prior.sample(2, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        prior.sample(2, top_k=13)
    assert prior.sample(0).shape == (0, 6)
    greedy = prior.sample(3, temperature=0)
    assert torch.equal(greedy, prior.sample(3, temperature=0))


@pytest.mark.parametrize("kind", ["gated-pixelcnn", "gpt"])
def test_hierarchical_prior_for_vqvae2(kind):
    torch.manual_seed(0)
    if kind == "gpt":
        top = GPTPrior(10, 4, dim=16, num_layers=1, heads=2)
        bottom = GPTPrior(24, 16, dim=16, num_layers=1, heads=2, cond_num_codes=10, cond_len=4)
    else:
        top = GatedPixelCNN(10, channels=8, num_layers=2)
        bottom = GatedPixelCNN(24, channels=8, num_layers=2, cond_num_codes=10)
    prior = HierarchicalPrior(top, bottom)
    model = STAGE1["vqvae2"]().eval()
    codes = model.encode(_images())
    top_loss, bottom_loss = prior.loss(codes)
    (top_loss + bottom_loss).backward()
    sampled = prior.sample(3, (2, 2), (4, 4), generator=torch.Generator().manual_seed(0))
    assert _shape(sampled) == ((3, 2, 2), (3, 4, 4))
    assert model.decode_codes(sampled).shape == (3, 1, 8, 8)


def test_prior_helpers_on_pixelcnn():
    torch.manual_seed(0)
    prior = PixelCNN(24, channels=8, num_layers=2)
    codes = torch.randint(0, 24, (3, 4, 4))
    loss = prior_loss(prior, codes)
    torch.testing.assert_close(loss, F.cross_entropy(prior(codes), codes))
    assert prior_sample(prior, 2, (4, 4), top_k=3).shape == (2, 4, 4)
    with pytest.raises(ValueError, match="top_p .*needs the gpt prior"):
        prior_sample(prior, 2, (4, 4), top_p=0.9)
