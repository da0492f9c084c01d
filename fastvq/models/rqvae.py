"""RQ-VAE (Lee et al. 2022, "Autoregressive Image Generation using Residual Quantization")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import nearest_code
from ..nn import ResidualVQ
from ._common import CODEBOOK_KINDS, Decoder, Encoder, check_codes, check_conv_vq_args, check_images

__all__ = ["RQVAE"]


class RQVAE(nn.Module):
    """A VQ-VAE whose quantizer is ``fastvq.nn.ResidualVQ``: ``depth`` codes per position.

    Each position of the code map is quantized ``depth`` times, every step quantizing what the
    previous ones left over; the decoder sees the sum of the ``depth`` codes. With the same
    number of positions this describes an image far more finely than one code per position, so the
    code map can be coarser; the prior (``GPTPrior(depth=...)``) then predicts the ``depth`` codes
    of each position.

    Args:
        in_channels, channels, res_channels, num_res_blocks, downsamples, embedding_dim, beta,
        decay, eps, kmeans_init, dead_code_threshold, data_variance: as ``VQVAE``.
        codebook_size: codes per depth.
        depth: residual quantization steps ``Q`` per position.
        shared_codebook: one codebook for every depth, as in the RQ-VAE paper (default); else one
            per depth.
        codebook: ``"ema"`` (default) or ``"gradient"`` (``ResidualVQ(learnable_codebook=True,
            ema_update=False)``: vector-quantize-pytorch's one-term loss ``beta * |q - z|^2``,
            whose gradient reaches both the codes and the encoder).

    ``forward(x)`` returns a dict as ``VQVAE``'s; ``vq_loss`` sums the depths' commitment losses;
    ``indices`` holds one int64 ``[B, H', W', Q]`` map (a shared codebook) or ``Q`` maps
    ``[B, H', W']`` (one per codebook). ``encode(x)`` returns int64 ``[B, H', W', Q]``;
    ``decode_codes`` takes that.
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
        depth: int = 4,
        *,
        shared_codebook: bool = True,
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
                           dead_code_threshold=dead_code_threshold, downsamples=(downsamples, 0), depth=(depth, 1))
        if codebook not in CODEBOOK_KINDS:
            raise ValueError(f"codebook must be one of {CODEBOOK_KINDS}, got {codebook!r}")
        if codebook == "gradient" and (kmeans_init or dead_code_threshold):
            raise ValueError("kmeans_init and dead_code_threshold need the EMA codebook (codebook='ema')")
        self.in_channels = in_channels
        self.downsamples = downsamples
        self.codebook_size = codebook_size
        self.embedding_dim = embedding_dim
        self.depth = depth
        self.shared_codebook = shared_codebook
        self.encoder = Encoder(in_channels, channels, res_channels, num_res_blocks, downsamples)
        self.pre_quantize = nn.Conv2d(channels, embedding_dim, 1)
        self.quantizer = ResidualVQ(
            dim=embedding_dim,
            num_quantizers=depth,
            codebook_size=codebook_size,
            shared_codebook=shared_codebook,
            accept_image_fmap=True,
            decay=decay,
            eps=eps,
            commitment_weight=beta,
            rotation_trick=False,
            kmeans_init=kmeans_init,
            threshold_ema_dead_code=dead_code_threshold,
            ema_update=codebook == "ema",
            learnable_codebook=codebook == "gradient",
        )
        self.decoder = Decoder(embedding_dim, channels, res_channels, num_res_blocks, downsamples, in_channels)
        self.register_buffer("data_variance", torch.tensor(float(data_variance)))

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return (self.codebook_size,) if self.shared_codebook else (self.codebook_size,) * self.depth

    def code_shape(self, height: int, width: int) -> tuple[int, int]:
        return height >> self.downsamples, width >> self.downsamples

    def _check(self, x: Tensor) -> Tensor:
        return check_images(x, self.in_channels, 2**self.downsamples, type(self).__name__)

    def forward(self, x: Tensor) -> dict:
        x = self._check(x)
        quantized, indices, losses = self.quantizer(self.pre_quantize(self.encoder(x)))
        reconstruction = self.decoder(quantized)
        recon_loss = F.mse_loss(reconstruction.float(), x.float()) / self.data_variance
        vq_loss = losses.sum()
        groups = (indices,) if self.shared_codebook else tuple(indices.unbind(-1))
        return {
            "reconstruction": reconstruction,
            "loss": recon_loss + vq_loss,
            "recon_loss": recon_loss,
            "vq_loss": vq_loss,
            "indices": groups,
        }

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """``x`` -> int64 codes ``[B, H', W', Q]``: each depth's nearest code to the residual; no state changes."""
        z = self.pre_quantize(self.encoder(self._check(x)))
        batch, _, height, width = z.shape
        residual = z.permute(0, 2, 3, 1).reshape(-1, self.embedding_dim)
        codes = []
        for layer in self.quantizer.layers:
            codebook = layer.codebook.detach()
            indices, _ = nearest_code(residual, codebook)
            residual = residual - codebook[indices]
            codes.append(indices)
        return torch.stack(codes, dim=-1).reshape(batch, height, width, self.depth)

    def decode_codes(self, codes: Tensor) -> Tensor:
        """int64 codes ``[B, H', W', Q]`` -> images ``[B, C, H, W]``."""
        codes = check_codes(codes, self.codebook_size, 4, type(self).__name__)
        if codes.shape[-1] != self.depth:
            raise ValueError(f"{type(self).__name__}: codes must end in depth = {self.depth}, "
                             f"got shape {tuple(codes.shape)}")
        return self.decoder(self.quantizer.get_output_from_indices(codes).movedim(-1, 1))
