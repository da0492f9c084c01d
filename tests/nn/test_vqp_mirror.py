"""fastvq.nn.vector_quantize_pytorch against vector-quantize-pytorch 1.32 itself: the same modules with the same
public classes and helpers (fastvq's), ``install_as_vector_quantize_pytorch()`` in a fresh interpreter, and the
exception types of bad configurations (an instance of the class theirs raises, naming the argument)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fastvq.nn as ours
from fastvq.nn import vector_quantize_pytorch as mirror

vqp = pytest.importorskip("vector_quantize_pytorch")

REPO_ROOT = Path(__file__).resolve().parents[2]


def _their_modules() -> list[str]:
    folder = Path(vqp.__file__).parent
    return sorted(path.stem for path in folder.glob("*.py") if path.stem != "__init__")


def test_mirror_has_every_module_and_export_of_the_original():
    assert sorted(mirror.SUBMODULES) == _their_modules()
    exported = [name for name in dir(vqp) if not name.startswith("_") and inspect.isclass(getattr(vqp, name))]
    for name in exported:
        assert getattr(mirror, name) is getattr(ours, name), name


@pytest.mark.parametrize("module_name", _their_modules())
def test_each_module_has_the_originals_public_classes_as_fastvqs(module_name):
    """Every public class (namedtuples included) the original module defines, under its name, from fastvq."""
    original = __import__(f"vector_quantize_pytorch.{module_name}", fromlist=["_"])
    mine = mirror.SUBMODULES[module_name]
    defined_there = [name for name, value in vars(original).items()
                     if inspect.isclass(value) and value.__module__ == original.__name__ and not name.startswith("_")]
    assert defined_there, module_name
    for name in defined_there:
        value = getattr(mine, name)
        assert value.__module__.startswith("fastvq.nn."), (module_name, name, value.__module__)
        if issubclass(value, tuple):  # namedtuples: the same fields in the same order
            assert value._fields == getattr(original, name)._fields, (module_name, name)
    for name in mine.__all__:
        assert hasattr(original, name), f"{module_name}.{name} is not a name of the original module"


@pytest.mark.parametrize("act_name", ["tanh", "sigmoid", "normal", "laplace", "cauchy"])
def test_build_cdf_act_matches_the_original(act_name):
    from vector_quantize_pytorch.finite_scalar_perturbation import build_cdf_act as theirs

    act, inv_act = mirror.finite_scalar_perturbation.build_cdf_act(act_name)
    their_act, their_inv_act = theirs(act_name)
    assert (act, inv_act) == (getattr(mirror.finite_scalar_perturbation, f"{act_name}_act"),
                              getattr(mirror.finite_scalar_perturbation, f"{act_name}_inv_act"))
    z = torch.randn(257, dtype=torch.float64) * 3
    torch.testing.assert_close(act(z), their_act(z), atol=1e-15, rtol=0)
    p = torch.rand(257, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    torch.testing.assert_close(inv_act(p), their_inv_act(p), atol=1e-12, rtol=1e-12)


def test_build_cdf_act_names_the_unknown_activation():
    with pytest.raises(AssertionError, match="act_name") as raised:
        mirror.finite_scalar_perturbation.build_cdf_act("relu")
    assert isinstance(raised.value, ValueError)


_INSTALL_SCRIPT = """
import sys
import fastvq.nn
fastvq.nn.install_as_vector_quantize_pytorch()
fastvq.nn.install_as_vector_quantize_pytorch()  # again: a no-op
import vector_quantize_pytorch
import vector_quantize_pytorch.latent_quantization as latent
from vector_quantize_pytorch import VectorQuantize
from vector_quantize_pytorch.finite_scalar_perturbation import build_cdf_act
from vector_quantize_pytorch.utils import QUANTIZE_KLASSES
assert vector_quantize_pytorch is fastvq.nn.vector_quantize_pytorch
assert VectorQuantize is fastvq.nn.VectorQuantize and latent.LatentQuantize is fastvq.nn.LatentQuantize
assert vector_quantize_pytorch.sim_vq.SimVQ is fastvq.nn.SimVQ
assert QUANTIZE_KLASSES is fastvq.nn.sequential.QUANTIZE_KLASSES
assert callable(build_cdf_act("tanh")[0])
assert not any(getattr(m, "__file__", "") and "site-packages" in m.__file__
               for n, m in sys.modules.items() if n.split(".")[0] == "vector_quantize_pytorch")
