"""fastvq.nn.moshi against Moshi's own ``moshi.quantization`` (loaded from its installed files).

Training is compared in float64 over several steps that cover the k-means initialisation of every
level (one level per step, as Moshi cascades it), dead-code expiry, quantizer dropout and the
no-quantization mask, with PyTorch's RNG seeded alike before each step.
"""

import copy
import sys

import pytest
import torch
from _originals import load_original

from fastvq.nn import moshi as ours_module

vq = load_original("moshi.quantization.vq")
core_vq = sys.modules[vq.ResidualVectorQuantization.__module__]  # loaded by vq's relative import

DIM, IN_DIM, OUT_DIM, BINS, LEVELS, FRAME_RATE = 8, 6, 5, 16, 3, 12.5


def _expire_often(quantizer, every=2):
    """Both libraries check for dead codes every 5 steps; every 2 keeps the test short."""
    for layer in quantizer.modules():
        if hasattr(layer, "check_unused_every"):
            layer.check_unused_every = layer._next_unused_check = every


def _pair(klass, **kwargs):
    torch.manual_seed(0)
    theirs = getattr(vq, klass)(**kwargs).double()
    _expire_often(theirs)
    return theirs, getattr(ours_module, klass).from_original(copy.deepcopy(theirs))


def _buffers(module):
    return {name: buffer.detach().clone() for name, buffer in module.named_buffers()}


def _step(module, x, seed):
    torch.manual_seed(seed)
    x = x.clone().requires_grad_()
    module.zero_grad()
    result = module(x, FRAME_RATE)
    upstream = torch.linspace(-1, 1, result.x.numel(), dtype=x.dtype).view_as(result.x)
    ((result.x * upstream).sum() + 3 * result.penalty).backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return result, x.grad, grads


def _codebooks(module):
    return [layer for layer in module.modules() if hasattr(layer, "check_unused_every")]


def _assert_same_result(theirs, mine, initialized=None, **tolerance):
    """``initialized``: per level, whether its codes mean anything. A level that no batch initialised yet
    runs on codes that are zero up to rounding noise (its k-means predecessor's residuals sum to ~0), so
    its search is a tie decided by that noise, and so are its codes and its (discarded) statistics."""
    assert theirs.codes.shape == mine.codes.shape
    levels = range(theirs.codes.shape[1])
    meaningful = [level for level in levels if initialized is None or initialized[level]]
    assert torch.equal(theirs.codes[:, meaningful], mine.codes[:, meaningful])
    torch.testing.assert_close(mine.x, theirs.x, **tolerance)
    torch.testing.assert_close(mine.bandwidth, theirs.bandwidth)
    torch.testing.assert_close(mine.penalty, theirs.penalty, **tolerance)
    assert mine.metrics.keys() == theirs.metrics.keys()
    for key in theirs.metrics:
        torch.testing.assert_close(mine.metrics[key], theirs.metrics[key], **tolerance, msg=key)


RVQ_CONFIGS = {
    "projected": dict(dimension=DIM, input_dimension=IN_DIM, output_dimension=OUT_DIM, n_q=LEVELS, bins=BINS,
                      q_dropout=True, no_quantization_rate=0.4, threshold_usage_ratio=0.6, decay=0.8),
    "plain": dict(dimension=DIM, n_q=LEVELS, bins=BINS, threshold_usage_ratio=0.9, replaced_usage_ratio=2.0),
}
SPLIT_CONFIG = dict(n_q=4, n_q_semantic=1, dimension=DIM, input_dimension=IN_DIM, output_dimension=OUT_DIM,
                    bins=BINS, q_dropout=True, threshold_usage_ratio=0.6, decay=0.9)
TRAIN_TOLERANCE = dict(rtol=1e-5, atol=1e-6)  # fastvq sums the EMA statistics in float32


