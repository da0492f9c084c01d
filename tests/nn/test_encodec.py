"""fastvq.nn.encodec against the EnCodec package's own quantization modules (loaded from the installed files)."""


import functools

import pytest
import torch
from _codec_setup import TRAINING_TOLERANCE, assert_same_state, seeded_batch, seeded_pair
from _originals import encodec_vq

from fastvq.nn import encodec as ours_module

DIM, BINS, LEVELS, FRAME_RATE = 6, 16, 4, 75


original = encodec_vq


def pair(**kwargs):
    config = dict(dict(dimension=DIM, n_q=LEVELS, bins=BINS), **kwargs)
    return seeded_pair(original().ResidualVectorQuantizer, ours_module.ResidualVectorQuantizer, **config)


batch = functools.partial(seeded_batch, shape=(2, DIM, 40))


def step(module, x, upstream, bandwidth, seed):
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    result = module(x, FRAME_RATE, bandwidth)
    ((result.quantized * upstream).sum() + result.penalty).backward()
    return result, x.grad


def test_state_dict_keys_and_strict_load_both_ways():
    theirs, ours = pair(kmeans_init=False)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert_same_state(theirs, ours, rtol=0, atol=0)
    theirs.train()(batch(1), FRAME_RATE)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert_same_state(theirs, ours, rtol=0, atol=0)
    ours.train()(batch(2), FRAME_RATE)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert_same_state(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("bandwidth", [None, 0.0, 1.5, 2.9, 3.0, 100.0])
def test_eval_matches_codes_outputs_and_bandwidth_arithmetic(bandwidth):
    theirs, ours = pair(kmeans_init=False)
    theirs.eval(), ours.eval()
    x = batch(3)
    for rate in (FRAME_RATE, 50, 12.5):
        assert ours.get_bandwidth_per_quantizer(rate) == theirs.get_bandwidth_per_quantizer(rate)
        assert ours.get_num_quantizers_for_bandwidth(rate, bandwidth) == \
            theirs.get_num_quantizers_for_bandwidth(rate, bandwidth)
    expected, got = theirs(x, FRAME_RATE, bandwidth), ours(x, FRAME_RATE, bandwidth)
    assert torch.equal(got.codes, expected.codes) and got.codes.shape[1:] == (2, 40)
    torch.testing.assert_close(got.quantized, expected.quantized, rtol=0, atol=0)
    torch.testing.assert_close(got.bandwidth, expected.bandwidth, rtol=0, atol=0)
    torch.testing.assert_close(got.penalty, expected.penalty, rtol=0, atol=0)
    codes = theirs.encode(x, FRAME_RATE, bandwidth)
    assert torch.equal(ours.encode(x, FRAME_RATE, bandwidth), codes)
    torch.testing.assert_close(ours.decode(codes), theirs.decode(codes), rtol=0, atol=0)


def test_training_parity_gradients_and_buffers():
    """parity=True: EnCodec's undetached residual (only level 0's gradient reaches the input), its
    k-means initialisation and dead-code expiry, step after step."""
    dtype = torch.float64
    theirs, ours = pair(dtype=dtype, kmeans_init=True, kmeans_iters=4, decay=0.9, threshold_ema_dead_code=3, n_q=3)
    theirs.train(), ours.train()
    expired = 0
    for index, bandwidth in enumerate([None, 1.0, None, 2.0, None]):
        x, upstream = batch(10 + index, dtype), batch(20 + index, dtype)
        if index:
            expired += sum(int((layer._codebook.cluster_size < 3).sum()) for layer in theirs.vq.layers)
        expected, expected_grad = step(theirs, x, upstream, bandwidth, seed=index)
        got, got_grad = step(ours, x, upstream, bandwidth, seed=index)
        assert torch.equal(got.codes, expected.codes), index
        torch.testing.assert_close(got.quantized, expected.quantized, **TRAINING_TOLERANCE)
        torch.testing.assert_close(got_grad, expected_grad, **TRAINING_TOLERANCE)
        torch.testing.assert_close(got.penalty, expected.penalty, **TRAINING_TOLERANCE)
        torch.testing.assert_close(got.bandwidth, expected.bandwidth, rtol=0, atol=0)
        assert_same_state(theirs, ours, **TRAINING_TOLERANCE)
    assert expired > 0, "the test must exercise dead-code expiry"


def test_straight_through_variant_is_encodec_not_audiocraft():
    """In EnCodec only level 0's commitment loss reaches the input (the undetached residual cancels the
    others' gradients); audiocraft's detached levels let every level's reach it."""
    from fastvq.nn import audiocraft

    torch.manual_seed(0)
    ours = ours_module.ResidualVectorQuantizer(dimension=DIM, n_q=3, bins=BINS, kmeans_init=False).train()
    other = audiocraft.ResidualVectorQuantizer(dimension=DIM, n_q=3, bins=BINS, kmeans_init=False).train()
    other.load_state_dict(ours.state_dict())
    level_zero = ours.vq.layers[0]._codebook.embed.clone()  # the codes searched, before the EMA step
    x = batch(5).requires_grad_()
    result = ours(x, FRAME_RATE)
    (result.penalty * 3).backward()  # the sum of the three levels' commitment losses
    rows = x.detach().transpose(1, 2).reshape(-1, DIM)
    codes = level_zero[result.codes[0].reshape(-1)]
    expected = (2 * (rows - codes) / rows.numel()).reshape(2, 40, DIM).transpose(1, 2)
    torch.testing.assert_close(x.grad, expected)
    x_other = batch(5).requires_grad_()
    (other(x_other, FRAME_RATE).penalty * 3).backward()
    assert not torch.allclose(x_other.grad, x.grad)


def test_from_original_gives_the_same_codes():
    theirs, _ = pair(kmeans_init=True, kmeans_iters=3)
    theirs.train()(batch(6), FRAME_RATE)
    theirs.eval()
    swapped = ours_module.ResidualVectorQuantizer.from_original(theirs)
    assert not swapped.training
    x = batch(7)
    assert torch.equal(swapped(x, FRAME_RATE, 2.0).codes, theirs(x, FRAME_RATE, 2.0).codes)
    assert_same_state(theirs, swapped, rtol=0, atol=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="bins"):
        ours_module.ResidualVectorQuantizer(bins=0)
    with pytest.raises(ValueError, match="n_q"):
        ours_module.ResidualVectorQuantizer(n_q=0)
    with pytest.raises(ValueError, match="kmeans_iters"):
        ours_module.ResidualVectorQuantizer(kmeans_iters=0)
    quantizer = ours_module.ResidualVectorQuantizer(dimension=DIM, n_q=2, bins=BINS, kmeans_init=False)
    with pytest.raises(ValueError, match="sample_rate"):
        quantizer(batch(0), 0)
    with pytest.raises(ValueError, match=r"\[B, D, T\]"):
        quantizer(torch.randn(2, DIM + 1, 4), FRAME_RATE)
    with pytest.raises(ValueError, match=r"\[K, B, T\]"):
        quantizer.decode(torch.zeros(3, 2, 4, dtype=torch.int64))
