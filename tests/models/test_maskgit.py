"""MaskGITPrior (Chang et al. 2022): the cosine mask schedule, bidirectional masked prediction,
iterative parallel decoding (shape, determinism, fixed codes stay fixed, inpainting), training,
torch.compile, and the prior interface it shares with the other priors."""

import math

import pytest
import torch

from fastvq.models import GPTPrior, HierarchicalPrior, MaskGITPrior, cosine_mask_schedule, prior_loss, prior_sample

K = 12


def _prior(kind="flat", **extra):
    torch.manual_seed(0)
    options = dict(dim=16, num_layers=2, heads=2)
    if kind == "depth":
        options["depth"] = 3
    elif kind == "class":
        options["num_classes"] = 4
    elif kind == "codes":
        options.update(cond_num_codes=5, cond_len=4)
    options.update(extra)
    return MaskGITPrior(K, 6, **options).eval()


def _cond(kind, n, generator=None):
    if kind == "class":
        return torch.randint(0, 4, (n,), generator=generator)
    if kind == "codes":
        return torch.randint(0, 5, (n, 2, 2), generator=generator)
    return None


def _codes(kind, n, generator=None):
    shape = (n, 2, 3, 3) if kind == "depth" else (n, 2, 3)
    return torch.randint(0, K, shape, generator=generator)


def test_cosine_mask_schedule():
    assert cosine_mask_schedule(0.0) == 1.0
    assert cosine_mask_schedule(1.0) == pytest.approx(0.0, abs=1e-12)
    assert cosine_mask_schedule(0.5) == pytest.approx(math.sqrt(0.5))
    ratios = torch.tensor([0.0, 1 / 3, 0.5, 1.0])
    torch.testing.assert_close(cosine_mask_schedule(ratios), torch.cos(ratios * math.pi / 2))


def test_random_mask_follows_the_cosine_schedule():
    prior = _prior("depth")  # 18 tokens
    generator = torch.Generator().manual_seed(3)
    mask = prior.random_mask(500, torch.device("cpu"), generator)
    assert mask.shape == (500, 18) and mask.dtype == torch.bool
    # The same generator state gives the ratios first: ceil(cos(pi r / 2) * N) codes per row, >= 1.
    ratios = torch.rand(500, 1, generator=torch.Generator().manual_seed(3))
    expected = torch.ceil(torch.cos(ratios * math.pi / 2) * 18).clamp(1, 18)[:, 0]
    assert torch.equal(mask.sum(1).float(), expected)
    # Every token is masked about equally often (the chosen subset is uniform).
    share = mask.float().mean(0)
    assert float(share.max() - share.min()) < 0.15


@pytest.mark.parametrize("kind", ["flat", "depth", "class", "codes"])
def test_masked_codes_are_hidden_and_attention_is_bidirectional(kind):
    prior = _prior(kind)
    generator = torch.Generator().manual_seed(1)
    codes, cond = _codes(kind, 3, generator), _cond(kind, 3, generator)
    mask = torch.zeros(codes.shape, dtype=torch.bool)
    mask.view(3, -1)[:, 1::2] = True
    logits = prior(codes, mask, cond)
    assert logits.shape == ((3, 6, 3, K) if kind == "depth" else (3, 6, K))
    # The value under a masked code is invisible to every prediction ...
    hidden_changed = torch.where(mask, (codes + 1) % K, codes)
    torch.testing.assert_close(prior(hidden_changed, mask, cond), logits)
    # ... while the last visible code changes the first position's prediction: attention sees both ways.
    visible_changed = codes.clone().view(3, -1)
    visible_changed[:, -2] = (visible_changed[:, -2] + 1) % K
    other = prior(visible_changed.view(codes.shape), mask, cond)
    assert not torch.allclose(other.reshape(3, -1, K)[:, 0], logits.reshape(3, -1, K)[:, 0])
    if cond is not None:
        changed_cond = (cond + 1) % (4 if kind == "class" else 5)
        assert not torch.allclose(prior(codes, mask, changed_cond), logits)


@pytest.mark.parametrize("kind", ["flat", "depth", "class", "codes"])
def test_sampling_shape_and_determinism(kind):
    prior = _prior(kind)
    cond = _cond(kind, 5, torch.Generator().manual_seed(0))

    def draw(seed, **options):
        return prior.sample(5, (2, 3), cond, steps=3, generator=torch.Generator().manual_seed(seed), **options)

    first = draw(7)
    assert first.shape == ((5, 2, 3, 3) if kind == "depth" else (5, 2, 3)) and first.dtype == torch.int64
    assert 0 <= int(first.min()) and int(first.max()) < K
    assert torch.equal(first, draw(7))
    assert not torch.equal(first, draw(8))
    assert torch.equal(draw(1, temperature=0, choice_temperature=0), draw(2, temperature=0, choice_temperature=0))
    filtered = draw(7, temperature=0.7, top_k=3, top_p=0.9)
    assert filtered.shape == first.shape
    assert prior.sample(0, (2, 3), _cond(kind, 0), steps=2).shape[0] == 0
    assert prior.sample(2, None, _cond(kind, 2), steps=1).shape == ((2, 6, 3) if kind == "depth" else (2, 6))


def _record_steps(prior, monkeypatch):
    calls = []
    original = prior._logits

    def recording(flat, mask, cond):
        calls.append((flat.clone(), mask.clone()))
        return original(flat, mask, cond)

    monkeypatch.setattr(prior, "_logits", recording)
    return calls