@pytest.mark.parametrize("klass, config, frames", [
    ("ResidualVectorQuantizer", RVQ_CONFIGS["projected"], 11),
    ("ResidualVectorQuantizer", RVQ_CONFIGS["plain"], 11),
    ("SplitResidualVectorQuantizer", SPLIT_CONFIG, 11),
], ids=["rvq-projected", "rvq-plain", "split"])
def test_training_matches_moshi(klass, config, frames):
    theirs, mine = _pair(klass, **config)
    channels = config.get("input_dimension", DIM)
    expired = 0.0
    for step in range(7):
        x = torch.randn(2, channels, frames, dtype=torch.float64) * (1 + step)
        result_theirs, grad_theirs, params_theirs = _step(theirs, x, seed=step)
        result_mine, grad_mine, params_mine = _step(mine, x, seed=step)
        initialized = [codebook.initialized for codebook in _codebooks(theirs)]
        assert initialized == [codebook.initialized for codebook in _codebooks(mine)]
        if klass.startswith("Split"):  # the acoustic levels in use follow the semantic ones
            used = result_theirs.codes.shape[1]
            initialized = initialized[:1] + initialized[config["n_q_semantic"]:][: used - 1]
        _assert_same_result(result_theirs, result_mine, initialized, **TRAIN_TOLERANCE)
        torch.testing.assert_close(grad_mine, grad_theirs, **TRAIN_TOLERANCE)
        assert params_mine.keys() == params_theirs.keys()
        for name in params_theirs:
            torch.testing.assert_close(params_mine[name], params_theirs[name], **TRAIN_TOLERANCE, msg=name)
        for codebook_theirs, codebook_mine in zip(_codebooks(theirs), _codebooks(mine)):
            if codebook_theirs.initialized:  # the statistics of an uninitialised level are overwritten by k-means
                buffers_theirs, buffers_mine = _buffers(codebook_theirs), _buffers(codebook_mine)
                for name in ("_initialized", "cluster_usage", "embedding_sum"):
                    torch.testing.assert_close(buffers_mine[name], buffers_theirs[name], **TRAIN_TOLERANCE, msg=name)
        expired += float(result_theirs.metrics["rvq_expired"])
    assert expired > 0, "the steps must replace dead codes"
    assert sum(codebook.initialized for codebook in _codebooks(mine)) >= 3, "the steps must initialise levels"


@pytest.mark.parametrize("rows", [40, 6], ids=["randperm", "randint"])
def test_kmeans_initialisation_matches_moshi(rows):
    """With fewer rows than codes both draw with replacement, and duplicate centroids tie exactly: the
    rows are multiples of 1/4, whose float32 segment sums are exact, so the tie-breaking is compared too."""
    x = torch.randint(-8, 8, (rows, DIM)).double() / 4
    torch.manual_seed(1)
    means_theirs, bins_theirs = core_vq._run_kmeans(x, BINS)
    torch.manual_seed(1)
    means_mine, bins_mine = ours_module._kmeans(x, BINS)
    assert torch.equal(means_mine, means_theirs)
    assert torch.equal(bins_mine.long(), bins_theirs)


def _trained_pair(klass, config, frames=11):
    """Moshi trained until every level is initialised (a level left on its all-zero codes has only ties)."""
    theirs, _ = _pair(klass, **config)
    codebooks = [module for module in theirs.modules() if hasattr(module, "check_unused_every")]
    step = 0
    while not all(codebook.initialized for codebook in codebooks):
        _step(theirs, torch.randn(2, config.get("input_dimension", DIM), frames, dtype=torch.float64), step)
        step += 1
    theirs.eval()
    return theirs, getattr(ours_module, klass).from_original(theirs)  # eval only: sharing tensors is fine


@pytest.mark.parametrize("klass, config", [
    ("ResidualVectorQuantizer", RVQ_CONFIGS["projected"]),
    ("SplitResidualVectorQuantizer", SPLIT_CONFIG),
], ids=["rvq", "split"])
def test_eval_encode_decode_forward_match_moshi(klass, config):
    theirs, mine = _trained_pair(klass, config)
    assert not mine.training
    x = torch.randn(3, config["input_dimension"], 9, dtype=torch.float64)
    codes = theirs.encode(x)
    assert torch.equal(mine.encode(x), codes)
    torch.testing.assert_close(mine.decode(codes), theirs.decode(codes))
    torch.testing.assert_close(mine.decode(codes[:, :2]), theirs.decode(codes[:, :2]))
    _assert_same_result(theirs(x, FRAME_RATE), mine(x, FRAME_RATE))
    theirs.set_num_codebooks(2)
    mine.set_num_codebooks(2)
    assert mine.num_codebooks == theirs.num_codebooks == 2
    assert torch.equal(mine.encode(x), theirs.encode(x))
    _assert_same_result(theirs(x, FRAME_RATE), mine(x, FRAME_RATE))
    assert mine.encode(x[..., :0]).shape == theirs.encode(x[..., :0]).shape
    for name in ("total_codebooks", "cardinality", "dimension"):
        assert getattr(mine, name) == getattr(theirs, name)


