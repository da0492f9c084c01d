"""fastvq.swap_quantizers on the drop-in libraries' own quantizers (audiocraft, EnCodec, Moshi, DAC, SNAC,
diffusers): the swapped model holds the original's very tensors under the same keys and gives the same codes.

The libraries' layers themselves are checked against fastvq's in tests/nn/test_<library>.py; this file checks
the registry rows and the ``from_original`` protocol of each (see fastvq/swap.py).
"""

import copy
import importlib.util
import sys

import pytest
import torch
from _originals import audiocraft_vq, encodec_vq, load_original
from _vendored import ORIGINALS
from torch import nn

import fastvq


def _audiocraft():
    return audiocraft_vq().ResidualVectorQuantizer(dimension=8, n_q=3, bins=16, kmeans_iters=2,
                                                          threshold_ema_dead_code=0), (4, 8, 40), \
        lambda q, x: q(x, 50).codes


def _encodec():
    return encodec_vq().ResidualVectorQuantizer(dimension=8, n_q=3, bins=16, kmeans_iters=2,
                                                          threshold_ema_dead_code=0), (4, 8, 40), \
        lambda q, x: q(x, 50).codes


def _moshi():
    module = load_original("moshi.quantization.vq")
    return module.ResidualVectorQuantizer(dimension=8, n_q=3, bins=16), (4, 8, 40), lambda q, x: q(x, 50).codes


def _moshi_split():
    module = load_original("moshi.quantization.vq")
    return module.SplitResidualVectorQuantizer(dimension=8, n_q=3, bins=16), (4, 8, 40), \
        lambda q, x: q(x, 50).codes


def _dac():
    load_original("dac.nn.layers")
    module = load_original("dac.nn.quantize")
    return module.ResidualVectorQuantize(input_dim=16, n_codebooks=3, codebook_size=32, codebook_dim=4), \
        (2, 16, 12), lambda q, x: q(x)[1]


def _snac():
    load_original("snac.layers")
    module = load_original("snac.vq")
    return module.ResidualVectorQuantize(input_dim=16, codebook_size=32, codebook_dim=4, vq_strides=[2, 1]), \
        (2, 16, 12), lambda q, x: torch.cat(q(x)[1], dim=-1)


def _diffusers():
    vae = pytest.importorskip("diffusers.models.autoencoders.vae")
    return vae.VectorQuantizer(32, 8, beta=0.25), (2, 8, 4, 4), lambda q, x: q(x)[2][2]


def _vendored_as(module_name, relative_path):
    """A vendored original (tests/originals/) under the module name its code base imports it by."""
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, ORIGINALS / relative_path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def _llamagen():
    module = _vendored_as("tokenizer.tokenizer_image.vq_model", "llamagen/vq_model.py")
    return module.VectorQuantizer(32, 8, 0.25, 0.1, True, True), (2, 8, 4, 4), lambda q, x: q(x)[2][2]


def _ibq():
    module = _vendored_as("src.IBQ.modules.vqvae.quantize", "seed_voken/ibq_quantize.py")
    return module.IndexPropagationQuantize(32, 8), (2, 8, 4, 4), lambda q, x: q(x)[2][2]


def _open_magvit2():
    module = _vendored_as("src.Open_MAGVIT2.modules.vqvae.lookup_free_quantize", "seed_voken/lookup_free_quantize.py")
    return module.LFQ(dim=6, codebook_size=64), (2, 6, 4, 4), lambda q, x: q(x)[2]


# LlamaGen registers an nn.Parameter as its usage-counter buffer; fastvq's from_original keeps a plain copy.
COPIED_BUFFERS = {"llamagen": {"quantizer.codebook_used"}}
LIBRARIES = {"audiocraft": _audiocraft, "encodec": _encodec, "moshi": _moshi, "moshi-split": _moshi_split,
             "dac": _dac, "snac": _snac, "diffusers": _diffusers, "llamagen": _llamagen, "ibq": _ibq,
             "open-magvit2": _open_magvit2}


@pytest.mark.parametrize("library", list(LIBRARIES))
def test_swap_replaces_the_original_with_its_own_tensors_and_the_same_codes(library):
    torch.manual_seed(0)
    original, shape, codes_of = LIBRARIES[library]()
    model = nn.ModuleDict({"encoder": nn.Identity(), "quantizer": original})
    x = torch.randn(*shape)
    model.train()
    # k-means init of the EMA codebooks (Moshi's reaches one more level per step), on ten rows per code: with fewer,
    # k-means leaves duplicate codes, exact ties that the two sides' float rounding may break either way; for the
    # same reason audiocraft and EnCodec expire no codes here (a replaced code equals a row of the batch).
    with torch.no_grad():  # (a weight_norm weight computed with grad would not deep-copy)
        for _ in range(4):
            codes_of(model["quantizer"], x)
    model.eval()
    reference = copy.deepcopy(model)
    tensors = model.state_dict(keep_vars=True)

    swapped = fastvq.swap_quantizers(model)

    assert [(entry.name, entry.original) for entry in swapped] == [("quantizer", type(original))]
    assert type(model["quantizer"]).__module__.startswith("fastvq.nn.")
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(tensors)
    copied = COPIED_BUFFERS.get(library, set())
    not_adopted = [key for key in tensors if key not in copied and after[key] is not tensors[key]]
    assert not not_adopted, f"the replacement must hold the original's tensors: {not_adopted}"
    assert all(torch.equal(after[key], tensors[key]) for key in copied)
    with torch.no_grad():
        torch.testing.assert_close(codes_of(model["quantizer"], x), codes_of(reference["quantizer"], x),
                                   rtol=0, atol=0)
    assert fastvq.swap_quantizers(model) == []


def test_diffusers_vq_model_from_its_default_config_encodes_and_decodes_the_same_after_swap():
    models = pytest.importorskip("diffusers.models")
    torch.manual_seed(0)
    model = models.VQModel().eval()  # the default config: nothing is downloaded
    reference = copy.deepcopy(model)
    images = torch.randn(2, 3, 32, 32)

    swapped = fastvq.swap_quantizers(model)

    assert [entry.name for entry in swapped] == ["quantize"]
    assert type(model.quantize).__module__ == "fastvq.nn.diffusers"
    with torch.no_grad():
        latents, expected_latents = model.encode(images).latents, reference.encode(images).latents
        torch.testing.assert_close(latents, expected_latents, rtol=0, atol=0)
        codes, expected_codes = model.quantize(latents)[2][2], reference.quantize(latents)[2][2]
        assert torch.equal(codes, expected_codes)
        # (the straight-through sum z + (q - z) rounds differently from the gathered code by an ulp or so)
        torch.testing.assert_close(model.decode(latents).sample, reference.decode(latents).sample)