@pytest.mark.parametrize("steps", [1, 3, 8, 30])
def test_decoding_keeps_fixed_codes_and_follows_the_schedule(steps, monkeypatch):
    prior = _prior("depth")  # 18 tokens
    calls = _record_steps(prior, monkeypatch)
    out = prior.sample(4, (2, 3), steps=steps, generator=torch.Generator().manual_seed(0)).reshape(4, -1)
    assert len(calls) == steps
    assert bool(calls[0][1].all())
    for step, (flat, mask) in enumerate(calls):
        # A code unmasked before this step keeps its value to the end.
        assert torch.equal(torch.where(mask, out, flat), out)
        if step:
            previous = calls[step - 1][1]
            assert bool((mask <= previous).all()), "a fixed code was masked again"
            expected = min(max(math.floor(18 * math.cos(math.pi / 2 * step / steps)), 1), int(previous[0].sum()) - 1)
            assert mask.sum(1).tolist() == [max(expected, 0)] * 4


def test_inpainting_keeps_the_known_codes(monkeypatch):
    prior = _prior("codes")
    generator = torch.Generator().manual_seed(2)
    codes, cond = _codes("flat", 3, generator), _cond("codes", 3, generator)
    known = torch.rand(codes.shape, generator=generator) < 0.5
    known[0] = True  # a map with nothing to draw
    calls = _record_steps(prior, monkeypatch)
    out = prior.sample(3, (2, 3), cond, steps=4, codes=codes, known=known, generator=generator)
    assert torch.equal(out[known], codes[known])
    assert torch.equal(calls[0][1], ~known.reshape(3, -1))
    with pytest.raises(ValueError, match="go together"):
        prior.sample(3, (2, 3), cond, codes=codes)
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        prior.sample(3, (2, 3), cond, codes=codes + K, known=known)


def test_training_lowers_the_held_out_masked_loss():
    torch.manual_seed(0)
    prior = MaskGITPrior(8, 9, dim=32, num_layers=2, heads=2).train()
    # Structured maps: every row is one code repeated, so one visible code gives the masked ones
    # away (a fully masked map, about 30 % of the draws for 9 codes, stays at ln 8 nats).
    train = torch.randint(0, 8, (256, 1, 1)).expand(256, 3, 3).contiguous()
    held_out = torch.randint(0, 8, (64, 1, 1)).expand(64, 3, 3).contiguous()

    def held_out_loss():
        prior.eval()
        with torch.no_grad():
            value = float(prior_loss(prior, held_out, generator=torch.Generator().manual_seed(0)))
        prior.train()
        return value

    before = held_out_loss()
    assert held_out_loss() == before  # the same masks every time
    optimizer = torch.optim.Adam(prior.parameters(), lr=3e-3)
    for step in range(80):
        loss = prior.loss(train[(step * 32) % 256 :][:32])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert held_out_loss() < 0.75 * before


def test_trains_under_compile_fullgraph_like_eager():
    torch.manual_seed(0)
    eager = MaskGITPrior(K, 6, dim=16, num_layers=1, heads=2)
    compiled_model = MaskGITPrior(K, 6, dim=16, num_layers=1, heads=2)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled_model)]
    codes = torch.randint(0, K, (8, 2, 3), generator=torch.Generator().manual_seed(0))
    losses = {"eager": [], "compiled": []}
    for step in range(3):
        mask = eager.random_mask(8, codes.device, torch.Generator().manual_seed(step)).reshape(codes.shape)
        for name, net, optimizer in (("eager", eager, optimizers[0]), ("compiled", compiled, optimizers[1])):
            logits = net(codes, mask).reshape(8, 6, K)
            loss = torch.nn.functional.cross_entropy(logits[mask.reshape(8, 6)], codes[mask])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[name].append(float(loss.detach()))
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=1e-4, atol=1e-5)


def test_hierarchical_and_prior_helpers():
    torch.manual_seed(0)
    prior = HierarchicalPrior(MaskGITPrior(5, 4, dim=16, num_layers=1, heads=2),
                              MaskGITPrior(K, 6, dim=16, num_layers=1, heads=2, cond_num_codes=5, cond_len=4))
    top, bottom = torch.randint(0, 5, (3, 2, 2)), torch.randint(0, K, (3, 2, 3))
    top_loss, bottom_loss = prior.loss((top, bottom), generator=torch.Generator().manual_seed(0))
    (top_loss + bottom_loss).backward()
    sampled = prior.sample(3, (2, 2), (2, 3), steps=2, generator=torch.Generator().manual_seed(0))
    assert sampled[0].shape == (3, 2, 2) and sampled[1].shape == (3, 2, 3)
    flat = prior_sample(prior.bottom, 3, (2, 3), top, steps=2)
    assert flat.shape == (3, 2, 3)
    with pytest.raises(ValueError, match="steps .* needs the maskgit prior"):
        prior_sample(GPTPrior(K, 6, dim=16, num_layers=1, heads=2), 2, (2, 3), steps=4)


def test_argument_checks():
    prior = _prior()
    with pytest.raises(ValueError, match="H \\* W = 6"):
        prior.sample(2, (2, 2))
    with pytest.raises(ValueError, match="steps"):
        prior.sample(2, steps=0)
    with pytest.raises(ValueError, match="top_k"):
        prior.sample(2, top_k=K + 1)
    with pytest.raises(ValueError, match="choice_temperature"):
        prior.sample(2, choice_temperature=-1.0)
    with pytest.raises(ValueError, match="mask must be a bool"):
        prior(torch.zeros(2, 6, dtype=torch.int64), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="6 positions"):
        prior(torch.zeros(2, 5, dtype=torch.int64), torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="without conditioning"):
        prior.sample(2, cond=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="not both"):
        MaskGITPrior(K, 6, num_classes=3, cond_num_codes=4, cond_len=2)
    with pytest.raises(ValueError, match="multiple of heads"):
        MaskGITPrior(K, 6, dim=10, heads=4)
