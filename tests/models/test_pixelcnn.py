"""PixelCNN and GatedPixelCNN priors: shapes, causality by perturbation, conditioning, the two
samplers (the fast one must draw exactly the naive one's maps), and training under
``torch.compile(fullgraph=True)``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fastvq.models import GatedPixelCNN, PixelCNN
from fastvq.models import pixelcnn as pixelcnn_module

NUM_CODES = 7
MODELS = {"pixelcnn": PixelCNN, "gated": GatedPixelCNN}


def _model(kind, cond=None, num_layers=3, channels=8, seed=0):
    torch.manual_seed(seed)
    kwargs = ({"num_classes": 3} if cond == "class"
              else {"cond_num_codes": 5, "cond_channels": 4} if cond == "map" else {})
    return MODELS[kind](NUM_CODES, channels=channels, num_layers=num_layers, kernel_size=3, first_kernel_size=5,
                        **kwargs).eval()


def _cond(kind, batch, seed=1):
    generator = torch.Generator().manual_seed(seed)
    if kind == "class":
        return torch.randint(0, 3, (batch,), generator=generator)
    if kind == "map":  # VQ-VAE-2: the top codes, at half the resolution of the map they condition
        return torch.randint(0, 5, (batch, 2, 3), generator=generator)
    return None


def _codes(batch, height=4, width=6, seed=2):
    return torch.randint(0, NUM_CODES, (batch, height, width), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cond", [None, "class", "map"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_logits_shape_and_conditioning(kind, cond):
    model = _model(kind, cond)
    codes = _codes(2)
    logits = model(codes, _cond(cond, 2))
    assert logits.shape == (2, NUM_CODES, 4, 6) and logits.dtype == torch.float32
    if cond is not None:
        other = model(codes, _cond(cond, 2, seed=5))
        assert not torch.equal(logits, other), "the condition did not change the logits"


def _forbidden(i, j, height, width):
    rows = torch.arange(height)[:, None]
    cols = torch.arange(width)[None, :]
    return (rows > i) | ((rows == i) & (cols >= j))


@pytest.mark.parametrize("cond", [None, "map"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_model_causality_by_perturbation(kind, cond):
    """Changing the codes at and after a position leaves the logits there unchanged, bit for bit."""
    height, width = 4, 5
    model = _model(kind, cond)
    codes = _codes(1, height, width)
    positions = [(i, j) for i in range(height) for j in range(width)]
    generator = torch.Generator().manual_seed(3)
    perturbed = []
    for i, j in positions:
        noise = (codes + torch.randint(1, NUM_CODES, codes.shape, generator=generator)) % NUM_CODES
        perturbed.append(torch.where(_forbidden(i, j, height, width), noise, codes))
    perturbed = torch.cat(perturbed)
    cond_batch = None if cond is None else _cond(cond, 1).expand(len(positions), 2, 3)
    with torch.no_grad():
        base = model(codes.expand_as(perturbed), cond_batch)
        logits = model(perturbed, cond_batch)
    for index, (i, j) in enumerate(positions):
        assert torch.equal(logits[index, :, i, j], base[index, :, i, j]), (
            f"{kind}: logits at {(i, j)} changed when only codes at or after it changed"
        )
    # The logits do depend on the previous position and on the row above.
    for source in ((2, 1), (1, 2)):
        nudged = codes.clone()
        nudged[0, source[0], source[1]] = (nudged[0, source[0], source[1]] + 1) % NUM_CODES
        with torch.no_grad():
            assert not torch.equal(model(nudged, _cond(cond, 1))[0, :, 2, 2], model(codes, _cond(cond, 1))[0, :, 2, 2])


def test_gated_pixelcnn_sees_the_blind_spot_of_pixelcnn():
    """Two 3 x 3 layers after the first: PixelCNN cannot see two columns right in the row above."""
    codes = _codes(1, 6, 7)
    target, source = (3, 2), (2, 5)
    nudged = codes.clone()
    nudged[0, source[0], source[1]] = (nudged[0, source[0], source[1]] + 1) % NUM_CODES
    seen = {}
    for kind in MODELS:
        torch.manual_seed(0)
        model = MODELS[kind](NUM_CODES, channels=8, num_layers=3, kernel_size=3, first_kernel_size=3)
        with torch.no_grad():
            seen[kind] = not torch.equal(model(codes)[0, :, target[0], target[1]],
                                         model(nudged)[0, :, target[0], target[1]])
    assert seen == {"pixelcnn": False, "gated": True}


def test_triton_backend_gives_the_same_logits_and_stays_causal(monkeypatch):
    from _backends import HAS_TRITON, TRITON_DEVICE

    if not HAS_TRITON:
        pytest.skip("Triton is not installed")
    model = _model("gated", "class", num_layers=2, channels=4).to(TRITON_DEVICE)
    codes = _codes(2, 3, 4).to(TRITON_DEVICE)
    labels = _cond("class", 2).to(TRITON_DEVICE)
    with torch.no_grad():
        monkeypatch.setenv("FASTVQ_BACKEND", "torch")
        expected = model(codes, labels)
        monkeypatch.setenv("FASTVQ_BACKEND", "triton")
        logits = model(codes, labels)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        changed = codes.clone()
        changed[:, 1, 2:] = (changed[:, 1, 2:] + 1) % NUM_CODES
        changed[:, 2:] = (changed[:, 2:] + 3) % NUM_CODES
        assert torch.equal(model(changed, labels)[:, :, 1, 2], logits[:, :, 1, 2])


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("cond", [None, "class", "map"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_fast_sampler_state_reproduces_the_full_logits(kind, cond):
    """Walked over a fixed map, the fast sampler's cached logits match a full forward pass everywhere."""
    height, width = 4, 6
    model = _model(kind, cond)
    codes = _codes(2, height, width)
    with torch.no_grad():
        full = model(codes, _cond(cond, 2))
        labels, cond_map = model._condition(_cond(cond, 2), 2, height, width)
        stepper = model._stepper(2, height, width, labels, cond_map)
        for i in range(height):
            stepper.begin_row(i)
            for j in range(width):
                torch.testing.assert_close(stepper.logits(i, j), full[:, :, i, j], rtol=1e-5, atol=1e-5,
                                           msg=lambda message, i=i, j=j: f"{kind} at {(i, j)}: {message}")
                stepper.commit(i, j, codes[:, i, j])


