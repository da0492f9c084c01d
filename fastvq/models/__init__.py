"""Full models built on ``fastvq.nn``: the PixelCNN priors over VQ code maps."""

from .pixelcnn import GatedPixelCNN, PixelCNN

__all__ = ["PixelCNN", "GatedPixelCNN"]
