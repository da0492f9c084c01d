"""Pieces the convolutional VQ models share: residual stacks, strided encoders and decoders, the
image quantizer (EMA or gradient codebook) and the code-usage statistics.

Every stage-1 model (``VQVAE``, ``VQVAE2``, ``RQVAE``, ``ViTVQGAN``) offers the same interface,
which the ``fastvq`` command relies on:

- ``forward(x [B, C, H, W] in [0, 1])`` -> dict with ``reconstruction`` (like ``x``), ``loss``
  (the float32 training objective), ``recon_loss``, ``vq_loss`` and ``indices``: a tuple with one
  int64 tensor of code indices per codebook, in the order of ``codebook_sizes``;
- ``encode(x)`` -> the codes a prior models (an int64 map, or a tuple of maps for VQ-VAE-2);
- ``decode_codes(codes)`` -> images;
- ``codebook_sizes``: one entry per codebook.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_real as check_float
from ..functional import nearest_code
from ..nn import VectorQuantize, VectorQuantizer2

CODEBOOK_KINDS = ("ema", "gradient")


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_conv_vq_args(
    *,
    in_channels: object,
    channels: object,
    res_channels: object,
    num_res_blocks: object,
    codebook_size: object,
    embedding_dim: object,
    beta: object,
    data_variance: object,
    eps: object,
    dead_code_threshold: object,
    **own: tuple[object, int],
) -> None:
    """The constructor checks the convolutional VQ models (VQ-VAE, VQ-VAE-2, RQ-VAE) share.

    ``own`` holds a model's other int arguments as ``name=(value, minimum)``. Raises ``ValueError``
    naming the first argument that is not an int at or above its minimum, a ``beta``, ``eps`` or
    ``dead_code_threshold`` that is not a finite float >= 0, or a ``data_variance`` that is not a
    finite float > 0.
    """
    for name, value, minimum in (
        ("in_channels", in_channels, 1),
        ("channels", channels, 1),
        ("res_channels", res_channels, 1),
        ("num_res_blocks", num_res_blocks, 0),
        ("codebook_size", codebook_size, 1),
        ("embedding_dim", embedding_dim, 1),
        *((name, value, minimum) for name, (value, minimum) in own.items()),
    ):
        check_positive_int(name, value, minimum)
    for name, value in (("beta", beta), ("eps", eps), ("dead_code_threshold", dead_code_threshold)):
        check_float(name, value, minimum=0.0)
    check_float("data_variance", data_variance, above=0.0)


def check_images(x: object, channels: int, multiple: int, owner: str) -> Tensor:
    """``x`` must be a float ``[B, channels, H, W]`` batch with ``H`` and ``W`` multiples of ``multiple``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{owner}: x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{owner}: x must be [B, {channels}, H, W], got shape {tuple(x.shape)}")
    if x.shape[2] % multiple or x.shape[3] % multiple:
        raise ValueError(
            f"{owner}: H and W must be multiples of {multiple} (the total downsampling), got shape {tuple(x.shape)}"
        )
    return x


