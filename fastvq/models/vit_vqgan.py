"""ViT-VQGAN stage 1 (Yu et al. 2022, "Vector-quantized Image Modeling with Improved VQGAN").

A Vision Transformer encodes the image's patches, ``fastvq.nn.FactorizedL2Quantizer`` quantizes
every token with an l2-normalised low-dimensional code, and a second Vision Transformer decodes the
tokens back to patches. Both transformers carry fixed 2-D sin-cos position embeddings. The loss
is the paper's ``L_VQ + l2_weight * L2 + logit_laplace_weight * L_logit-Laplace +
perceptual_weight * L_perceptual + adversarial_weight * L_adv`` (weights 1, 0.1, 0.1, 0.1 in the
paper); the perceptual term needs a feature network the caller passes in (nothing is downloaded),
and the adversarial one a discriminator (``PatchDiscriminator`` or any module mapping images to
logits) passed to ``forward``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..functional import nearest_code
from ..nn import FactorizedL2Quantizer
from ._common import check_codes, check_float, check_images, check_positive_int

__all__ = [
    "ViTVQGAN",
    "PatchDiscriminator",
    "sincos_position_embedding_2d",
    "logit_laplace_nll",
    "discriminator_loss",
    "generator_adversarial_loss",
]

ADVERSARIAL_LOSSES = ("hinge", "vanilla")
# DALL-E's squeeze of [0, 1] into [eps, 1 - eps] so the logit of every pixel is finite.
LOGIT_LAPLACE_EPS = 0.1


def sincos_position_embedding_2d(dim: int, height: int, width: int) -> Tensor:
    """Fixed 2-D sin-cos position embeddings ``[height * width, dim]`` (MAE / ViT-VQGAN).

    The first half of the channels encodes the row, the second half the column, each as
    ``[sin(p * w_i), cos(p * w_i)]`` with ``w_i = 10000^(-i / (dim / 4))``. ``dim`` must be a
    multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"the sin-cos position embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                                indexing="ij")

    def axis(positions: Tensor) -> Tensor:
        angles = positions.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([axis(rows), axis(cols)], dim=1).float()


def logit_laplace_nll(x: Tensor, mean_logits: Tensor, log_scale: Tensor, eps: float = LOGIT_LAPLACE_EPS) -> Tensor:
    """Mean negative log-likelihood of pixels ``x`` in ``[0, 1]`` under the logit-Laplace
    distribution (DALL-E, Ramesh et al. 2021) with location ``mean_logits`` and scale
    ``exp(log_scale)``, after squeezing ``x`` into ``[eps, 1 - eps]``. Float32 scalar."""
    squeezed = x.float() * (1 - 2 * eps) + eps
    logit = torch.log(squeezed) - torch.log1p(-squeezed)
    log_scale = log_scale.float()
    nll = (logit - mean_logits.float()).abs() * torch.exp(-log_scale) + log_scale + math.log(2.0)
    nll = nll + torch.log(squeezed * (1 - squeezed))
    return nll.mean()


def generator_adversarial_loss(logits_fake: Tensor, kind: str = "hinge") -> Tensor:
    """The generator's adversarial loss on the discriminator's logits for reconstructions."""
    if kind == "hinge":
        return -logits_fake.float().mean()
    if kind == "vanilla":
        return F.softplus(-logits_fake.float()).mean()
    raise ValueError(f"adversarial loss must be one of {ADVERSARIAL_LOSSES}, got {kind!r}")


def discriminator_loss(logits_real: Tensor, logits_fake: Tensor, kind: str = "hinge") -> Tensor:
    """The discriminator's loss (hinge as VQGAN, or vanilla non-saturating), float32 scalar."""
    if kind == "hinge":
        return 0.5 * (F.relu(1 - logits_real.float()).mean() + F.relu(1 + logits_fake.float()).mean())
    if kind == "vanilla":
        return 0.5 * (F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean())
    raise ValueError(f"adversarial loss must be one of {ADVERSARIAL_LOSSES}, got {kind!r}")


