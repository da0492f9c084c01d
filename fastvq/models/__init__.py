"""Full models built on ``fastvq.nn``: the PixelCNN priors over VQ code maps."""

from .pixelcnn import GatedPixelCNN, PixelCNN

__all__ = ["PixelCNN", "GatedPixelCNN"]

from .gpt_prior import GPTPrior  # noqa: E402
from .maskgit import MaskGITPrior, cosine_mask_schedule  # noqa: E402
from .priors import HierarchicalPrior, prior_loss, prior_sample  # noqa: E402
from .rqvae import RQVAE  # noqa: E402
from .vit_vqgan import PatchDiscriminator, ViTVQGAN  # noqa: E402
from .vqvae import VQVAE  # noqa: E402
from .vqvae2 import VQVAE2  # noqa: E402

__all__ += ["VQVAE", "VQVAE2", "RQVAE", "ViTVQGAN", "PatchDiscriminator", "GPTPrior", "MaskGITPrior", "cosine_mask_schedule",
            "HierarchicalPrior",
            "prior_loss", "prior_sample"]