@pytest.mark.parametrize("kernel_size, first_kernel_size", [(1, 1), (5, 3)])
@pytest.mark.parametrize("kind", list(MODELS))
def test_fast_sampler_state_with_other_kernel_sizes(kind, kernel_size, first_kernel_size):
    """1 x 1 kernels (no padding, a type-A layer with no tap) and a first kernel smaller than the
    later ones: the cached logits still match a full pass."""
    torch.manual_seed(0)
    model = MODELS[kind](NUM_CODES, channels=8, num_layers=3, kernel_size=kernel_size,
                         first_kernel_size=first_kernel_size, num_classes=3).eval()
    codes, labels = _codes(3, 4, 5), _cond("class", 3)
    with torch.no_grad():
        full = model(codes, labels)
        stepper = model._stepper(3, 4, 5, labels, None)
        for i in range(4):
            stepper.begin_row(i)
            for j in range(5):
                torch.testing.assert_close(stepper.logits(i, j), full[:, :, i, j], rtol=1e-5, atol=1e-5)
                stepper.commit(i, j, codes[:, i, j])


def _step_flops(model, width):
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad():
        stepper = model._stepper(1, 3, width, None, None)
        stepper.begin_row(0)
        stepper.commit(0, 0, torch.zeros(1, dtype=torch.int64))
        stepper.begin_row(1)
        with FlopCounterMode(display=False) as counter:
            stepper.logits(1, 1)
    return counter.get_total_flops()


