"""Arguments that used to reach a kernel or poison state: sparse tensors, in-place outputs that share
memory, unbatched convolution inputs, and float arguments that are NaN, infinite or out of range."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastvq
from fastvq import reference
from fastvq.nn import MaskedConv2d


def test_sparse_tensors_are_a_type_error_naming_the_argument():
    z, codebook = torch.randn(6, 4), torch.randn(5, 4)
    sparse = z.to_sparse()
    for call, name in [
        (lambda: fastvq.nearest_code(sparse, codebook), "z"),
        (lambda: fastvq.nearest_code(z, codebook.to_sparse()), "codebook"),
        (lambda: fastvq.vector_quantize(sparse, codebook), "z"),
        (lambda: fastvq.segment_reduce(sparse, torch.zeros(6, dtype=torch.long), 5), "values"),
        (lambda: fastvq.masked_conv2d(torch.randn(1, 2, 5, 5).to_sparse(), torch.randn(3, 2, 3, 3)), "x"),
        (lambda: fastvq.soft_quantize(sparse, codebook), "z"),
    ]:
        with pytest.raises(TypeError, match=f"^{name} must be a dense"):
            call()


@pytest.mark.parametrize("name", ["codebook", "cluster_size", "embed_avg"])
def test_ema_update_refuses_state_that_shares_memory(name):
    state = {"codebook": torch.randn(5, 4), "cluster_size": torch.ones(5), "embed_avg": torch.randn(5, 4)}
    state[name] = state[name][:1].expand(state[name].shape)
    with pytest.raises(ValueError, match=f"^{name} is updated in place but several of its elements share memory"):
        fastvq.ema_update_(state["codebook"], state["cluster_size"], state["embed_avg"], torch.randn(3, 4),
                           torch.tensor([0, 1, 2]), decay=0.9, eps=1e-5)


def test_masked_conv_takes_unbatched_input_as_conv2d_does():
    layer = MaskedConv2d("B", 3, 4, 3, padding=1)
    x = torch.randn(3, 7, 6)
    expected = F.conv2d(x, layer.weight * reference.pixelcnn_mask_ref("B", 3), layer.bias, padding=1)
    out = layer(x)
    assert out.shape == (4, 7, 6)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, layer(x[None])[0])
    functional = fastvq.masked_conv2d(x, layer.weight, layer.bias, mask_type="B", padding=1)
    torch.testing.assert_close(functional, expected)
    out.sum().backward()  # the gradient flows through the unbatched call too
    assert layer.weight.grad is not None
    with pytest.raises(ValueError, match=r"x must be 3-D \[C_in, H, W\] \(unbatched\) or 4-D"):
        layer(torch.randn(7, 6))


# --------------------------------------------------------------------------- float arguments

NON_FINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_op_float_arguments_must_be_finite(value):
    z, codebook, indices = torch.randn(20, 4), torch.randn(5, 4), torch.zeros(20, dtype=torch.long)
    calls = {
        "decay": lambda: fastvq.ema_update_(codebook.clone(), torch.ones(5), codebook.clone(), z, indices, decay=value,
                                            eps=1e-5),
        "eps": lambda: fastvq.ema_update_(codebook.clone(), torch.ones(5), codebook.clone(), z, indices, decay=0.9,
                                          eps=value),
        "sample_temperature": lambda: fastvq.nearest_code(z, codebook, sample_temperature=value),
        "beta": lambda: fastvq.vector_quantize(z, codebook, beta=value),
        "codebook_weight": lambda: fastvq.vector_quantize(z, codebook, codebook_weight=value),
        "temperature": lambda: fastvq.soft_quantize(z, codebook, temperature=value),
        "clamped_entropy eps": lambda: fastvq.functional.clamped_entropy(torch.rand(3, 8), eps=value),
        "code_entropy eps": lambda: fastvq.functional.code_entropy(torch.randn(20, 1, 3), eps=value),
        "tol": lambda: fastvq.kmeans(z, 3, tol=value),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=name.split()[-1]):
            call()


def test_ema_update_with_a_nan_eps_no_longer_poisons_the_codebook():
    codebook = torch.randn(5, 4)
    before = codebook.clone()
    with pytest.raises(ValueError, match=r"eps must be a finite float"):
        fastvq.ema_update_(codebook, torch.ones(5), codebook.clone(), torch.randn(3, 4), torch.tensor([0, 1, 2]),
                           decay=0.9, eps=float("nan"))
    assert torch.equal(codebook, before)


# Each layer's and model's required constructor arguments, small. A class missing here fails
# test_every_layer_is_covered: add it, so its float arguments are checked too.
REQUIRED = {
    "BinaryMapper": {}, "Codebook": dict(dim=4, codebook_size=8),
    "EvoLFQ": dict(encoder=torch.nn.Identity(), decoder=torch.nn.Identity(), dim=4),
    "FSP": dict(levels=[3, 3]), "FSQ": dict(levels=[3, 3]), "FactorizedL2Quantizer": dict(dim=4, codebook_size=8),
    "GatedMaskedConv2d": dict(channels=4), "GroupedResidualFSQ": dict(dim=4, levels=[3, 3]),
    "GroupedResidualLFQ": dict(dim=4, codebook_size=4), "GroupedResidualVQ": dict(dim=4, codebook_size=8),
    "GumbelQuantize": dict(num_hiddens=4, embedding_dim=4, n_embed=8),
    "HierarchicalVQ": dict(dim=4, codebook_size=8, scales=(1, 2)), "IBQ": dict(n_e=8, e_dim=4),
    "LFQ": dict(dim=4, codebook_size=16), "LatentQuantize": dict(levels=[3, 3], dim=4),
    "MaskedConv2d": dict(mask_type="B", in_channels=2, out_channels=2, kernel_size=3),
    "RandomProjectionQuantizer": dict(dim=4, codebook_size=8, codebook_dim=4),
    "ResidualFSQ": dict(levels=[3, 3], num_quantizers=2, dim=4),
    "ResidualLFQ": dict(dim=4, num_quantizers=2, codebook_size=16),
    "ResidualSimVQ": dict(dim=4, num_quantizers=2, codebook_size=8),
    "ResidualVQ": dict(dim=4, codebook_size=8, num_quantizers=2), "SimVQ": dict(dim=4, codebook_size=8),
    "Sequential": {},  # no float arguments: its modules are checked on their own
    "VectorQuantize": dict(dim=4, codebook_size=8), "VectorQuantizer2": dict(n_e=8, e_dim=4, beta=0.25),
    "VectorQuantizerEMA": dict(embedding_dim=4, num_embeddings=8, commitment_cost=0.25, decay=0.99),
    "GPTPrior": dict(num_codes=8, seq_len=4), "MaskGITPrior": dict(num_codes=8, seq_len=4, dim=8, heads=2),
    "GatedPixelCNN": dict(num_codes=8),
    "HierarchicalPrior": dict(top=torch.nn.Identity(), bottom=torch.nn.Identity()), "PatchDiscriminator": {},
    "PixelCNN": dict(num_codes=8), "RQVAE": {}, "VQVAE": {}, "VQVAE2": {},
    "ViTVQGAN": dict(image_size=(8, 8), patch_size=2, dim=16, depth=1, heads=2, mlp_dim=16, codebook_size=8,
                     codebook_dim=4),
}


def _layer_classes():
    import inspect

    import fastvq.models
    import fastvq.nn

    for module in (fastvq.nn, fastvq.models):
        for name in sorted(dir(module)):
            value = getattr(module, name)
            if inspect.isclass(value) and issubclass(value, torch.nn.Module) and value.__module__.startswith("fastvq"):
                yield name, value


def _float_arguments():
    import inspect

    for name, cls in _layer_classes():
        for parameter in inspect.signature(cls.__init__).parameters.values():
            if isinstance(parameter.default, float) or "float" in str(parameter.annotation):
                yield name, cls, parameter.name


def test_every_layer_is_covered():
    missing = sorted(name for name, _ in _layer_classes() if name not in REQUIRED)
    assert not missing, f"add the required arguments of {missing} to REQUIRED"


FLOAT_ARGUMENTS = list(_float_arguments())


@pytest.mark.parametrize("name, cls, argument", FLOAT_ARGUMENTS,
                         ids=[f"{name}.{argument}" for name, _, argument in FLOAT_ARGUMENTS])
def test_layer_float_arguments_must_be_finite(name, cls, argument):
    import warnings

    for value in NON_FINITE:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError, match=argument):
                cls(**{**REQUIRED[name], argument: value})


def test_forward_and_sampling_float_arguments_must_be_finite():
    from fastvq.models import GPTPrior, PixelCNN
    from fastvq.nn import FSP, GumbelQuantize

    gumbel = GumbelQuantize(num_hiddens=4, embedding_dim=4, n_embed=8)
    fsp = FSP(levels=[3, 3], dim=2)
    for value in NON_FINITE:
        with pytest.raises(ValueError, match="temp"):
            gumbel(torch.randn(1, 4, 2, 2), temp=value)
        with pytest.raises(ValueError, match="eps"):
            fsp(torch.randn(3, 2), eps=value)
        with pytest.raises(ValueError, match="temperature"):
            PixelCNN(num_codes=8, channels=4, num_layers=1).sample(1, (2, 2), temperature=value)
        with pytest.raises(ValueError, match="temperature"):
            GPTPrior(num_codes=8, seq_len=4, dim=8, num_layers=1, heads=2).sample(1, temperature=value)
