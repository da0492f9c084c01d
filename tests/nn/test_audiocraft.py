"""fastvq.nn.audiocraft against audiocraft's own quantization modules (loaded from the installed files)."""

import copy
import functools
import sys
import time

import pytest
import torch
from _codec_setup import TRAINING_TOLERANCE, assert_same_state, seeded_batch, seeded_pair
from _originals import audiocraft_vq
from torch import nn

from fastvq.nn import audiocraft as ours_module

DIM, BINS, LEVELS, FRAME_RATE = 6, 12, 3, 50


original = audiocraft_vq


def pair(**kwargs):
    """The original and fastvq's quantizer built from the same seed (the same random initial codes)."""
    config = dict(dict(dimension=DIM, n_q=LEVELS, bins=BINS), **kwargs)
    return seeded_pair(original().ResidualVectorQuantizer, ours_module.ResidualVectorQuantizer, **config)


batch = functools.partial(seeded_batch, shape=(2, DIM, 25))


def step(module, x, upstream, seed):
    """One training forward and backward from RNG state ``seed``: result and the input's gradient."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    result = module(x, FRAME_RATE)
    ((result.x * upstream).sum() + result.penalty).backward()
    return result, x.grad


def test_state_dict_keys_and_strict_load_both_ways():
    theirs, ours = pair(kmeans_init=False)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert "vq.layers.2._codebook.embed_avg" in ours.state_dict()
    assert_same_state(theirs, ours, rtol=0, atol=0)  # the same seed draws the same kaiming codes
    theirs_trained = copy.deepcopy(theirs).train()
    theirs_trained(batch(1), FRAME_RATE)
    ours.load_state_dict(theirs_trained.state_dict(), strict=True)
    assert_same_state(theirs_trained, ours, rtol=0, atol=0)
    ours.train()(batch(2), FRAME_RATE)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert_same_state(ours, theirs, rtol=0, atol=0)


def test_eval_matches_codes_outputs_penalty_bandwidth():
    theirs, ours = pair(kmeans_init=False)
    theirs.eval(), ours.eval()
    x = batch(3)
    for n_q in (LEVELS, 2):
        theirs.set_num_codebooks(n_q)
        ours.set_num_codebooks(n_q)
        expected, got = theirs(x, FRAME_RATE), ours(x, FRAME_RATE)
        assert torch.equal(got.codes, expected.codes) and got.codes.shape == (2, n_q, 25)
        torch.testing.assert_close(got.x, expected.x, rtol=0, atol=0)
        torch.testing.assert_close(got.bandwidth, expected.bandwidth, rtol=0, atol=0)
        torch.testing.assert_close(got.penalty, expected.penalty, rtol=0, atol=0)
        assert got.metrics == expected.metrics == {}
        assert torch.equal(ours.encode(x), theirs.encode(x))
        codes = theirs.encode(x)
        torch.testing.assert_close(ours.decode(codes), theirs.decode(codes), rtol=0, atol=0)
        assert (ours.total_codebooks, ours.num_codebooks) == (theirs.total_codebooks, theirs.num_codebooks)


@pytest.mark.parametrize("orthogonal", [{}, dict(orthogonal_reg_weight=0.5, orthogonal_reg_active_codes_only=True,
                                                 orthogonal_reg_max_codes=4)], ids=["plain", "orthogonal"])
def test_training_parity_kmeans_dead_codes_gradients_buffers(orthogonal):
    """parity=True: the same codes, outputs, penalties, input gradients and buffers over several
    steps that include the k-means initialisation, dead-code expiry and quantizer dropout."""
    dtype = torch.float64
    theirs, ours = pair(dtype=dtype, kmeans_init=True, kmeans_iters=4, q_dropout=True, decay=0.9,
                        threshold_ema_dead_code=3, **orthogonal)
    theirs.train(), ours.train()
    expired = 0
    for index in range(5):
        x, upstream = batch(10 + index, dtype, shape=(2, DIM, 40)), batch(20 + index, dtype, shape=(2, DIM, 40))
        if index:  # (before the first step every code is uninitialised, cluster size 0)
            expired += sum(int((layer._codebook.cluster_size < 3).sum()) for layer in theirs.vq.layers)
        expected, expected_grad = step(theirs, x, upstream, seed=index)
        got, got_grad = step(ours, x, upstream, seed=index)
        assert torch.equal(got.codes, expected.codes), index
        torch.testing.assert_close(got.x, expected.x, **TRAINING_TOLERANCE)
        torch.testing.assert_close(got_grad, expected_grad, **TRAINING_TOLERANCE)
        torch.testing.assert_close(got.penalty, expected.penalty, **TRAINING_TOLERANCE)
        torch.testing.assert_close(got.bandwidth, expected.bandwidth, rtol=0, atol=0)
        assert_same_state(theirs, ours, **TRAINING_TOLERANCE)
    assert expired > 0, "the test must exercise dead-code expiry"


def test_default_mode_dead_codes_stay_replaced():
    """audiocraft's replacement is undone by the same step's EMA; fastvq's replaced codes are rows of the batch."""
    theirs, ours = pair(parity=False, kmeans_init=False, n_q=1)
    ours.load_state_dict(theirs.state_dict())
    for module in (theirs, ours):
        module.vq.layers[0]._codebook.cluster_size.fill_(5.0)
        module.vq.layers[0]._codebook.cluster_size[:4] = 0.0
        module.train()
    x = batch(4)
    torch.manual_seed(0)
    theirs(x, FRAME_RATE)
    torch.manual_seed(0)
    ours(x, FRAME_RATE)
    rows = x.transpose(1, 2).reshape(-1, DIM)

    def gap_to_batch(module):
        codes = module.vq.layers[0]._codebook.embed[:4]
        return (codes[:, None] - rows[None]).norm(dim=-1).min(dim=1).values

    assert torch.all(gap_to_batch(ours) < 1e-5)
    assert torch.all(gap_to_batch(theirs) > 1e-2)