@pytest.mark.parametrize("kind", list(MODELS))
def test_fast_sampler_step_costs_one_position(monkeypatch, kind):
    """A step runs no masked convolution (its per-call checks cost more than one position's
    arithmetic) and does as many flops on a 40-wide row as on a 5-wide one: exactly one position
    of the network's matmuls, the 1 x 1 biases included as one more input channel."""
    channels, layers, taps = 8, 3, 2  # two kept centre-row taps per layer: 1 x 5 or 5 x 5 A, 1 x 3 or 3 x 3 B
    model = _model(kind, channels=channels, num_layers=layers)

    def no_masked_conv(*args, **kwargs):
        raise AssertionError("a sampler step ran a masked convolution")

    monkeypatch.setattr(pixelcnn_module.MaskedConv2d, "forward", no_masked_conv)
    flops = _step_flops(model, 5)
    assert flops == _step_flops(model, 40) > 0
    head = 2 * channels * channels + 2 * channels * NUM_CODES
    if kind == "gated":  # horizontal stacks C -> 2C, outputs of all but the last layer, one skip matmul
        expected = (layers * 2 * taps * channels * 2 * channels + (layers - 1) * 2 * (channels + 1) * channels
                    + 2 * layers * (channels + 1) * channels + head)
    else:  # centre-row taps C -> C, the 1 x 1 outputs of the residual layers
        expected = layers * 2 * taps * channels * channels + (layers - 1) * 2 * (channels + 1) * channels + head
    assert flops == expected


