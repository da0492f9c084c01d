"""fastvq.models.registry: one entry per stage-1 model, and the trainer knows models only through it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import fastvq
from fastvq.models.registry import MODEL_FLAGS, PRIORS, STAGE1, prior_model, stage1_model

PACKAGE = Path(fastvq.__file__).resolve().parent


def test_the_trainer_never_names_a_model():
    """No string in fastvq/train/ is a model's or a prior's name: what differs between them is in
    their entries."""
    for path in sorted((PACKAGE / "train").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in {*STAGE1, *PRIORS}:
                pytest.fail(f"{path.relative_to(PACKAGE)}, line {node.lineno}, names the model {node.value!r}")


@pytest.mark.parametrize("name", list(STAGE1))
@pytest.mark.parametrize("size, channels", [((8, 8), 1), ((32, 32), 3)])
def test_every_entry_builds_its_defaults_and_every_flag_sets_one_of_them(name, size, channels):
    entry = stage1_model(name)
    args = entry.defaults(size, channels, 0.1)
    assert set(entry.flags) <= set(MODEL_FLAGS)
    missing = {flag: target for flag, target in entry.flags.items() if target not in args}
    assert not missing, f"{name}: flags that set no default argument: {missing}"
    model = entry.build(args)
    out = model(torch.rand(2, channels, *size))
    assert out["reconstruction"].shape == (2, channels, *size)
    assert len(entry.codebook_names(len(model.codebook_sizes))) == len(model.codebook_sizes)
    adversary = entry.adversary(args)
    if adversary is not None:
        logits = adversary.network(torch.rand(2, channels, *size))
        assert adversary.loss(logits, logits).shape == ()


def test_an_unknown_model_is_a_value_error_naming_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'vqgan': use one of vqvae, vqvae2, vit-vqgan, rqvae"):
        stage1_model("vqgan")


@pytest.mark.parametrize("name", list(PRIORS))
def test_every_prior_builds_flat_conditioned_and_deep_maps_or_refuses_depth(name):
    entry = prior_model(name)
    args = entry.defaults(True)
    assert entry.width in args
    assert isinstance(entry.build(args, 16, (4, 4)), torch.nn.Module)
    assert isinstance(entry.build(args, 16, (4, 4), cond_codes=8, cond_len=4), torch.nn.Module)
    if entry.sequence:
        assert isinstance(entry.build(args, 16, (4, 4), depth=3), torch.nn.Module)
    else:
        with pytest.raises(ValueError, match="depth axis: train its prior with --model gpt or --model maskgit"):
            entry.build(args, 16, (4, 4), depth=3)
