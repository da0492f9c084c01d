"""VQ-VAE (van den Oord, Vinyals and Kavukcuoglu 2017, "Neural Discrete Representation Learning")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import (
    Decoder,
    Encoder,
    ImageQuantizer,
    check_codes,
    check_conv_vq_args,
    check_images,
)

__all__ = ["VQVAE"]


class VQVAE(nn.Module):
    """VQ-VAE: a strided-convolution encoder with residual blocks, one codebook, a mirrored decoder.

    ``x -> Encoder -> 1x1 conv to embedding_dim -> quantize -> Decoder -> x_hat``. The encoder is
    ``downsamples`` 4x4 stride-2 convolutions, a 3x3 convolution and ``num_res_blocks`` residual
    blocks (``ReLU, 3x3 conv to res_channels, ReLU, 1x1 conv``); the decoder mirrors it with 4x4
    stride-2 transposed convolutions. The paper's image model is ``downsamples=2``,
    ``channels=128``, ``res_channels=32``, ``num_res_blocks=2``, ``codebook_size=512``,
    ``embedding_dim=64``, ``beta=0.25``.

    The loss is ``mse(x_hat, x) / data_variance + vq_loss``: the reconstruction term normalised by
    the variance of the training data, as in the paper's code, plus ``beta`` times the commitment
    loss (and, with the gradient codebook, the codebook loss ``|sg[z] - e|^2``).

    Args:
        in_channels: image channels ``C``.
        channels: width of the encoder and decoder.
        res_channels: hidden width of the residual blocks.
        num_res_blocks: residual blocks in the encoder and in the decoder.
        downsamples: stride-2 stages; the code map is ``H / 2**downsamples`` by ``W / 2**downsamples``.
        codebook_size: codes ``K``.
        embedding_dim: code dimension ``D``.
        codebook: ``"ema"`` (exponential moving averages, ``decay``, Laplace smoothing ``eps``) or
            ``"gradient"`` (the codebook loss trains the codes).
        beta: commitment weight.
        kmeans_init: (EMA) initialise the codes by k-means on the first batch.
        dead_code_threshold: (EMA) codes whose moving-average usage falls below it are replaced by
            encoder outputs of the batch (0: never).
        data_variance: the variance of the training pixels (1 leaves the MSE as it is).

    ``forward(x [B, C, H, W])`` returns a dict: ``reconstruction`` ``[B, C, H, W]``; ``loss``,
    ``recon_loss`` (the normalised MSE) and ``vq_loss``, float32 scalars; ``indices``, a 1-tuple
    with the int64 code map ``[B, H', W']``. ``encode(x)`` returns that map,
    ``decode_codes(codes)`` the images for a code map.

    Raises:
        ValueError: bad sizes or options; an input of the wrong shape (the message shows it).
        TypeError: a non-float input.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 128,
        res_channels: int = 32,
        num_res_blocks: int = 2,
        downsamples: int = 2,
        codebook_size: int = 512,
        embedding_dim: int = 64,
        *,
        codebook: str = "ema",
        beta: float = 0.25,
        decay: float = 0.99,
        eps: float = 1e-5,
        kmeans_init: bool = False,
        dead_code_threshold: float = 0.0,
        data_variance: float = 1.0,
    ):
        super().__init__()
        check_conv_vq_args(in_channels=in_channels, channels=channels, res_channels=res_channels,
                           num_res_blocks=num_res_blocks, codebook_size=codebook_size, embedding_dim=embedding_dim,
                           beta=beta, data_variance=data_variance, eps=eps,
                           dead_code_threshold=dead_code_threshold, downsamples=(downsamples, 0))
        self.in_channels = in_channels
        self.downsamples = downsamples
        self.codebook_size = codebook_size
        self.encoder = Encoder(in_channels, channels, res_channels, num_res_blocks, downsamples)
        self.pre_quantize = nn.Conv2d(channels, embedding_dim, 1)
        self.quantizer = ImageQuantizer(
            embedding_dim, codebook_size, codebook=codebook, beta=beta, decay=decay, eps=eps,
            kmeans_init=kmeans_init, dead_code_threshold=dead_code_threshold,
        )
        self.decoder = Decoder(embedding_dim, channels, res_channels, num_res_blocks, downsamples, in_channels)
        self.register_buffer("data_variance", torch.tensor(float(data_variance)))

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return (self.codebook_size,)

    def code_shape(self, height: int, width: int) -> tuple[int, int]:
        """The code map's size for ``H x W`` images."""
        return height >> self.downsamples, width >> self.downsamples

    def _check(self, x: Tensor) -> Tensor:
        return check_images(x, self.in_channels, 2**self.downsamples, type(self).__name__)

    def forward(self, x: Tensor) -> dict:
        x = self._check(x)
        quantized, indices, vq_loss = self.quantizer(self.pre_quantize(self.encoder(x)))
        reconstruction = self.decoder(quantized)
        recon_loss = F.mse_loss(reconstruction.float(), x.float()) / self.data_variance
        return {
            "reconstruction": reconstruction,
            "loss": recon_loss + vq_loss,
            "recon_loss": recon_loss,
            "vq_loss": vq_loss,
            "indices": (indices,),
        }

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """``x [B, C, H, W]`` -> the int64 code map ``[B, H', W']``."""
        return self.quantizer.search(self.pre_quantize(self.encoder(self._check(x))))

    def decode_codes(self, codes: Tensor) -> Tensor:
        """An int64 code map ``[B, H', W']`` -> images ``[B, C, H, W]``."""
        codes = check_codes(codes, self.codebook_size, 3, type(self).__name__)
        return self.decoder(self.quantizer.codes(codes))
