"""fastvq.nn.dac against descript-audio-codec's own ``dac.nn.quantize`` (loaded from its installed file, with
its ``dac.nn.layers`` for ``WNConv1d``), in float64 so that rounding cannot hide a difference."""

import copy
import warnings

import pytest
import torch
from _originals import load_original

from fastvq.nn import dac as ours_module

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # DAC's torch.nn.utils.weight_norm is deprecated
    quantize = load_original("dac.nn.quantize")

DIM, CODES, LEVELS = 12, 16, 4
CONFIG = dict(input_dim=DIM, n_codebooks=LEVELS, codebook_size=CODES, codebook_dim=[3, 4, 3, 2], quantizer_dropout=0.5)


def _original(**overrides):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return quantize.ResidualVectorQuantize(**{**CONFIG, **overrides}).double()


def _pair(parity=False, **overrides):
    # from_original takes over its original's tensors, so it gets a second, identical original (weight_norm's
    # derived weight cannot be deep-copied)
    return _original(**overrides), ours_module.ResidualVectorQuantize.from_original(_original(**overrides),
                                                                                   parity=parity)


def _run(module, z, seed, *args):
    torch.manual_seed(seed)
    z = z.clone().requires_grad_()
    module.zero_grad()
    z_q, codes, latents, commitment, codebook = module(z, *args)
    upstream = torch.linspace(-1, 1, z_q.numel(), dtype=z.dtype).view_as(z_q)
    ((z_q * upstream).sum() + 0.25 * commitment + codebook).backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return (z_q, codes, latents, commitment, codebook), z.grad, grads


def _assert_same(theirs, mine):
    outputs_theirs, grad_theirs, params_theirs = theirs
    outputs_mine, grad_mine, params_mine = mine
    assert torch.equal(outputs_mine[1], outputs_theirs[1])
    for name, a, b in zip(("z_q", "codes", "latents", "commitment", "codebook"), outputs_mine, outputs_theirs):
        torch.testing.assert_close(a, b, msg=name)
    torch.testing.assert_close(grad_mine, grad_theirs)
    assert params_mine.keys() == params_theirs.keys()
    for name in params_theirs:
        torch.testing.assert_close(params_mine[name], params_theirs[name], msg=name)