def test_default_mode_kmeans_statistics_keep_the_codes_scale():
    """audiocraft's k-means leaves embed_avg at the centroids while cluster_size holds the counts, so
    its first EMA step divides each code by its count; fastvq's codes stay at the data's scale."""
    theirs, ours = pair(parity=False, kmeans_init=True, kmeans_iters=3, n_q=1, threshold_ema_dead_code=0)
    theirs.train(), ours.train()
    x = batch(5, shape=(4, DIM, 30))
    torch.manual_seed(0)
    theirs(x, FRAME_RATE)
    torch.manual_seed(0)
    ours(x, FRAME_RATE)
    codebook = ours.vq.layers[0]._codebook
    scale = x.norm(dim=1).mean()
    used = codebook.cluster_size > 1
    assert codebook.embed[used].norm(dim=1).mean() > 0.5 * scale
    assert theirs.vq.layers[0]._codebook.embed[used].norm(dim=1).mean() < 0.5 * scale


def test_from_original_gives_the_same_codes():
    theirs, _ = pair(kmeans_init=True, kmeans_iters=3, dtype=torch.float64)
    theirs.train()(batch(6, torch.float64), FRAME_RATE)
    theirs.set_num_codebooks(2)
    theirs.eval()
    swapped = ours_module.ResidualVectorQuantizer.from_original(theirs)
    assert not swapped.training and swapped.num_codebooks == 2 and swapped.total_codebooks == LEVELS
    assert swapped.vq.layers[0]._codebook.embed.dtype == torch.float64
    x = batch(7, torch.float64)
    assert torch.equal(swapped(x, FRAME_RATE).codes, theirs(x, FRAME_RATE).codes)
    assert_same_state(theirs, swapped, rtol=0, atol=0)


