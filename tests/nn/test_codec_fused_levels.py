"""The audio codec drop-ins (audiocraft, EnCodec, Moshi) run all their residual levels in one
``fastvq.residual_quantize`` call wherever that gives the per-level loop's numbers: eval, encode, and
training once every level is initialised. Checked by counting the calls and against the loop itself
(the drop-ins' own tests compare both paths against the original libraries)."""

import copy

import pytest
import torch

from fastvq.nn import audiocraft, encodec, moshi

LEVELS, DIM, BINS, FRAME_RATE = 32, 8, 16, 50
TRAIN_TOLERANCE = dict(rtol=1e-5, atol=1e-6)  # the op and segment_reduce both sum the statistics in float32


def _audiocraft():
    return audiocraft.ResidualVectorQuantizer(dimension=DIM, n_q=LEVELS, bins=BINS, kmeans_init=False)


def _encodec():
    return encodec.ResidualVectorQuantizer(dimension=DIM, n_q=LEVELS, bins=BINS, kmeans_init=False)


def _moshi():
    quantizer = moshi.ResidualVectorQuantizer(dimension=DIM, n_q=LEVELS, bins=BINS)
    # Initialised levels (as after k-means), some codes dead, checked on every step.
    state = quantizer.state_dict()
    for key in state:
        if key.endswith("_initialized"):
            state[key] = torch.ones_like(state[key])
        if key.endswith("embedding_sum"):
            state[key] = torch.randn_like(state[key])
        if key.endswith("cluster_usage"):  # every fourth code under the usage threshold: replaced at once
            state[key] = torch.where(torch.arange(BINS) % 4 == 0, 0.01, 1.0)
    quantizer.load_state_dict(state)
    for layer in quantizer.vq.layers:
        layer._codebook.check_unused_every = layer._codebook._next_unused_check = 1
    return quantizer


BUILDERS = {"audiocraft": (_audiocraft, audiocraft), "encodec": (_encodec, audiocraft), "moshi": (_moshi, moshi)}


def _count_calls(monkeypatch, module, names):
    calls = dict.fromkeys(names, 0)
    for name in names:
        def counted(*args, _name=name, _original=getattr(module, name), **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    return calls


def _codes(result):
    return result.codes


def _quantized(result):
    return result.x if hasattr(result, "x") else result.quantized


def _batch(seed, dtype=torch.float32):
    return torch.randn(2, DIM, 30, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2


@pytest.mark.parametrize("library", sorted(BUILDERS))
def test_eval_forward_and_encode_make_one_fused_call(monkeypatch, library):
    build, module = BUILDERS[library]
    torch.manual_seed(0)
    quantizer = build().eval()
    looped = copy.deepcopy(quantizer)
    x = _batch(1)
    expected = looped(x, FRAME_RATE)
    calls = _count_calls(monkeypatch, module, ["residual_quantize", "nearest_code"])
    got = quantizer(x, FRAME_RATE)
    assert calls == {"residual_quantize": 1, "nearest_code": 0}
    codes = quantizer.encode(x) if library != "encodec" else quantizer.encode(x, FRAME_RATE)
    assert calls == {"residual_quantize": 2, "nearest_code": 0}
    assert codes.shape[:2] == ((LEVELS, 2) if library == "encodec" else (2, LEVELS))
    torch.testing.assert_close(codes, _codes(got), rtol=0, atol=0)
    # Bit for bit the per-level loop's numbers (the loop forced by refusing the fused path).
    monkeypatch.setattr(module, "_can_fuse", lambda *args: False)
    expected = looped(x, FRAME_RATE)
    torch.testing.assert_close(_codes(got), _codes(expected), rtol=0, atol=0)
    torch.testing.assert_close(_quantized(got), _quantized(expected), rtol=0, atol=0)
    torch.testing.assert_close(got.penalty, expected.penalty, rtol=0, atol=0)


def _train_step(quantizer, x, upstream, seed):
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    result = quantizer(x, FRAME_RATE)
    ((_quantized(result) * upstream).sum() + result.penalty).backward()
    return result, x.grad


@pytest.mark.parametrize("library", sorted(BUILDERS))
def test_training_with_initialised_levels_is_one_fused_call_and_matches_the_loop(monkeypatch, library):
    build, module = BUILDERS[library]
    torch.manual_seed(0)
    fused = build().double().train()
    looped = copy.deepcopy(fused)
    steps = [(_batch(10 + step, torch.float64), _batch(20 + step, torch.float64)) for step in range(3)]
    per_level_ops = ["nearest_code", "segment_reduce"] + (["vector_quantize"] if module is audiocraft else [])
    calls = _count_calls(monkeypatch, module, ["residual_quantize", *per_level_ops])
    fused_results = [_train_step(fused, x, upstream, seed) for seed, (x, upstream) in enumerate(steps)]
    assert calls == dict({"residual_quantize": len(steps)}, **dict.fromkeys(per_level_ops, 0))
    monkeypatch.setattr(module, "_can_fuse", lambda *args: False)
    looped_results = [_train_step(looped, x, upstream, seed) for seed, (x, upstream) in enumerate(steps)]
    assert calls["residual_quantize"] == len(steps) and calls["segment_reduce"] > 0
    for (got, got_grad), (expected, expected_grad) in zip(fused_results, looped_results):
        torch.testing.assert_close(_codes(got), _codes(expected), rtol=0, atol=0)
        torch.testing.assert_close(_quantized(got), _quantized(expected), **TRAIN_TOLERANCE)
        torch.testing.assert_close(got.penalty, expected.penalty, **TRAIN_TOLERANCE)
        torch.testing.assert_close(got_grad, expected_grad, **TRAIN_TOLERANCE)
        assert sorted(got.metrics) == sorted(expected.metrics)
        for key, value in expected.metrics.items():
            torch.testing.assert_close(got.metrics[key], value, **TRAIN_TOLERANCE, msg=key)
    expected_state = looped.state_dict()
    for key, value in fused.state_dict().items():
        torch.testing.assert_close(value, expected_state[key], **TRAIN_TOLERANCE, msg=key)


@pytest.mark.parametrize("library", sorted(BUILDERS))
def test_half_precision_keeps_the_per_level_loop(monkeypatch, library):
    """The op carries a bfloat16 residual in float32 from level to level, the loop (and the libraries) round
    it at every level: different codes, so half precision keeps the loop."""
    build, module = BUILDERS[library]
    torch.manual_seed(0)
    quantizer = build().to(torch.bfloat16).eval()
    calls = _count_calls(monkeypatch, module, ["residual_quantize"])
    quantizer(_batch(1, torch.bfloat16), FRAME_RATE)
    assert calls == {"residual_quantize": 0}
