"""Full models built on ``fastvq.nn``: the stage-1 VQ models (VQ-VAE, VQ-VAE-2, RQ-VAE, ViT-VQGAN),
the priors over their code maps (PixelCNN, Gated PixelCNN, GPT, MaskGIT) and ``registry``, the table
``fastvq train`` reads.

The classes are imported on first use (``fastvq.models.VQVAE``, ``from fastvq.models import VQVAE``),
so that the registry can be read without importing torch.
"""

from __future__ import annotations

import importlib

# Each public name, and the submodule that defines it.
_HOMES = {
    "PixelCNN": "pixelcnn",
    "GatedPixelCNN": "pixelcnn",
    "VQVAE": "vqvae",
    "VQVAE2": "vqvae2",
    "RQVAE": "rqvae",
    "ViTVQGAN": "vit_vqgan",
    "PatchDiscriminator": "vit_vqgan",
    "GPTPrior": "gpt_prior",
    "MaskGITPrior": "maskgit",
    "cosine_mask_schedule": "maskgit",
    "HierarchicalPrior": "priors",
    "prior_loss": "priors",
    "prior_sample": "priors",
}

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
