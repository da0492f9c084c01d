"""The models the ``fastvq`` command knows, one table entry each. ``STAGE1``: the stage-1 models of
``fastvq train``: the class, its default arguments for an image size, the flags that set its
arguments, and what its training needs beyond the generic loop (the ViT-VQGAN's GAN discriminator
and perceptual network). ``PRIORS``: the priors of ``fastvq prior``: the class, its defaults, the
argument ``--channels`` sets, and the shape of codes it models.

The trainer (``fastvq.train``) and the command line (``fastvq.cli``) read this table and compare no
model names: a model is added here, once. Importing this module imports neither torch nor a model
(each class is imported when first built), so ``fastvq --help`` can list the models and flags.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Optional

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = ["SMALL_IMAGE", "Adversary", "StageOneModel", "STAGE1", "MODEL_FLAGS", "PERCEPTUAL_NETWORKS",
           "stage1_model", "PriorModel", "PRIORS", "DEFAULT_PRIOR", "prior_model"]

# Images with a side below this count as small (the 8 x 8 digits): narrower models, one
# downsampling stage, faster EMA and learning rate.
SMALL_IMAGE = 16
ImageSize = tuple[int, int]


@dataclass
class Adversary:
    """A GAN discriminator trained next to a stage-1 model: ``network`` maps images ``[B, C, H, W]``
    to logits, ``loss(real_logits, fake_logits)`` is its float32 scalar loss. The model's own
    ``forward(x, discriminator=network)`` adds the generator's adversarial term."""

    network: nn.Module
    loss: Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class StageOneModel:
    """One stage-1 model of ``fastvq train``.

    - ``model_class`` (``"module:Class"`` under ``fastvq.models``) is built as ``Class(**args)``, with
      ``args`` from ``defaults(image_size, channels, data_variance)`` (a JSON-serialisable dict;
      ``ValueError`` for an image size the model cannot take) updated by the flags.
    - ``flags`` maps each ``fastvq train`` flag (argparse's name, e.g. ``res_blocks``) that applies to
      this model to the argument it sets; a flag absent here does not apply.
    - ``learning_rate(image_size)`` is the default Adam learning rate.
    - ``adversary(args)`` is the GAN discriminator trained next to the model, or None.
    - ``perceptual`` says whether the model takes a perceptual-loss network (``perceptual_network=``)
      and ``perceptual_weight`` is switched on with one.
    - ``codebook_names(count)`` labels the model's codebooks in the code-usage chart.
    """

    name: str
    model_class: str
    defaults: Callable[[ImageSize, int, float], dict]
    flags: Mapping[str, str]
    learning_rate: Callable[[ImageSize], float] = lambda size: 2e-3
    adversary: Callable[[dict], Optional[Adversary]] = lambda args: None
    perceptual: bool = False
    codebook_names: Callable[[int], list[str]] = (
        lambda count: ["codebook"] if count == 1 else [f"depth {index} codebook" for index in range(count)])

    def build(self, args: dict, perceptual_network: Optional[nn.Module] = None) -> nn.Module:
        """The model for ``args`` (a config's ``model_args``), randomly initialised."""
        args = dict(args)
        if self.perceptual:
            args["perceptual_network"] = perceptual_network
        return _model_class(self.model_class)(**args)