def test_vector_quantization_level_and_channels_last():
    torch.manual_seed(0)
    core_vq = sys.modules[original().ResidualVectorQuantization.__module__]
    theirs = core_vq.VectorQuantization(DIM, BINS, channels_last=True).eval()
    ours = ours_module.VectorQuantization(DIM, BINS, channels_last=True).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = batch(8).transpose(1, 2)
    for got, expected in zip(ours(x), theirs(x)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert torch.equal(ours.encode(x), theirs.encode(x))


class _Codec(nn.Module):
    """An encoder (so that there is a parameter to train) and the quantizer; the loss as output."""

    def __init__(self, quantizer):
        super().__init__()
        self.encoder = nn.Conv1d(DIM, DIM, 1)
        self.quantizer = quantizer

    def forward(self, x):
        result = self.quantizer(self.encoder(x), FRAME_RATE)
        return (result.x**2).mean() + result.penalty


def test_training_compiles_without_graph_breaks():
    """The default mode's training step (EMA, dead codes replaced every step here: the codes start with
    cluster size 0) traced by torch.compile(fullgraph=True): no graph break, no host synchronisation.
    aot_eager traces the forward and the backward without inductor's code generation (tests/nn's other
    compile tests run inductor on the same ops)."""
    torch.manual_seed(0)
    quantizer = ours_module.ResidualVectorQuantizer(dimension=DIM, n_q=2, bins=BINS, kmeans_init=False)
    model = _Codec(quantizer).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        compiled(batch(40)).backward()
    assert model.encoder.weight.grad is not None
    assert torch.all(quantizer.vq.layers[0]._codebook.cluster_size >= 1.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="bins"):
        ours_module.ResidualVectorQuantizer(bins=0)
    with pytest.raises(ValueError, match="decay"):
        ours_module.ResidualVectorQuantizer(decay=1.5)
    with pytest.raises(ValueError, match="threshold_ema_dead_code"):
        ours_module.ResidualVectorQuantizer(threshold_ema_dead_code=-1)
    with pytest.raises(ValueError, match="orthogonal_reg_max_codes"):
        ours_module.ResidualVectorQuantizer(orthogonal_reg_max_codes=0)
    quantizer = ours_module.ResidualVectorQuantizer(dimension=DIM, n_q=2, bins=BINS, kmeans_init=False)
    with pytest.raises(AssertionError):
        quantizer.set_num_codebooks(3)
    with pytest.raises(ValueError, match=r"\[B, D, T\]"):
        quantizer(torch.randn(2, DIM + 1, 4), FRAME_RATE)
    with pytest.raises(TypeError, match="floating-point"):
        quantizer(torch.ones(2, DIM, 4, dtype=torch.int64), FRAME_RATE)
    with pytest.raises(TypeError, match="int64"):
        quantizer.decode(torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match="lie in"):
        quantizer.decode(torch.full((2, 2, 4), BINS))


def test_distributed_statistics_are_summed_over_ranks(tmp_path):
    """Two gloo ranks on halves of a batch: by default each level's EMA statistics are summed over the
    ranks (the codebooks are the one-process codebooks of the whole batch, k-means and dead codes drawn
    the same on both ranks, q_dropout's draw too); with parity=True, as in audiocraft, each rank trains
    on its own half."""
    import torch.multiprocessing as mp
    from _audiocraft_ranks import run_rank, whole_batch

    ranks = mp.spawn(run_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 180
    while not ranks.join(timeout=2):
        if time.monotonic() > deadline:  # ranks running different levels would wait on each other for ever
            for process in ranks.processes:
                process.kill()
            pytest.fail("the two ranks did not finish within 180 s: unmatched collectives")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    torch.manual_seed(0)
    single = ours_module.ResidualVectorQuantizer(dimension=DIM, n_q=2, bins=BINS, kmeans_init=False,
                                                 threshold_ema_dead_code=0).train()
    for _ in range(3):
        single(whole_batch(), FRAME_RATE)
    for key, value in single.state_dict().items():
        torch.testing.assert_close(ranks[0]["default"][key], value, msg=key)
        torch.testing.assert_close(ranks[1]["default"][key], value, msg=key)
        torch.testing.assert_close(ranks[1]["kmeans"][key], ranks[0]["kmeans"][key], rtol=0, atol=0, msg=key)
    for key, value in ranks[0]["dropout"].items():  # q_dropout: rank 0's number of levels on both ranks
        torch.testing.assert_close(ranks[1]["dropout"][key], value, rtol=0, atol=0, msg=key)
    embed = "vq.layers.0._codebook.embed"
    assert not torch.allclose(ranks[0]["parity"][embed], ranks[1]["parity"][embed])


def test_codebook_on_its_own_matches_training_steps():
    """EuclideanCodebook.forward (k-means initialisation, EMA, dead codes) under parity=True."""
    dtype = torch.float64
    config = dict(dim=DIM, codebook_size=BINS, kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=3)
    theirs = sys.modules[original().ResidualVectorQuantization.__module__].EuclideanCodebook(**config)
    ours = ours_module.EuclideanCodebook(**config, parity=True)
    theirs.to(dtype).train(), ours.to(dtype).train()
    for index in range(3):
        x = batch(40 + index, dtype).transpose(1, 2)
        torch.manual_seed(index)
        expected = theirs(x)
        torch.manual_seed(index)
        got = ours(x)
        assert torch.equal(got[1], expected[1])
        torch.testing.assert_close(got[0], expected[0], **TRAINING_TOLERANCE)
        assert_same_state(theirs, ours, **TRAINING_TOLERANCE)