class PatchDiscriminator(nn.Module):
    """A PatchGAN discriminator (pix2pix/VQGAN): ``num_layers`` 4x4 stride-2 convolutions with
    LeakyReLU (GroupNorm after the first), then a 3x3 convolution to one logit per patch.

    ``forward(x [B, C, H, W])`` -> logits ``[B, 1, H / 2**num_layers, W / 2**num_layers]``.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        check_positive_int("in_channels", in_channels)
        check_positive_int("channels", channels)
        check_positive_int("num_layers", num_layers)
        layers: list[nn.Module] = []
        width = in_channels
        for index in range(num_layers):
            out = channels * min(2**index, 8)
            layers.append(nn.Conv2d(width, out, 4, stride=2, padding=1))
            if index > 0:
                layers.append(nn.GroupNorm(min(32, out), out))
            layers.append(nn.LeakyReLU(0.2))
            width = out
        layers.append(nn.Conv2d(width, 1, 3, padding=1))
        self.num_layers = num_layers
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[2] < 2**self.num_layers or x.shape[3] < 2**self.num_layers:
            raise ValueError(
                f"PatchDiscriminator with {self.num_layers} stride-2 layers needs [B, C, H, W] with H, W >= "
                f"{2**self.num_layers}, got shape {tuple(x.shape)}"
            )
        return self.net(x)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.to_qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return self.to_out(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))


class _Transformer(nn.Module):
    """Pre-norm transformer blocks (attention, then a Tanh MLP as enhancing-transformers), then a LayerNorm."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleList([
                nn.Sequential(nn.LayerNorm(dim), _Attention(dim, heads)),
                nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mlp_dim), nn.Tanh(), nn.Linear(mlp_dim, dim)),
            ])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        for attention, mlp in self.blocks:
            x = x + attention(x)
            x = x + mlp(x)
        return self.norm(x)


def _init_weights(module: nn.Module) -> None:
    # JAX ViT's initialisation, which ViT-VQGAN's reference code follows.
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))