print("installed")
"""

_ALREADY_IMPORTED_SCRIPT = """
import sys
import vector_quantize_pytorch.sim_vq
real = sys.modules["vector_quantize_pytorch"]
import fastvq.nn
try:
    fastvq.nn.install_as_vector_quantize_pytorch()
except RuntimeError as error:
    assert "vector_quantize_pytorch.sim_vq" in str(error), error
    assert sys.modules["vector_quantize_pytorch"] is real
    print("refused")
"""


@pytest.mark.parametrize("script, expected", [(_INSTALL_SCRIPT, "installed"), (_ALREADY_IMPORTED_SCRIPT, "refused")],
                         ids=["fresh", "real-package-already-imported"])
def test_install_as_vector_quantize_pytorch_in_a_fresh_interpreter(script, expected):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == expected


# Configurations vector-quantize-pytorch rejects (an assert, or a RuntimeError inside torch), and the argument
# fastvq's message must name.
BAD_CONFIGS = [
    ("EvoLFQ", dict(encoder=nn.Identity(), decoder=nn.Identity(), dim=4, codebook_size=16, pop_size=4,
                    elitism_count=4), "elitism_count"),
    ("EvoLFQ", dict(encoder=nn.Identity(), decoder=nn.Identity()), "codebook_size"),
    ("FSP", dict(levels=[8, 5], quantize_rate=1.5), "quantize_rate"),
    ("FSP", dict(levels=[8, 5], act_name="relu"), "act_name"),
    ("FSQ", dict(levels=[2, 5]), "preserve_symmetry"),
    ("FSQ", dict(levels=[8, 5], noise_dropout=0.5), "noise_dropout"),
    ("FSQ", dict(levels=[8, 5], dim=4, num_codebooks=2, keep_num_codebooks_dim=False), "keep_num_codebooks_dim"),
    ("HierarchicalVQ", dict(dim=4, codebook_size=16, scales=(1, 2), accept_image_fmap=True, accept_3d_fmap=True),
     "accept_3d_fmap"),
    ("HierarchicalVQ", dict(dim=4, codebook_size=16, scales=(1, 2), nested_dropout=1.5), "nested_dropout"),
    ("HierarchicalVQ", dict(dim=4, codebook_size=16, scales=(1, 2), nested_dropout_min_levels=0),
     "nested_dropout_min_levels"),
    ("HierarchicalVQ", dict(dim=4, codebook_size=16, scales=(2, 1)), "scales"),
    ("HierarchicalVQ", dict(dim=4, codebook_size=[16, 8], scales=(1, 2, 4)), "codebook_size"),
    ("HierarchicalVQ", dict(dim=4, codebook_size=[16, 8], scales=(1, 2), shared_codebook=True), "shared_codebook"),
    ("LatentQuantize", dict(levels=5, dim=16), "codebook_dim"),
    ("LFQ", dict(), "codebook_size"),
    ("LFQ", dict(codebook_size=100), "codebook_size"),
    ("LFQ", dict(dim=8, codebook_size=16, num_codebooks=2, keep_num_codebooks_dim=False), "keep_num_codebooks_dim"),
    ("LFQ", dict(codebook_size=16, frac_per_sample_entropy=0.0), "frac_per_sample_entropy"),
    ("LFQ", dict(codebook_size=16, soft_clamp_input_value=0.5), "soft_clamp_input_value"),
    ("ResidualFSQ", dict(dim=4, levels=[1, 5], num_quantizers=2), "levels"),
    ("ResidualFSQ", dict(dim=4, levels=[8, 5], num_quantizers=2, quantize_dropout=True,
                         quantize_dropout_cutoff_index=-1), "quantize_dropout_cutoff_index"),
    ("GroupedResidualFSQ", dict(dim=5, groups=2, levels=[8, 5], num_quantizers=2), "groups"),
    ("ResidualLFQ", dict(dim=4, codebook_size=16, num_quantizers=2, quantize_dropout=True,
                         quantize_dropout_cutoff_index=-1), "quantize_dropout_cutoff_index"),
    ("GroupedResidualLFQ", dict(dim=5, groups=2, codebook_size=16, num_quantizers=2), "groups"),
    ("ResidualSimVQ", dict(dim=4, codebook_size=16, num_quantizers=2, heads=2), "heads"),
    ("ResidualSimVQ", dict(dim=4, codebook_size=16, num_quantizers=2, quantize_dropout=True,
                           quantize_dropout_cutoff_index=-1), "quantize_dropout_cutoff_index"),
    ("ResidualVQ", dict(dim=4, codebook_size=16, num_quantizers=2, heads=2), "heads"),
    ("ResidualVQ", dict(dim=4, codebook_size=16), "num_quantizers"),
    ("ResidualVQ", dict(dim=4, codebook_size=(16, 8), num_quantizers=3), "codebook_size"),
    ("ResidualVQ", dict(dim=4, codebook_size=16, num_quantizers=2, quantize_dropout=True,
                        quantize_dropout_cutoff_index=-1), "quantize_dropout_cutoff_index"),
    ("ResidualVQ", dict(dim=4, codebook_size=16, num_quantizers=2, eval_beam_size=2), "beam_size"),
    ("ResidualVQ", dict(dim=4, codebook_size=16, num_quantizers=2, beam_size=2, beam_score_quantizer_weights=[1.0]),
     "beam_score_quantizer_weights"),
    ("GroupedResidualVQ", dict(dim=5, groups=2, codebook_size=16, num_quantizers=2), "groups"),
    ("Sequential", dict(), "quantizer"),
    ("VectorQuantize", dict(dim=4, codebook_size=16, use_cosine_sim=True, learnable_codebook=True, ema_update=False),
     "learnable_codebook"),
    ("VectorQuantize", dict(dim=4, codebook_size=16, straight_through=True, rotation_trick=True), "rotation_trick"),
    ("VectorQuantize", dict(dim=4, codebook_size=16, rotation_trick=False, directional_reparam=True),
     "threshold_ema_dead_code"),
    ("VectorQuantize", dict(dim=4, codebook_size=16, learnable_codebook=True), "ema_update"),
    ("VectorQuantize", dict(dim=4, codebook_size=16, sync_update_v=1.5, learnable_codebook=True, ema_update=False),
     "sync_update_v"),
    ("VectorQuantize", dict(dim=4, codebook_size=16, sync_update_v=0.5), "learnable_codebook"),
    ("VectorQuantize", dict(dim=4, codebook_size=16, use_cosine_sim=True, affine_param=True), "affine_param"),
]


def _construct(library, klass, kwargs):
    if klass == "Sequential":
        return library.Sequential(nn.Linear(4, 4))  # no quantizer among the modules
    return getattr(library, klass)(**kwargs)


@pytest.mark.parametrize("klass, kwargs, argument", BAD_CONFIGS,
                         ids=[f"{klass}-{argument}-{index}" for index, (klass, _, argument) in enumerate(BAD_CONFIGS)])
def test_bad_configuration_raises_the_originals_exception_type(klass, kwargs, argument):
    with pytest.raises(Exception) as theirs:
        _construct(vqp, klass, kwargs)
    with pytest.raises(type(theirs.value)) as mine:
        _construct(ours, klass, kwargs)
    assert isinstance(mine.value, (ours.ConfigError, TypeError)), type(mine.value)
    assert isinstance(mine.value, ValueError), "fastvq's own contract: a ValueError"
    assert argument in str(mine.value)