@pytest.mark.parametrize("klass, config", [
    ("ResidualVectorQuantizer", RVQ_CONFIGS["projected"]),
    ("ResidualVectorQuantizer", dict(dimension=DIM, n_q=2, bins=BINS, force_projection=True)),
    ("SplitResidualVectorQuantizer", SPLIT_CONFIG),
], ids=["rvq", "rvq-forced-projection", "split"])
def test_state_dict_loads_strictly_both_ways(klass, config):
    theirs, _ = _trained_pair(klass, config)
    mine = getattr(ours_module, klass)(**config).double()
    assert mine.state_dict().keys() == theirs.state_dict().keys()
    mine.load_state_dict(theirs.state_dict(), strict=True)
    fresh = getattr(vq, klass)(**config).double().eval()
    fresh.load_state_dict(mine.state_dict(), strict=True)
    mine.eval()
    x = torch.randn(2, config.get("input_dimension", DIM), 7, dtype=torch.float64)
    assert torch.equal(mine.encode(x), theirs.encode(x))
    assert torch.equal(fresh.encode(x), theirs.encode(x))


def test_legacy_buffer_names_load_as_in_moshi():
    theirs, _ = _trained_pair("ResidualVectorQuantizer", RVQ_CONFIGS["projected"])
    renames = {"_initialized": "inited", "cluster_usage": "cluster_size", "embedding_sum": "embed_avg"}
    legacy = {}
    for key, value in theirs.state_dict().items():
        head, _, name = key.rpartition(".")
        legacy[f"{head}.{renames.get(name, name)}" if head else key] = value
    legacy["vq.layers.1._codebook.embed_sum"] = legacy.pop("vq.layers.1._codebook.embed_avg")
    mine = ours_module.ResidualVectorQuantizer(**RVQ_CONFIGS["projected"]).double().eval()
    mine.load_state_dict(copy.copy(legacy), strict=True)
    fresh = vq.ResidualVectorQuantizer(**RVQ_CONFIGS["projected"]).double().eval()
    fresh.load_state_dict(copy.copy(legacy), strict=True)
    assert all(layer.initialized for layer in mine.vq.layers)
    x = torch.randn(2, IN_DIM, 7, dtype=torch.float64)
    assert torch.equal(mine.encode(x), fresh.encode(x))
    assert torch.equal(mine.encode(x), theirs.encode(x))


def test_expired_codes_stay_replaced():
    """Moshi's replacement writes both moving averages, so the same step's EMA keeps the new code."""
    codebook = ours_module.EuclideanCodebook(4, 8, decay=0.9, threshold_usage_ratio=0.5, check_unused_every=1)
    torch.manual_seed(0)
    codebook(torch.randn(64, 4))  # k-means initialisation, then a first check
    with torch.no_grad():
        codebook.cluster_usage[3] = 1e-3  # code 3 is now dead
    far = torch.randn(40, 4) + 100.0  # nothing in this batch lies near the old codes
    codebook(far)
    code = codebook.embedding[3]
    assert torch.cdist(code[None], far).min() < 1e-3 * far.norm(dim=1).max()


def test_codebook_dim_projects_in_forward():
    """Moshi's VectorQuantization.forward skips project_in (and fails); fastvq's uses it."""
    torch.manual_seed(0)
    layer = ours_module.VectorQuantization(dim=6, codebook_size=4, codebook_dim=3)
    x = torch.randn(2, 6, 10)
    quantized, codes, loss, _ = layer(x)
    assert quantized.shape == x.shape and codes.shape == (2, 10) and loss > 0
    assert torch.equal(layer.encode(x), codes)
    with pytest.raises(RuntimeError):
        torch.manual_seed(0)
        core_vq.VectorQuantization(dim=6, codebook_size=4, codebook_dim=3)(x)


