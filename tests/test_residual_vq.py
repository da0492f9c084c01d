"""ResidualVQ and GroupedResidualVQ against vector-quantize-pytorch and their own contracts."""

import copy

import pytest
import torch
from vector_quantize_pytorch import GroupedResidualVQ as TheirGroupedResidualVQ
from vector_quantize_pytorch import ResidualVQ as TheirResidualVQ

from fastvq.nn import GroupedResidualVQ, ResidualVQ

CONFIGS = {
    "plain": dict(),
    "shared": dict(shared_codebook=True),
    "projected": dict(codebook_dim=8),
    "sizes": dict(codebook_size=(16, 32, 24)),
    "cosine": dict(use_cosine_sim=True),
    "grad-frac": dict(quant_grad_frac=0.3),
    "rotation": dict(rotation_trick=True),
}


def _arguments(**overrides):
    arguments = dict(dim=16, num_quantizers=3, codebook_size=32, rotation_trick=False)
    arguments.update(overrides)
    if isinstance(arguments["codebook_size"], tuple):
        arguments.pop("num_quantizers")
    return arguments


def _books(rvq):
    books = rvq.codebooks
    return books if isinstance(books, tuple) else tuple(books)


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_training_matches_vector_quantize_pytorch(config):
    arguments = _arguments(**CONFIGS[config])
    torch.manual_seed(0)
    theirs = TheirResidualVQ(**arguments)
    ours = ResidualVQ(**arguments)
    ours.load_state_dict(theirs.state_dict())
    for _ in range(2):
        x = torch.randn(2, 30, 16)
        upstream = torch.randn(2, 30, 16)
        x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
        q_theirs, i_theirs, l_theirs = theirs(x_theirs)
        q_ours, i_ours, l_ours = ours(x_ours)
        ((q_theirs * upstream).sum() + l_theirs.sum()).backward()
        ((q_ours * upstream).sum() + l_ours.sum()).backward()
        assert torch.equal(i_ours, i_theirs)
        torch.testing.assert_close(q_ours, q_theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(l_ours, l_theirs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-4, atol=1e-5)
        for mine, theirs_book in zip(_books(ours), _books(theirs)):
            torch.testing.assert_close(mine, theirs_book, rtol=1e-5, atol=1e-5)


def test_outputs_from_indices_and_all_codes():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=16, num_quantizers=3, codebook_size=32, codebook_dim=8).eval()
    x = torch.randn(2, 9, 16)
    quantized, indices, losses, all_codes = rvq(x, return_all_codes=True)
    assert indices.shape == (2, 9, 3) and losses.shape == (3,) and all_codes.shape == (3, 2, 9, 8)
    torch.testing.assert_close(rvq.get_output_from_indices(indices), quantized, rtol=1e-5, atol=1e-5)


def test_quantize_dropout_drops_a_suffix_of_layers():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, num_quantizers=5, codebook_size=16, quantize_dropout=True, quantize_dropout_cutoff_index=1)
    seen = set()
    for _ in range(30):
        before = [layer._codebook.embed.clone() for layer in rvq.layers]
        _, indices, losses = rvq(torch.randn(2, 6, 8))
        kept = int((indices[0, 0] >= 0).sum())
        seen.add(kept)
        assert kept >= 2, "the cutoff index keeps the first two layers"
        assert (indices[..., :kept] >= 0).all() and (indices[..., kept:] == -1).all()
        assert (losses[kept:] == 0).all() and (losses[:kept] > 0).all()
        for depth, layer in enumerate(rvq.layers):
            moved = not torch.equal(before[depth], layer._codebook.embed)
            assert moved == (depth < kept), f"layer {depth} moved={moved} with {kept} layers kept"
    assert seen == {2, 3, 4, 5}
    rvq.eval()
    _, indices, _ = rvq(torch.randn(2, 6, 8))
    assert (indices >= 0).all(), "no dropout in eval"


def test_dropout_fixed_seed_is_reproducible():
    rvq = ResidualVQ(dim=8, num_quantizers=4, codebook_size=16, quantize_dropout=True)
    first = rvq(torch.randn(1, 3, 8), rand_quantize_dropout_fixed_seed=7)[1]
    second = rvq(torch.randn(1, 3, 8), rand_quantize_dropout_fixed_seed=7)[1]
    assert torch.equal(first < 0, second < 0)


def test_grouped_matches_vector_quantize_pytorch():
    torch.manual_seed(0)
    arguments = dict(dim=16, groups=2, num_quantizers=2, codebook_size=8, rotation_trick=False)
    theirs = TheirGroupedResidualVQ(**arguments)
    ours = GroupedResidualVQ(**arguments)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 5, 16)
    q_theirs, i_theirs, l_theirs = theirs(x)
    q_ours, i_ours, l_ours = ours(x)
    assert torch.equal(i_ours, i_theirs) and i_ours.shape == (2, 2, 5, 2) and l_ours.shape == (2, 2)
    torch.testing.assert_close(q_ours, q_theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l_ours, l_theirs, rtol=1e-5, atol=1e-6)
    ours.eval()
    torch.testing.assert_close(ours.get_output_from_indices(ours(x)[1]), ours(x)[0], rtol=1e-5, atol=1e-5)


def test_image_feature_maps():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, num_quantizers=2, codebook_size=16, accept_image_fmap=True).eval()
    x = torch.randn(2, 8, 3, 5)
    quantized, indices, _ = rvq(x)
    assert quantized.shape == x.shape and indices.shape == (2, 3, 5, 2)
    torch.testing.assert_close(rvq.get_output_from_indices(indices), quantized, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(), dict(quantize_dropout=True, shared_codebook=True, threshold_ema_dead_code=1)])
def test_trains_under_compile_fullgraph(kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), ResidualVQ(dim=16, num_quantizers=3, codebook_size=12, **kwargs))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    for net in (eager, compiled):
        optim = torch.optim.SGD(net.parameters(), lr=0.1)
        for step in range(2):
            torch.manual_seed(step)
            q, _, losses = net(torch.randn(4, 10, 8))
            (q.square().mean() + losses.sum()).backward()
            optim.step()
            optim.zero_grad()
    if not kwargs:
        for mine, reference in zip(model[1].codebooks, eager[1].codebooks):
            torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5)
    assert all(torch.isfinite(book).all() for book in model[1].codebooks)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(heads=2), ValueError, "heads"),
        (dict(num_quantizers=0), ValueError, "num_quantizers"),
        (dict(quantize_dropout_cutoff_index=5), ValueError, "quantize_dropout_cutoff_index"),
        (dict(implicit_neural_codebook=True), NotImplementedError, "implicit_neural_codebook"),
        (dict(beam_size=4), NotImplementedError, "beam_size"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    arguments = dict(dim=8, num_quantizers=2, codebook_size=4)
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        ResidualVQ(**arguments)


def test_kmeans_init_waits_for_a_batch_that_reaches_the_layer():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, num_quantizers=4, codebook_size=6, quantize_dropout=True, kmeans_init=True)
    for _ in range(12):
        _, indices, _ = rvq(torch.randn(2, 10, 8))
        for depth, layer in enumerate(rvq.layers):
            if (indices[..., depth] >= 0).any():
                assert layer._codebook._initted, f"layer {depth} ran without being initialised"
    assert all(layer._codebook._initted for layer in rvq.layers)
    assert all(torch.isfinite(layer.codebook).all() for layer in rvq.layers)