class ViTVQGAN(nn.Module):
    """ViT-VQGAN's stage 1: ViT encoder, factorised l2-normalised quantizer, ViT decoder.

    Args:
        image_size: ``(H, W)`` or one int; both must be multiples of ``patch_size``.
        patch_size: side of the square patches; the code map is ``H / patch_size`` by ``W / patch_size``.
        in_channels: image channels ``C``.
        dim, depth, heads, mlp_dim: width, blocks, attention heads and MLP width of each transformer
            (``dim`` a multiple of 4 and of ``heads``).
        codebook_size, codebook_dim, beta: the quantizer's ``K``, lookup dimension and commitment weight.
        codebook: ``"gradient"`` (the paper) or ``"ema"`` (``FactorizedL2Quantizer(ema_update=True)``).
        decay: EMA decay of the codebook (``"ema"``) and of the code-use averages of the
            dead-code replacement.
        dead_code_threshold, kmeans_init: the quantizer's dead-code replacement and k-means
            initialisation (both off by default, as in the paper; see ``FactorizedL2Quantizer``).
        l2_weight, logit_laplace_weight, perceptual_weight, adversarial_weight: loss weights.
        adversarial_loss: ``"hinge"`` or ``"vanilla"``.
        perceptual_network: a module mapping images ``[B, C, H, W]`` in ``[0, 1]`` to a feature
            tensor or a sequence of them; it is frozen and kept in eval mode. The perceptual loss is
            the mean squared difference of the channel-normalised features (LPIPS without its learned
            weights), summed over the feature tensors.

    The decoder predicts, per pixel, the location and log-scale of a logit-Laplace distribution;
    the reconstruction is its median mapped back to ``[0, 1]`` units (unclamped). Inputs should lie
    in ``[0, 1]``.

    ``forward(x, discriminator=None)`` returns a dict: ``reconstruction``, ``loss``, ``recon_loss``
    (the weighted L2, logit-Laplace and perceptual terms), ``vq_loss``, ``l2``, ``logit_laplace``,
    ``perceptual`` and ``adversarial`` (float32 scalars; 0 when a term is off) and ``indices`` (a
    1-tuple with the int64 code map ``[B, H / p, W / p]``). The adversarial term is added only when a
    ``discriminator`` is passed and ``adversarial_weight > 0``; train the discriminator with
    ``discriminator_loss(D(x), D(reconstruction.detach()))``.
    """

    def __init__(
        self,
        image_size: Union[int, Sequence[int]] = 32,
        patch_size: int = 4,
        in_channels: int = 3,
        dim: int = 256,
        depth: int = 4,
        heads: int = 4,
        mlp_dim: int = 1024,
        codebook_size: int = 512,
        codebook_dim: int = 32,
        *,
        beta: float = 0.25,
        codebook: str = "gradient",
        decay: float = 0.99,
        dead_code_threshold: float = 0.0,
        kmeans_init: bool = False,
        l2_weight: float = 1.0,
        logit_laplace_weight: float = 0.1,
        perceptual_weight: float = 0.1,
        adversarial_weight: float = 0.1,
        adversarial_loss: str = "hinge",
        perceptual_network: Optional[nn.Module] = None,
    ):
        super().__init__()
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        check_positive_int("image height", height)
        check_positive_int("image width", width)
        check_positive_int("patch_size", patch_size)
        if height % patch_size or width % patch_size:
            raise ValueError(f"image_size {(height, width)} must be a multiple of patch_size {patch_size}")
        for name, value in (("in_channels", in_channels), ("dim", dim), ("depth", depth), ("heads", heads),
                            ("mlp_dim", mlp_dim), ("codebook_size", codebook_size), ("codebook_dim", codebook_dim)):
            check_positive_int(name, value)
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        for name, value in (("beta", beta), ("l2_weight", l2_weight), ("logit_laplace_weight", logit_laplace_weight),
                            ("perceptual_weight", perceptual_weight), ("adversarial_weight", adversarial_weight)):
            check_float(name, value, minimum=0.0)
        if codebook not in ("gradient", "ema"):
            raise ValueError(f"codebook must be 'gradient' or 'ema', got {codebook!r}")
        if adversarial_loss not in ADVERSARIAL_LOSSES:
            raise ValueError(f"adversarial_loss must be one of {ADVERSARIAL_LOSSES}, got {adversarial_loss!r}")
        self.image_size = (height, width)
        self.patch_size = patch_size
        self.grid = (height // patch_size, width // patch_size)
        self.in_channels = in_channels
        self.codebook_size = codebook_size
        self.l2_weight = float(l2_weight)
        self.logit_laplace_weight = float(logit_laplace_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.adversarial_weight = float(adversarial_weight)
        self.adversarial_loss = adversarial_loss
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.encoder = _Transformer(dim, depth, heads, mlp_dim)
        self.quantizer = FactorizedL2Quantizer(dim, codebook_size, codebook_dim, beta, ema_update=codebook == "ema",
                                               decay=decay, dead_code_threshold=dead_code_threshold,
                                               kmeans_init=kmeans_init)
        self.decoder = _Transformer(dim, depth, heads, mlp_dim)
        self.to_pixels = nn.ConvTranspose2d(dim, 2 * in_channels, patch_size, stride=patch_size)
        self.register_buffer("position", sincos_position_embedding_2d(dim, *self.grid)[None], persistent=False)
        for module in (self.patch_embed, self.encoder, self.decoder, self.to_pixels):
            module.apply(_init_weights)
        self.perceptual_network = perceptual_network
        if perceptual_network is not None:
            perceptual_network.requires_grad_(False)
            perceptual_network.eval()

    def train(self, mode: bool = True) -> "ViTVQGAN":
        super().train(mode)
        if self.perceptual_network is not None:
            self.perceptual_network.eval()
        return self

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return (self.codebook_size,)

    def code_shape(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size, width // self.patch_size

    def _check(self, x: Tensor) -> Tensor:
        x = check_images(x, self.in_channels, self.patch_size, type(self).__name__)
        if tuple(x.shape[2:]) != self.image_size:
            raise ValueError(f"ViTVQGAN was built for {self.image_size} images, got shape {tuple(x.shape)}")
        return x

    def _tokens(self, x: Tensor) -> Tensor:
        return self.encoder(rearrange(self.patch_embed(x), "b d h w -> b (h w) d") + self.position)

    def _pixels(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Decoded tokens -> ``(reconstruction, mean_logits, log_scale)``."""
        out = self.decoder(tokens + self.position)
        out = self.to_pixels(rearrange(out, "b (h w) d -> b d h w", h=self.grid[0]))
        mean_logits, log_scale = out.chunk(2, dim=1)
        reconstruction = (torch.sigmoid(mean_logits) - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)
        return reconstruction, mean_logits, log_scale

    def perceptual_loss(self, x: Tensor, reconstruction: Tensor) -> Tensor:
        """Channel-normalised feature distance under ``perceptual_network`` (0 without one)."""
        if self.perceptual_network is None:
            return x.new_zeros((), dtype=torch.float32)
        real, fake = self.perceptual_network(x), self.perceptual_network(reconstruction)
        if isinstance(real, Tensor):
            real, fake = (real,), (fake,)
        total = x.new_zeros((), dtype=torch.float32)
        for a, b in zip(real, fake):
            difference = F.normalize(a.float(), dim=1, eps=1e-10) - F.normalize(b.float(), dim=1, eps=1e-10)
            total = total + difference.square().sum(1).mean()
        return total

    def forward(self, x: Tensor, discriminator: Optional[nn.Module] = None) -> dict:
        x = self._check(x)
        quantized, vq_loss, indices = self.quantizer(self._tokens(x))
        reconstruction, mean_logits, log_scale = self._pixels(quantized)
        zero = x.new_zeros((), dtype=torch.float32)
        l2 = F.mse_loss(reconstruction.float(), x.float())
        laplace = logit_laplace_nll(x, mean_logits, log_scale) if self.logit_laplace_weight else zero
        perceptual = self.perceptual_loss(x, reconstruction) if self.perceptual_weight else zero
        recon_loss = self.l2_weight * l2 + self.logit_laplace_weight * laplace + self.perceptual_weight * perceptual
        adversarial = zero
        if discriminator is not None and self.adversarial_weight:
            adversarial = generator_adversarial_loss(discriminator(reconstruction), self.adversarial_loss)
        return {
            "reconstruction": reconstruction,
            "loss": recon_loss + vq_loss + self.adversarial_weight * adversarial,
            "recon_loss": recon_loss,
            "vq_loss": vq_loss,
            "l2": l2,
            "logit_laplace": laplace,
            "perceptual": perceptual,
            "adversarial": adversarial,
            "indices": (indices.reshape(x.shape[0], *self.grid),),
        }

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """``x`` -> the int64 code map ``[B, H / p, W / p]``; no state changes."""
        tokens = self._tokens(self._check(x))
        z = F.normalize(self.quantizer.project_in(tokens.reshape(-1, tokens.shape[-1])), dim=-1)
        indices, _ = nearest_code(z, self.quantizer.normalized_codebook().detach(), metric="cosine")
        return indices.reshape(x.shape[0], *self.grid)

    def decode_codes(self, codes: Tensor) -> Tensor:
        """An int64 code map ``[B, H / p, W / p]`` -> images ``[B, C, H, W]``."""
        codes = check_codes(codes, self.codebook_size, 3, type(self).__name__)
        if tuple(codes.shape[1:]) != self.grid:
            raise ValueError(f"ViTVQGAN codes must be [B, {self.grid[0]}, {self.grid[1]}], got {tuple(codes.shape)}")
        return self._pixels(self.quantizer.indices_to_codes(codes.reshape(codes.shape[0], -1)))[0]