@pytest.mark.parametrize("build, message", [
    (lambda: ours_module.ResidualVectorQuantizer(n_q=0), "n_q"),
    (lambda: ours_module.ResidualVectorQuantizer(bins=0), "bins"),
    (lambda: ours_module.ResidualVectorQuantizer(dimension=-2), "dimension"),
    (lambda: ours_module.ResidualVectorQuantizer(no_quantization_rate=1.5), "no_quantization_rate"),
    (lambda: ours_module.ResidualVectorQuantizer(decay=2.0), "decay"),
    (lambda: ours_module.ResidualVectorQuantizer(threshold_usage_ratio=-1.0), "threshold_usage_ratio"),
    (lambda: ours_module.ResidualVectorQuantizer(codebook_offset=-1), "codebook_offset"),
    (lambda: ours_module.SplitResidualVectorQuantizer(n_q=2, n_q_semantic=2), "semantic"),
    (lambda: ours_module.ResidualVectorQuantizer(n_q=2).set_num_codebooks(3), "n must be"),
    (lambda: ours_module.SplitResidualVectorQuantizer(n_q=3).set_num_codebooks(0), "n must be"),
    (lambda: ours_module.ResidualVectorQuantizer(dimension=4)(torch.randn(2, 5, 3), 10), r"\[B, 4, T\]"),
    (lambda: ours_module.ResidualVectorQuantizer(dimension=4, n_q=2).decode(torch.zeros(1, 3, 2).long()), "K <= 2"),
], ids=["n_q", "bins", "dimension", "no_quantization_rate", "decay", "threshold", "offset", "split", "set_rvq",
        "set_split", "channels", "decode-levels"])
def test_bad_arguments_raise_value_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_moshi_assertions_are_caught_as_before():
    with pytest.raises(AssertionError):
        ours_module.SplitResidualVectorQuantizer(n_q=2, n_q_semantic=2)
    with pytest.raises(TypeError, match="codes"):
        ours_module.ResidualVectorQuantizer(dimension=4, n_q=2).decode(torch.zeros(1, 2, 3))
    with pytest.raises(TypeError, match="floating-point"):
        ours_module.ResidualVectorQuantizer(dimension=4, n_q=2).encode(torch.zeros(1, 4, 3, dtype=torch.int64))


def test_statistics_are_averaged_once_per_level_under_torch_distributed(tmp_path):
    """Two gloo ranks: fastvq averages each level's counts and sums in one all-reduce per step and ends with
    Moshi's buffers, on both ranks; parity=True issues Moshi's growing list, L (L + 1) all-reduces per step."""
    import torch.multiprocessing as mp
    from _moshi_ranks import DISTRIBUTED_LEVELS, DISTRIBUTED_STEPS, run_rank

    mp.spawn(run_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    levels = DISTRIBUTED_LEVELS
    for results in ranks:
        calls_theirs, buffers_theirs = results["theirs"]
        assert len(calls_theirs) == DISTRIBUTED_STEPS * levels * (levels + 1)
        assert results["parity"][0] == calls_theirs
        assert results["mine"][0] == [BINS * (DIM + 1)] * (DISTRIBUTED_STEPS * levels)  # [K, 1 + D] per level
        for name in ("mine", "parity"):
            for key, value in buffers_theirs.items():
                torch.testing.assert_close(results[name][1][key], value, **TRAIN_TOLERANCE, msg=f"{name} {key}")
    for key, value in ranks[0]["mine"][1].items():
        assert torch.equal(ranks[1]["mine"][1][key], value), key


def test_training_compiles_without_graph_breaks():
    """After the k-means initialisation (a host decision, eager), training steps, dead-code expiry included,
    run under torch.compile(fullgraph=True) (aot_eager: the graph capture, without inductor's compile time)
    and match eager steps drawn from the same RNG state."""

    class Quantizer(torch.nn.Module):
        def __init__(self, quantizer):
            super().__init__()
            self.quantizer = quantizer

        def forward(self, x):
            return self.quantizer(x, FRAME_RATE)

    torch.manual_seed(0)
    quantizer = ours_module.ResidualVectorQuantizer(dimension=DIM, input_dimension=IN_DIM, n_q=2, bins=BINS,
                                                    threshold_usage_ratio=0.9)
    for _ in range(2):  # every level initialised
        result = quantizer(torch.randn(2, IN_DIM, 9), FRAME_RATE)
        (result.x.sum() + result.penalty).backward()
    for codebook in _codebooks(quantizer):
        codebook._next_unused_check = 1  # expire in the first compiled step
    eager = copy.deepcopy(Quantizer(quantizer))
    compiled = torch.compile(Quantizer(quantizer), fullgraph=True, backend="aot_eager")
    expired = 0.0
    for step in range(2):
        x = torch.randn(2, IN_DIM, 9)
        results = []
        for net in (eager, compiled):
            torch.manual_seed(step)
            result = net(x)
            (result.x.square().mean() + result.penalty).backward()
            results.append(result)
        assert torch.equal(results[0].codes, results[1].codes)
        expired += float(results[1].metrics["rvq_expired"])
    assert expired > 0
    for (key, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(b, a, msg=key)