def _model_class(spec: str) -> type:
    """The class ``"module:Class"`` under ``fastvq.models`` names, imported now."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def _small(size: ImageSize) -> bool:
    return min(size) < SMALL_IMAGE


def _fit_downsamples(size: ImageSize, wanted: int, extra: int = 0) -> int:
    """The largest ``d <= wanted`` for which both sides divide by ``2**(d + extra)``."""
    for down in range(wanted, -1, -1):
        if all(side % 2 ** (down + extra) == 0 for side in size):
            return down
    raise ValueError(f"images of size {size} cannot be downsampled {extra} time(s) by 2: resize them (--image-size)")


def _conv_defaults(size: ImageSize, channels: int, variance: float) -> dict:
    """What the convolutional models share. Small images (the digits) get a faster EMA (decay 0.9
    instead of the paper's 0.99): with 25 steps per epoch, the codes otherwise lag the encoder for
    many epochs (val_nmse 0.028 instead of 0.023 after the default 60 epochs, measured)."""
    small = _small(size)
    return dict(in_channels=channels, channels=64 if small else 128, res_channels=32 if small else 64,
                num_res_blocks=2, codebook_size=128 if small else 512, embedding_dim=16 if small else 64,
                codebook="ema", beta=0.25, decay=0.9 if small else 0.99, kmeans_init=True, dead_code_threshold=1.0,
                data_variance=variance)


def _vqvae_defaults(size: ImageSize, channels: int, variance: float) -> dict:
    return dict(_conv_defaults(size, channels, variance), downsamples=_fit_downsamples(size, 1 if _small(size) else 2))


def _vqvae2_defaults(size: ImageSize, channels: int, variance: float) -> dict:
    return dict(_conv_defaults(size, channels, variance),
                bottom_downsamples=_fit_downsamples(size, 1 if _small(size) else 2, 1), top_downsamples=1)


def _rqvae_defaults(size: ImageSize, channels: int, variance: float) -> dict:
    return dict(_conv_defaults(size, channels, variance), downsamples=_fit_downsamples(size, 1 if _small(size) else 2),
                depth=4, shared_codebook=True)


def _vit_vqgan_defaults(size: ImageSize, channels: int, variance: float) -> dict:
    """Dead-code replacement is what keeps the codebook in use: at initialisation every token
    projects to nearly the same direction and chooses the same code, and a code no token chooses
    gets no update (29 of 128 codes used on the digits without it, 128 with it). On the digits the
    logit-Laplace and adversarial terms cost held-out MSE, and the faster use averages (decay 0.9)
    and learning rate (1e-3) suit their 1 500 steps (README, "ViT-VQGAN on the digits")."""
    small = _small(size)
    patch = next((p for p in ((2,) if small else (4, 2, 1)) if size[0] % p == 0 and size[1] % p == 0), None)
    if patch is None:
        raise ValueError(f"images of size {size} need a patch size dividing both sides: resize them (--image-size)")
    dim = 64 if small else 256
    return dict(image_size=list(size), patch_size=patch, in_channels=channels, dim=dim,
                depth=2 if small else 4, heads=4, mlp_dim=4 * dim, codebook_size=128 if small else 512,
                codebook_dim=16 if small else 32, beta=0.25, codebook="gradient",
                decay=0.9 if small else 0.99, dead_code_threshold=1.0, kmeans_init=False, l2_weight=1.0,
                logit_laplace_weight=0.0 if small else 0.1, perceptual_weight=0.0,
                adversarial_weight=0.0 if small else 0.1, adversarial_loss="hinge")


def _vit_vqgan_adversary(args: dict) -> Optional[Adversary]:
    """The patch discriminator, with as many stride-2 layers (1 to 3) as the image size allows."""
    if not args["adversarial_weight"] > 0:
        return None
    from .vit_vqgan import PatchDiscriminator, discriminator_loss

    layers = max(1, min(3, int(math.log2(min(args["image_size"]))) - 1))
    kind = args["adversarial_loss"]
    return Adversary(PatchDiscriminator(args["in_channels"], 64, layers),
                     lambda real, fake: discriminator_loss(real, fake, kind))


# The flags every convolutional model takes, and the argument each sets.
_CONV_FLAGS = {"codebook_size": "codebook_size", "embedding_dim": "embedding_dim", "channels": "channels",
               "codebook": "codebook", "beta": "beta", "decay": "decay", "downsamples": "downsamples",
               "res_blocks": "num_res_blocks", "dead_code_threshold": "dead_code_threshold",
               "kmeans_init": "kmeans_init"}

STAGE1: dict[str, StageOneModel] = {entry.name: entry for entry in (
    StageOneModel("vqvae", "vqvae:VQVAE", _vqvae_defaults, _CONV_FLAGS),
    StageOneModel("vqvae2", "vqvae2:VQVAE2", _vqvae2_defaults, dict(_CONV_FLAGS, downsamples="bottom_downsamples"),
                  codebook_names=lambda count: ["top codebook", "bottom codebook"]),
    StageOneModel("vit-vqgan", "vit_vqgan:ViTVQGAN", _vit_vqgan_defaults,
                  {"codebook_size": "codebook_size", "embedding_dim": "codebook_dim", "channels": "dim",
                   "codebook": "codebook", "beta": "beta", "decay": "decay", "patch_size": "patch_size",
                   "layers": "depth", "dead_code_threshold": "dead_code_threshold", "kmeans_init": "kmeans_init",
                   "logit_laplace_weight": "logit_laplace_weight", "adversarial_weight": "adversarial_weight",
                   "perceptual_weight": "perceptual_weight"},
                  learning_rate=lambda size: 1e-3 if _small(size) else 3e-4,
                  adversary=_vit_vqgan_adversary, perceptual=True),
    StageOneModel("rqvae", "rqvae:RQVAE", _rqvae_defaults, dict(_CONV_FLAGS, depth="depth")),
)}

# Feature networks for the perceptual loss that fastvq itself provides, by name: the only names a
# run directory's config may resolve. A user's own MODULE:CALLABLE is imported only when given on the
# command line (fastvq train --perceptual-net), never because a checkpoint names it. None ships yet.
PERCEPTUAL_NETWORKS: dict[str, Callable[[], nn.Module]] = {}

# Every model flag of ``fastvq train``, whichever models it applies to.
MODEL_FLAGS = tuple(dict.fromkeys(flag for entry in STAGE1.values() for flag in entry.flags))


def stage1_model(name: str) -> StageOneModel:
    """The table entry of model ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return STAGE1[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}: use one of {', '.join(STAGE1)}") from None


@dataclass(frozen=True)
class PriorModel:
    """One prior of ``fastvq prior`` over a stage-1 model's code maps.

    - ``model_class`` (``"module:Class"`` under ``fastvq.models``) with ``defaults(small_images)``,
      its arguments beyond the codes' count and shape; ``width`` is the one ``--channels`` sets.
    - ``sequence``: a transformer over the flattened map, which also models a depth axis (RQ-VAE);
      otherwise a PixelCNN over the 2-D map, which does not.
    - ``masked_objective``: its loss is the cross-entropy of the codes it masks (MaskGIT), not of
      every code given the ones before it.
    """

    name: str
    model_class: str
    defaults: Callable[[bool], dict]
    width: str
    sequence: bool
    masked_objective: bool = False

    def build(self, args: dict, num_codes: int, shape: ImageSize, depth: int = 1,
              cond_codes: Optional[int] = None, cond_len: Optional[int] = None) -> nn.Module:
        """The prior over ``[B, H, W]`` maps of ``num_codes`` codes (``[B, H, W, depth]`` when
        ``depth > 1``), conditioned on a map of ``cond_codes`` codes (``cond_len`` positions) if given.

        Raises:
            ValueError: ``depth > 1`` for a prior without a depth axis.
        """
        model_class = _model_class(self.model_class)
        if self.sequence:
            extra = dict(cond_num_codes=cond_codes, cond_len=cond_len) if cond_codes else {}
            return model_class(num_codes, shape[0] * shape[1], depth=depth, **args, **extra)
        if depth > 1:
            takers = " or ".join(f"--model {name}" for name, entry in PRIORS.items() if entry.sequence)
            raise ValueError(f"the RQ-VAE's codes have a depth axis: train its prior with {takers}")
        return model_class(num_codes, **args, cond_num_codes=cond_codes)


def _transformer_defaults(small: bool) -> dict:
    return dict(dim=128 if small else 256, num_layers=4 if small else 6, heads=4, dropout=0.1)


def _pixelcnn_defaults(small: bool) -> dict:
    return dict(channels=64 if small else 128, num_layers=6 if small else 12, kernel_size=3,
                first_kernel_size=5 if small else 7)


PRIORS: dict[str, PriorModel] = {entry.name: entry for entry in (
    PriorModel("pixelcnn", "pixelcnn:PixelCNN", _pixelcnn_defaults, width="channels", sequence=False),
    PriorModel("gated-pixelcnn", "pixelcnn:GatedPixelCNN", _pixelcnn_defaults, width="channels", sequence=False),
    PriorModel("gpt", "gpt_prior:GPTPrior", _transformer_defaults, width="dim", sequence=True),
    PriorModel("maskgit", "maskgit:MaskGITPrior", _transformer_defaults, width="dim", sequence=True,
               masked_objective=True),
)}


# The prior of fastvq prior without --model: on the digits' 4 x 4 code maps it reached 3.9 bits per
# held-out code where the best Gated PixelCNN setting tried reached 4.4 (both in under a minute).
DEFAULT_PRIOR = "gpt"


def prior_model(name: str) -> PriorModel:
    """The table entry of prior ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return PRIORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown prior {name!r}: use one of {', '.join(PRIORS)}") from None