def test_draw_band_is_tight_and_sound():
    """The draw is flagged ambiguous exactly when logits moved by up to the slack could change it:
    an adversarial move within the slack flips every flagged draw just inside the band, and no
    move within the slack flips an unflagged one."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 5, generator=generator)
    uniform = torch.rand(4000, generator=generator, dtype=torch.float64)
    ulps = 1e4  # a slack of about 1e-3 (float32), wide enough to hit at random
    codes, ambiguous = pixelcnn_module._draw(logits, uniform, 1.0, None, ulps)
    slack = ulps * torch.finfo(torch.float32).eps * (1 + logits.abs().amax(dim=1).double())
    flipped = torch.zeros_like(ambiguous)
    for boundary in range(1, 5):  # push the mass before each boundary up or down by the slack
        for sign in (1.0, -1.0):
            direction = torch.where(torch.arange(5) < boundary, sign, -sign).double()
            moved = logits.double() + 0.999 * slack[:, None] * direction
            moved_codes, _ = pixelcnn_module._draw(moved, uniform, 1.0, None, 0)
            flipped |= moved_codes != codes
    assert not (flipped & ~ambiguous).any(), "a draw outside the band changed within the slack"
    assert ambiguous.sum() >= 20 and flipped[ambiguous].float().mean() > 0.9, (
        "the band flags draws that no move within the slack changes: it is loose"
    )


SAMPLES, SAMPLE_SHAPE = 8, (5, 6)


def _sample_both(model, cond, **kwargs):
    shape = SAMPLE_SHAPE
    fast = model.sample(SAMPLES, shape, cond, generator=torch.Generator().manual_seed(11), **kwargs)
    rechecks = model.last_sample_rechecks
    naive = model.sample(SAMPLES, shape, cond, generator=torch.Generator().manual_seed(11), method="naive", **kwargs)
    return fast, naive, rechecks


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.7, 3), (0.0, None)])
@pytest.mark.parametrize("cond", [None, "class", "map"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_fast_sampler_draws_the_naive_samplers_maps(kind, cond, temperature, top_k):
    model = _model(kind, cond)
    fast, naive, rechecks = _sample_both(model, _cond(cond, SAMPLES), temperature=temperature, top_k=top_k)
    assert fast.shape == (SAMPLES, *SAMPLE_SHAPE) and fast.dtype == torch.int64
    assert torch.equal(fast, naive), f"fast sampler drew\n{fast}\nnaive sampler drew\n{naive}"
    assert rechecks <= 3, f"{rechecks} of 30 positions needed a full pass: the cached logits are off"
    if top_k is not None:
        logits = model(naive, _cond(cond, SAMPLES))
        kth = logits.topk(top_k, dim=1).values[:, -1]
        chosen = logits.gather(1, naive[:, None]).squeeze(1)
        assert (chosen >= kth).all(), "a code outside the top k was drawn"
    if temperature > 0:
        assert len(torch.unique(naive)) > 1, "an untrained prior should not draw a constant map"


@pytest.mark.parametrize("ulps, expected_rechecks", [(0, 0), (1e9, 30)])
def test_fast_sampler_rechecks_only_where_rounding_could_matter(monkeypatch, ulps, expected_rechecks):
    """With no rounding allowance every draw comes from the cached logits; with an absurd one,
    every draw is re-made from a full pass. Both give the naive maps."""
    monkeypatch.setattr(pixelcnn_module, "_ROUNDING_ULPS", ulps)
    model = _model("gated")
    fast, naive, rechecks = _sample_both(model, None)
    assert torch.equal(fast, naive)
    assert rechecks == expected_rechecks


def test_sampling_follows_the_generator():
    model = _model("gated")
    first = model.sample(2, (3, 4), generator=torch.Generator().manual_seed(0))
    again = model.sample(2, (3, 4), generator=torch.Generator().manual_seed(0))
    other = model.sample(2, (3, 4), generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert model.sample(0, (3, 4)).shape == (0, 3, 4)


def test_greedy_sampling_takes_the_argmax():
    model = _model("pixelcnn")
    codes = model.sample(2, (3, 4), temperature=0.0)
    assert torch.equal(model(codes).argmax(dim=1), codes)


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((-1, (3, 4)), {}, "n must be"),
        ((2, (3,)), {}, "shape must be"),
        ((2, (0, 4)), {}, "shape must be"),
        ((2, (3, 4)), {"temperature": -1.0}, "temperature"),
        ((2, (3, 4)), {"temperature": float("nan")}, "temperature"),
        ((2, (3, 4)), {"top_k": 0}, "top_k"),
        ((2, (3, 4)), {"top_k": NUM_CODES + 1}, "top_k"),
        ((2, (3, 4)), {"method": "beam"}, "method"),
        ((2, (3, 4)), {"generator": 42}, "generator must be a torch.Generator"),
        ((2, (3, 4), torch.tensor([0, 1])), {}, "without conditioning"),
    ],
)
def test_sample_rejects_bad_arguments(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _model("gated").sample(*args, **kwargs)


def test_bad_codes_and_conditions_name_the_shape():
    with pytest.raises(ValueError, match=r"codes must be an int64 \[B, H, W\].*\(2, 4\)"):
        _model("gated")(torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"class labels of shape \(2,\), got \(3,\)"):
        _model("pixelcnn", "class")(_codes(2), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"code map \[2, H_cond, W_cond\], got \(2, 3\)"):
        _model("gated", "map")(_codes(2), torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="not both"):
        GatedPixelCNN(4, num_classes=2, cond_num_codes=3)
    with pytest.raises(ValueError, match="first_kernel_size"):
        PixelCNN(4, first_kernel_size=4)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind, cond", [("pixelcnn", "class"), ("gated", "map")])
def test_trains_under_compile_fullgraph_like_eager(kind, cond):
    model = _model(kind, cond, num_layers=2, channels=8)
    model.train()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    optimizers = [torch.optim.Adam(net.parameters(), lr=1e-2) for net in (eager, model)]
    losses = {"eager": [], "compiled": []}
    codes, condition = _codes(4), _cond(cond, 4)
    for _ in range(4):
        for name, net, optimizer in (("eager", eager, optimizers[0]), ("compiled", compiled, optimizers[1])):
            loss = F.cross_entropy(net(codes, condition), codes)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=1e-4, atol=1e-5)
    assert losses["compiled"][-1] < losses["compiled"][0]
    for (name, trained), reference_param in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(trained, reference_param, rtol=1e-4, atol=1e-5,
                                   msg=lambda message, name=name: f"{name}: {message}")