def check_codes(codes: object, num_codes: int, dims: int, owner: str, name: str = "codes") -> Tensor:
    if not isinstance(codes, Tensor) or codes.dtype not in (torch.int64, torch.int32) or codes.dim() != dims:
        found = (f"{codes.dtype} tensor of shape {tuple(codes.shape)}" if isinstance(codes, Tensor)
                 else type(codes).__name__)
        raise ValueError(f"{owner}: {name} must be an int64 tensor with {dims} dimensions, got {found}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= num_codes):
        raise ValueError(f"{owner}: {name} must lie in [0, {num_codes}), got values in "
                         f"[{int(codes.min())}, {int(codes.max())}]")
    return codes.long()


def code_usage(indices: Tensor, num_codes: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(counts [K], perplexity, codes_used)`` of the non-negative entries of ``indices``."""
    flat = indices.reshape(-1)
    flat = flat[flat >= 0]
    counts = torch.bincount(flat, minlength=num_codes)[:num_codes].to(torch.float64)
    probs = counts / counts.sum().clamp_min(1.0)
    perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-12))).sum())
    return counts, perplexity, (counts > 0).sum()


class ResidualStack(nn.Module):
    """VQ-VAE's residual blocks ``x + conv1x1(relu(conv3x3(relu(x))))``, then a ReLU."""

    def __init__(self, channels: int, res_channels: int, num_blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                nn.Conv2d(channels, res_channels, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(res_channels, channels, 1),
            )
            for _ in range(num_blocks)
        )

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = x + block(x)
        return F.relu(x)


class Encoder(nn.Module):
    """``downsamples`` 4x4 stride-2 convolutions (ReLU between), a 3x3 convolution and a residual stack."""

    def __init__(self, in_channels: int, channels: int, res_channels: int, num_res_blocks: int, downsamples: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for step in range(downsamples):
            out = channels if step == downsamples - 1 else max(channels // 2, 1)
            layers += [nn.Conv2d(width, out, 4, stride=2, padding=1), nn.ReLU()]
            width = out
        layers.append(nn.Conv2d(width, channels, 3, padding=1))
        self.convs = nn.Sequential(*layers)
        self.residual = ResidualStack(channels, res_channels, num_res_blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.residual(self.convs(x))


class Decoder(nn.Module):
    """A 3x3 convolution, a residual stack and ``upsamples`` 4x4 stride-2 transposed convolutions."""

    def __init__(self, in_channels: int, channels: int, res_channels: int, num_res_blocks: int, upsamples: int,
                 out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.residual = ResidualStack(channels, res_channels, num_res_blocks)
        layers: list[nn.Module] = []
        width = channels
        for step in range(upsamples):
            last = step == upsamples - 1
            out = out_channels if last else max(channels // 2, 1)
            layers.append(nn.ConvTranspose2d(width, out, 4, stride=2, padding=1))
            if not last:
                layers.append(nn.ReLU())
            width = out
        if upsamples == 0:
            layers.append(nn.Conv2d(width, out_channels, 3, padding=1))
        self.upsample = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.upsample(self.residual(self.conv(x)))


class ImageQuantizer(nn.Module):
    """One codebook for a feature map ``[B, D, H, W]``: EMA (``VectorQuantize``) or gradient
    (``VectorQuantizer2`` with VQ-VAE's loss, ``legacy=False``).

    ``forward(z)`` -> ``(quantized [B, D, H, W], indices int64 [B, H, W], loss float32 [])`` where
    ``loss`` is ``beta * commitment`` (EMA) or ``codebook + beta * commitment`` (gradient); the
    gradient reaches ``z`` straight through.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        codebook: str = "ema",
        beta: float = 0.25,
        decay: float = 0.99,
        eps: float = 1e-5,
        kmeans_init: bool = False,
        dead_code_threshold: float = 0.0,
    ):
        super().__init__()
        if codebook not in CODEBOOK_KINDS:
            raise ValueError(f"codebook must be one of {CODEBOOK_KINDS}, got {codebook!r}")
        if codebook == "gradient" and (kmeans_init or dead_code_threshold):
            raise ValueError("kmeans_init and dead_code_threshold need the EMA codebook (codebook='ema')")
        self.kind = codebook
        self.dim = dim
        self.codebook_size = codebook_size
        if codebook == "ema":
            self.vq = VectorQuantize(
                dim,
                codebook_size,
                decay=decay,
                eps=eps,
                commitment_weight=beta,
                accept_image_fmap=True,
                rotation_trick=False,
                kmeans_init=kmeans_init,
                threshold_ema_dead_code=dead_code_threshold,
            )
        else:
            self.vq = VectorQuantizer2(codebook_size, dim, beta, legacy=False, sane_index_shape=True)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.kind == "ema":
            return self.vq(z)
        quantized, loss, (_, _, indices) = self.vq(z)
        return quantized, indices, loss

    @property
    def codebook(self) -> Tensor:
        """The codes, ``[K, D]``."""
        return self.vq.codebook if self.kind == "ema" else self.vq.embedding.weight

    def search(self, z: Tensor) -> Tensor:
        """The nearest code of every position of ``z [B, D, H, W]``, int64 ``[B, H, W]``; no state changes."""
        batch, _, height, width = z.shape
        rows = z.detach().permute(0, 2, 3, 1).reshape(-1, self.dim)
        indices, _ = nearest_code(rows, self.codebook.detach())
        return indices.reshape(batch, height, width)

    def codes(self, indices: Tensor) -> Tensor:
        """``indices [B, H, W]`` -> their codes as a feature map ``[B, D, H, W]``."""
        return F.embedding(indices.long(), self.codebook).permute(0, 3, 1, 2).contiguous()