def test_training_matches_dac_over_steps():
    """Quantizer dropout on half the batch, the per-level straight-through estimator, the undetached residual,
    both losses, and SGD steps on every parameter (the weight-norm g and v, the codes)."""
    theirs, mine = _pair()
    optimizers = [torch.optim.SGD(module.parameters(), lr=0.5) for module in (theirs, mine)]
    for step in range(4):
        z = torch.randn(6, DIM, 7, dtype=torch.float64)
        result_theirs = _run(theirs, z, step)
        result_mine = _run(mine, z, step)
        _assert_same(result_theirs, result_mine)
        for optimizer in optimizers:
            optimizer.step()
    for (name, a), (_, b) in zip(mine.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("n_quantizers", [None, 1, 3])
def test_eval_matches_dac(n_quantizers):
    theirs, mine = _pair()
    theirs.eval()
    mine.eval()
    z = torch.randn(3, DIM, 9, dtype=torch.float64)
    _assert_same(_run(theirs, z, 0, n_quantizers), _run(mine, z, 0, n_quantizers))
    _, codes, latents, _, _ = mine(z, n_quantizers)
    for method, argument in (("from_codes", codes), ("from_latents", latents), ("from_latents", latents[:, :5])):
        for a, b in zip(getattr(mine, method)(argument), getattr(theirs, method)(argument)):
            torch.testing.assert_close(a, b, msg=method)


def test_state_dict_loads_strictly_both_ways():
    theirs, _ = _pair()
    mine = ours_module.ResidualVectorQuantize(**CONFIG).double()
    assert mine.state_dict().keys() == theirs.state_dict().keys()
    mine.load_state_dict(theirs.state_dict(), strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        fresh = quantize.ResidualVectorQuantize(**CONFIG).double()
    fresh.load_state_dict(mine.state_dict(), strict=True)
    z = torch.randn(2, DIM, 5, dtype=torch.float64)
    for module in (mine, fresh, theirs):
        module.eval()
    assert torch.equal(mine(z)[1], theirs(z)[1])
    assert torch.equal(fresh(z)[1], theirs(z)[1])


def test_fresh_layers_draw_dacs_initialisation():
    """Same seed, same parameters: the projections and codes are initialised with DAC's RNG draws."""
    theirs, _ = _pair()
    torch.manual_seed(0)
    mine = ours_module.ResidualVectorQuantize(**CONFIG).double()
    for (name, a), (_, b) in zip(mine.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_from_original_gives_the_same_codes_on_float32():
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        theirs = quantize.ResidualVectorQuantize(input_dim=DIM, n_codebooks=3, codebook_size=CODES).eval()
    mine = ours_module.ResidualVectorQuantize.from_original(theirs)
    assert not mine.training and mine.quantizers[0].codebook.weight.dtype == torch.float32
    z = torch.randn(4, DIM, 50)
    assert torch.equal(mine(z)[1], theirs(z)[1])


def test_n_quantizers_in_training():
    """DAC ignores n_quantizers while training (parity=True does too); fastvq uses it for the kept items."""
    theirs, parity = _pair(quantizer_dropout=0.0, parity=True)
    _, mine = _pair(quantizer_dropout=0.0)
    z = torch.randn(2, DIM, 5, dtype=torch.float64)
    _assert_same(_run(theirs, z, 0, 2), _run(parity, z, 0, 2))
    z_q, codes, _, _, _ = mine(z, 2)
    torch.testing.assert_close(z_q, mine.from_codes(codes[:, :2])[0])
    assert not torch.allclose(theirs(z, 2)[0], z_q)
    _, dropout = _pair(quantizer_dropout=1.0)
    torch.manual_seed(0)
    z_q, codes, _, _, _ = dropout(z, 1)  # every item dropped out, none past the first level
    torch.testing.assert_close(z_q, dropout.from_codes(codes[:, :1])[0])


@pytest.mark.parametrize("build, error, message", [
    (lambda: ours_module.ResidualVectorQuantize(n_codebooks=0), ValueError, "n_codebooks"),
    (lambda: ours_module.ResidualVectorQuantize(n_codebooks=2, codebook_dim=[4]), ValueError, "codebook_dim"),
    (lambda: ours_module.ResidualVectorQuantize(quantizer_dropout=1.5), ValueError, "quantizer_dropout"),
    (lambda: ours_module.ResidualVectorQuantize(codebook_size=0), ValueError, "codebook_size"),
    (lambda: ours_module.ResidualVectorQuantize(4, 2, 8)(torch.randn(1, 5, 3)), ValueError, r"\[B, 4, T\]"),
    (lambda: ours_module.ResidualVectorQuantize(4, 2, 8)(torch.randn(1, 4, 3), 0), ValueError, "n_quantizers"),
    (lambda: ours_module.ResidualVectorQuantize(4, 2, 8)(torch.ones(1, 4, 3).long()), TypeError, "floating"),
    (lambda: ours_module.ResidualVectorQuantize(4, 2, 8).from_codes(torch.zeros(1, 3, 2).long()), ValueError,
     "at most 2"),
    (lambda: ours_module.ResidualVectorQuantize(4, 2, 8).from_codes(torch.zeros(1, 2, 2)), TypeError, "integer"),
    (lambda: ours_module.ResidualVectorQuantize(4, 2, 8).from_latents(torch.zeros(1, 7, 2)), ValueError, "8"),
], ids=["n_codebooks", "codebook_dim", "dropout", "codebook_size", "channels", "n_quantizers", "int-input",
        "levels", "float-codes", "narrow-latents"])
def test_bad_arguments(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_quantizer_dropout_true_as_in_dacs_example():
    theirs, mine = _pair(quantizer_dropout=True)
    z = torch.randn(3, DIM, 4, dtype=torch.float64)
    _assert_same(_run(theirs, z, 5), _run(mine, z, 5))
    assert copy.deepcopy(mine).quantizer_dropout is True
