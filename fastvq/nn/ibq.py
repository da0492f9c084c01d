"""IBQ, index backpropagation quantization (Shi et al. 2024, "Taming Scalable Visual Tokenizer for
Autoregressive Image Generation"): SEED-Voken's ``IndexPropagationQuantize`` without its three
``N x K`` matrices."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_real, check_temperature
from ..functional import soft_quantize, soft_quantize_entropy
from .fsq import check_positive_int

# MAGVIT's compute_entropy_loss floors the batch-mean probabilities inside its logarithm by this.
ENTROPY_EPS = 1e-5


class IBQ(nn.Module):
    """A drop-in for SEED-Voken's ``IndexPropagationQuantize`` (its IBQ tokenizer's quantizer).

    The logits are ``z . e_k``; ``p = softmax(logits)`` and the hard code is ``e_{argmax p}``. The
    output's value is the hard code and its gradient flows through the soft assignment, to ``z`` and
    to every code (the reference's ``(hard_one_hot - sg(p) + p) @ C``), here
    ``hard + p @ sg(C) - sg(p @ sg(C))``: ``fastvq.soft_quantize`` streams the codes, so neither
    the logits nor the soft or hard one-hot (``N x K`` each, 12 GiB at 4 096 rows and 2^18 codes)
    exist. The hard code's gradient reaches the chosen codes by an index-add, as the one-hot
    product's does. The loss is the reference's
    ``mean((quantized - z)^2) + mean((sg(e) - z)^2) + beta * mean((e - sg(z))^2)``.

    With ``use_entropy_loss`` the MAGVIT entropy terms of ``softmax(logits / entropy_temperature)``
    come with the soft codes from ``fastvq.soft_quantize_entropy`` (the two softmaxes of one streamed
    logit matrix, each code tile's products computed once for both): the mean per-sample
    entropy, the entropy of the batch-mean assignment ``-sum a log(a + 1e-5)`` and
    ``sample_minimization_weight * sample - batch_maximization_weight * batch``.

    Args (the reference's, in its order):
        n_e: number of codes ``K``.
        e_dim: code dimension ``D``.
        beta: commitment weight.
        use_entropy_loss: also return the entropy terms.
        remap, unknown_index: the reference's index remapping to a subset of used codes, which
            fastvq does not implement: ``remap`` must be ``None``.
        cosine_similarity: the reference accepts this flag and never reads it (its logits are
            always dot products). Here it does what it says: ``z`` and the codes are l2-normalised
            before the logits, the lookups and the losses, so the output is a normalised code.
        entropy_temperature, sample_minimization_weight, batch_maximization_weight: the entropy
            loss's temperature and weights.

    ``embedding`` is an ``nn.Embedding(n_e, e_dim)`` as in the reference, so state dicts load
    either way.
    """

    def __init__(
        self,
        n_e: int,
        e_dim: int,
        beta: float = 0.25,
        use_entropy_loss: bool = False,
        remap: Optional[str] = None,
        unknown_index: str = "random",
        cosine_similarity: bool = False,
        entropy_temperature: float = 0.01,
        sample_minimization_weight: float = 1.0,
        batch_maximization_weight: float = 1.0,
    ):
        super().__init__()
        if remap is not None:
            raise ValueError(f"IBQ: index remapping (remap={remap!r}) is not supported by fastvq; pass remap=None")
        check_positive_int("n_e", n_e)
        check_positive_int("e_dim", e_dim)
        check_temperature("entropy_temperature", entropy_temperature)
        for name, value in (("beta", beta), ("sample_minimization_weight", sample_minimization_weight),
                            ("batch_maximization_weight", batch_maximization_weight)):
            check_real(name, value)
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.use_entropy_loss = use_entropy_loss
        self.remap = remap
        self.unknown_index = unknown_index
        self.re_embed = n_e
        self.cosine_similarity = cosine_similarity
        self.entropy_temperature = entropy_temperature
        self.sample_minimization_weight = sample_minimization_weight
        self.batch_maximization_weight = batch_maximization_weight
        self.embedding = nn.Embedding(n_e, e_dim)

    def codes(self) -> Tensor:
        """The codebook the logits and lookups use (l2-normalised with ``cosine_similarity``)."""
        weight = self.embedding.weight
        return F.normalize(weight, dim=1) if self.cosine_similarity else weight

    def quantize_rows(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor | tuple[Tensor, Tensor, Tensor, Tensor]]:
        """The quantizer on rows ``z [N, e_dim]``: ``(quantized [N, e_dim], indices [N], diff)`` with
        ``diff`` the reference's: the quantization loss, or with ``use_entropy_loss`` the tuple
        ``(quant_loss, sample_entropy, avg_entropy, entropy_loss)``."""
        codebook = self.codes()
        if self.cosine_similarity:
            z = F.normalize(z, dim=1)
        if self.use_entropy_loss:
            # The soft codes and the entropies are two softmaxes of one logit matrix: one op streams it for both.
            soft, indices, row_entropy, mean_probs = soft_quantize_entropy(
                z, codebook, metric="dot", entropy_temperature=self.entropy_temperature, values=codebook.detach()
            )
        else:
            soft, indices, _ = soft_quantize(z, codebook, metric="dot", values=codebook.detach())
        hard = F.embedding(indices, codebook)
        quantized = hard + (soft - soft.detach())
        quant_loss = (
            F.mse_loss(quantized, z) + F.mse_loss(hard.detach(), z) + self.beta * F.mse_loss(hard, z.detach())
        )
        if not self.use_entropy_loss:
            return quantized, indices, quant_loss
        sample_entropy = row_entropy.mean()
        avg_entropy = -(mean_probs * torch.log(mean_probs + ENTROPY_EPS)).sum()
        entropy_loss = self.sample_minimization_weight * sample_entropy - self.batch_maximization_weight * avg_entropy
        return quantized, indices, (quant_loss, sample_entropy, avg_entropy, entropy_loss)

    def forward(self, z: Tensor):
        """``z [B, e_dim, H, W]`` -> ``(z_q [B, e_dim, H, W], diff, (None, None, indices [B*H*W]))``, the
        reference's return structure (``diff`` as in :meth:`quantize_rows`)."""
        if not isinstance(z, Tensor) or z.dim() != 4 or z.shape[1] != self.e_dim:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"IBQ expects z of shape [B, {self.e_dim}, H, W], got {shape}")
        batch, _, height, width = z.shape
        rows = z.permute(0, 2, 3, 1).reshape(-1, self.e_dim)
        quantized, indices, diff = self.quantize_rows(rows)
        z_q = quantized.reshape(batch, height, width, self.e_dim).permute(0, 3, 1, 2)
        return z_q, diff, (None, None, indices)

    def get_codebook_entry(self, indices: Tensor, shape: Optional[tuple[int, int, int, int]]) -> Tensor:
        """The codes of ``indices`` (normalised with ``cosine_similarity``); with ``shape = (B, H, W,
        e_dim)`` reshaped to ``[B, e_dim, H, W]``."""
        z_q = F.embedding(indices, self.codes())
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q
