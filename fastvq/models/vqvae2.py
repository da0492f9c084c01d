"""VQ-VAE-2 (Razavi, van den Oord and Vinyals 2019, "Generating Diverse High-Fidelity Images with VQ-VAE-2")."""

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

__all__ = ["VQVAE2"]


class VQVAE2(nn.Module):
    """Two-level VQ-VAE: a top code map for global structure, a bottom one for local detail.

    ``x -> bottom encoder (bottom_downsamples stride-2 stages) -> h_b -> top encoder
    (top_downsamples more) -> quantize -> q_t``. The top codes are decoded to the bottom
    resolution, concatenated with ``h_b`` and projected, and that is quantized to ``q_b``: the bottom
    level is quantized after conditioning on the decoded top. ``q_t`` is upsampled by a transposed
    convolution, concatenated with ``q_b``, and one decoder reconstructs ``x`` from both.

    Args:
        in_channels, channels, res_channels, num_res_blocks: as ``VQVAE``.
        bottom_downsamples: stride-2 stages from the image to the bottom code map (2 in the paper
            for 256 x 256 images: 64 x 64 bottom codes).
        top_downsamples: further stride-2 stages from the bottom to the top code map (1: 32 x 32).
        codebook_size, top_codebook_size: codes in the bottom and top codebooks (the top one
            defaults to ``codebook_size``).
        embedding_dim: code dimension of both levels.
        codebook, beta, decay, eps, kmeans_init, dead_code_threshold, data_variance: as ``VQVAE``.

    ``forward(x)`` returns a dict as ``VQVAE``'s, with ``indices = (top [B, Ht, Wt], bottom
    [B, Hb, Wb])`` and ``vq_loss`` the sum of both levels' losses. ``encode(x)`` returns
    ``(top, bottom)``; ``decode_codes((top, bottom))`` the images.

    Raises:
        ValueError: bad sizes or options; inputs or codes of the wrong shape.
        TypeError: a non-float input.
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: int = 128,
        res_channels: int = 32,
        num_res_blocks: int = 2,
        bottom_downsamples: int = 2,
        top_downsamples: int = 1,
        codebook_size: int = 512,
        embedding_dim: int = 64,
        *,
        top_codebook_size: int | None = None,
        codebook: str = "ema",
        beta: float = 0.25,
        decay: float = 0.99,
        eps: float = 1e-5,
        kmeans_init: bool = False,
        dead_code_threshold: float = 0.0,
        data_variance: float = 1.0,
    ):
        super().__init__()
        top_codebook_size = codebook_size if top_codebook_size is None else top_codebook_size
        check_conv_vq_args(in_channels=in_channels, channels=channels, res_channels=res_channels,
                           num_res_blocks=num_res_blocks, codebook_size=codebook_size, embedding_dim=embedding_dim,
                           beta=beta, data_variance=data_variance, eps=eps,
                           dead_code_threshold=dead_code_threshold, bottom_downsamples=(bottom_downsamples, 0),
                           top_downsamples=(top_downsamples, 1), top_codebook_size=(top_codebook_size, 1))
        self.in_channels = in_channels
        self.bottom_downsamples = bottom_downsamples
        self.top_downsamples = top_downsamples
        self.codebook_size = codebook_size
        self.top_codebook_size = top_codebook_size
        quantizer_args = dict(codebook=codebook, beta=beta, decay=decay, eps=eps, kmeans_init=kmeans_init,
                              dead_code_threshold=dead_code_threshold)
        self.encoder_bottom = Encoder(in_channels, channels, res_channels, num_res_blocks, bottom_downsamples)
        self.encoder_top = Encoder(channels, channels, res_channels, num_res_blocks, top_downsamples)
        self.pre_quantize_top = nn.Conv2d(channels, embedding_dim, 1)
        self.quantizer_top = ImageQuantizer(embedding_dim, top_codebook_size, **quantizer_args)
        self.decoder_top = Decoder(embedding_dim, channels, res_channels, num_res_blocks, top_downsamples,
                                   embedding_dim)
        self.pre_quantize_bottom = nn.Conv2d(channels + embedding_dim, embedding_dim, 1)
        self.quantizer_bottom = ImageQuantizer(embedding_dim, codebook_size, **quantizer_args)
        upsample: list[nn.Module] = []
        for step in range(top_downsamples):
            upsample.append(nn.ConvTranspose2d(embedding_dim, embedding_dim, 4, stride=2, padding=1))
            if step < top_downsamples - 1:
                upsample.append(nn.ReLU())
        self.upsample_top = nn.Sequential(*upsample)
        self.decoder = Decoder(2 * embedding_dim, channels, res_channels, num_res_blocks, bottom_downsamples,
                               in_channels)
        self.register_buffer("data_variance", torch.tensor(float(data_variance)))

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return (self.top_codebook_size, self.codebook_size)

    def code_shape(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((Ht, Wt), (Hb, Wb))``, the top and bottom code maps' sizes for ``H x W`` images."""
        bottom = (height >> self.bottom_downsamples, width >> self.bottom_downsamples)
        return (bottom[0] >> self.top_downsamples, bottom[1] >> self.top_downsamples), bottom

    def _check(self, x: Tensor) -> Tensor:
        return check_images(x, self.in_channels, 2 ** (self.bottom_downsamples + self.top_downsamples),
                            type(self).__name__)

    def _bottom_input(self, h_bottom: Tensor, quantized_top: Tensor) -> Tensor:
        return self.pre_quantize_bottom(torch.cat([self.decoder_top(quantized_top), h_bottom], dim=1))

    def _decode(self, quantized_top: Tensor, quantized_bottom: Tensor) -> Tensor:
        return self.decoder(torch.cat([self.upsample_top(quantized_top), quantized_bottom], dim=1))

    def forward(self, x: Tensor) -> dict:
        x = self._check(x)
        h_bottom = self.encoder_bottom(x)
        h_top = self.encoder_top(h_bottom)
        quantized_top, indices_top, loss_top = self.quantizer_top(self.pre_quantize_top(h_top))
        bottom_input = self._bottom_input(h_bottom, quantized_top)
        quantized_bottom, indices_bottom, loss_bottom = self.quantizer_bottom(bottom_input)
        reconstruction = self._decode(quantized_top, quantized_bottom)
        recon_loss = F.mse_loss(reconstruction.float(), x.float()) / self.data_variance
        vq_loss = loss_top + loss_bottom
        return {
            "reconstruction": reconstruction,
            "loss": recon_loss + vq_loss,
            "recon_loss": recon_loss,
            "vq_loss": vq_loss,
            "indices": (indices_top, indices_bottom),
        }

    @torch.no_grad()
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` -> ``(top [B, Ht, Wt], bottom [B, Hb, Wb])`` int64 code maps; no state changes."""
        h_bottom = self.encoder_bottom(self._check(x))
        top = self.quantizer_top.search(self.pre_quantize_top(self.encoder_top(h_bottom)))
        bottom = self.quantizer_bottom.search(self._bottom_input(h_bottom, self.quantizer_top.codes(top)))
        return top, bottom

    def decode_codes(self, codes: tuple[Tensor, Tensor]) -> Tensor:
        """``(top, bottom)`` int64 code maps -> images ``[B, C, H, W]``."""
        if not isinstance(codes, (tuple, list)) or len(codes) != 2:
            raise ValueError(f"{type(self).__name__}: codes must be a (top, bottom) pair of code maps")
        top = check_codes(codes[0], self.top_codebook_size, 3, type(self).__name__, "top codes")
        bottom = check_codes(codes[1], self.codebook_size, 3, type(self).__name__, "bottom codes")
        if top.shape[0] != bottom.shape[0]:
            raise ValueError(f"top and bottom codes hold different batch sizes: {top.shape[0]} and {bottom.shape[0]}")
        return self._decode(self.quantizer_top.codes(top), self.quantizer_bottom.codes(bottom))
