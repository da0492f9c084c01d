"""TencentARC/SEED-Voken's quantizers on fastvq's ops: IBQ's ``IndexPropagationQuantize``
(``src/IBQ/modules/vqvae/quantize.py``) and Open-MAGVIT2's ``LFQ``
(``src/Open_MAGVIT2/modules/vqvae/lookup_free_quantize.py``).

Both tokenizers train with 2^18 codes, and both originals build ``N x 2^18`` tensors per step: IBQ its
logits, softmax, hard and straight-through one-hots (and, with the entropy loss, the tempered softmax and
log-softmax), Open-MAGVIT2 the logits against all ``2^18`` corners of the cube, their softmax and
log-softmax. Here IBQ streams the codebook through ``fastvq.functional.soft_quantize_entropy`` (the soft
codes and the entropies from one logit matrix), and LFQ takes its per-sample entropy as a sum of per-bit
binary entropies (exact: the softmax over the cube's corners is a product over bits) and its batch-mean
distribution from ``fastvq.functional.code_entropy`` (``N x 2^(d/2)`` per chunk), so nothing of size
``N x 2^18`` exists. Constructor arguments, attributes, return structures and state_dict keys are SEED-Voken's;
``tests/nn/test_seed_voken.py`` compares both with SEED-Voken's own files.
"""

from __future__ import annotations

import math
from collections import namedtuple
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_real
from ..functional import code_entropy
from ._adopt import adopt_tensors
from .fsq import check_float_input, check_positive_int
from .ibq import IBQ

__all__ = ["IndexPropagationQuantize", "LFQ", "LossBreakdown"]

LossBreakdown = namedtuple("LossBreakdown", ["per_sample_entropy", "codebook_entropy", "commitment", "avg_probs"])

# MAGVIT's entropy loss: the floor inside the batch entropy's log.
ENTROPY_EPS = 1e-5


class IndexPropagationQuantize(IBQ):
    """SEED-Voken's ``IndexPropagationQuantize``, IBQ's quantizer: :class:`fastvq.nn.IBQ` under its name.

    Same arguments (``n_e, e_dim, beta=0.25, use_entropy_loss=False, remap=None,
    unknown_index="random", cosine_similarity=False, entropy_temperature=0.01,
    sample_minimization_weight=1.0, batch_maximization_weight=1.0``), attributes, state_dict
    (``embedding.weight``) and returns: ``forward(z [B, e_dim, H, W])`` gives ``(z_q [B, e_dim, H, W],
    diff, (None, None, indices [B*H*W]))`` with ``diff`` the quantization loss, or with
    ``use_entropy_loss`` ``(quant_loss, sample_entropy, avg_entropy, entropy_loss)``;
    ``get_codebook_entry(indices, shape)`` as SEED-Voken's. See :class:`fastvq.nn.IBQ` for the math.

    Two differences, where SEED-Voken's code does not do what it says: ``remap`` must be ``None``
    (SEED-Voken's constructor fails on it too, reading an attribute it never set), and
    ``cosine_similarity=True`` l2-normalises ``z`` and the codes (SEED-Voken stores the flag and never
    reads it; its published configurations leave it ``False``, where the two agree).
    """

    @classmethod
    def from_original(cls, module: nn.Module) -> "IndexPropagationQuantize":
        """The fastvq equivalent of a SEED-Voken ``IndexPropagationQuantize``: same configuration, same
        state (strictly loaded), on the same device and in the same dtype and training mode."""
        weight = module.embedding.weight
        layer = cls(module.n_e, module.e_dim, module.beta, module.use_entropy_loss, module.remap,
                    module.unknown_index if module.remap is not None else "random", module.cosine_similarity,
                    module.entropy_temperature, module.sample_minimization_weight, module.batch_maximization_weight)
        layer.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.load_state_dict(module.state_dict(), strict=True)
        return adopt_tensors(layer.train(module.training), module)


def _binary_entropy_of_logit(logit: Tensor) -> Tensor:
    """``H(sigmoid(l))`` in nats, as ``softplus(-|l|) + |l| sigmoid(-|l|)``: no cancellation at large ``|l|``."""
    magnitude = logit.abs()
    return F.softplus(-magnitude) + magnitude * torch.sigmoid(-magnitude)


class LFQ(nn.Module):
    """Open-MAGVIT2's lookup-free quantizer (SEED-Voken's ``LFQ``), with its entropy loss streamed.

    Each of the ``codebook_dim = log2(codebook_size)`` channels of a code is quantized to its sign
    (``+-1``); the index is the bit pattern, bit ``b`` (channel ``b``) worth ``2^b``. With
    ``token_factorization`` the bits are split in two indices, the first ``factorized_bits[0]``
    channels and the rest, each counted from its own first channel.

    Args (keyword only, SEED-Voken's):
        dim: channels of the input, ``codebook_dim * num_codebooks`` (the default). SEED-Voken has no
            projection, so any other value is refused here (it fails in its forward).
        codebook_size: ``2^d`` codes, a power of two (default ``2^(dim / num_codebooks)``).
        num_codebooks: ``c`` groups of ``d`` channels, each quantized alone.
        sample_minimization_weight, batch_maximization_weight: the entropy loss is
            ``sample_minimization_weight * per_sample_entropy - batch_maximization_weight * codebook_entropy``.
        token_factorization: return ``(indices_pre, indices_post)`` for the two groups of bits.
        factorized_bits: the two groups' sizes, summing to ``d`` (default ``[9, 9]``).

    No parameters; the buffers (``mask`` or ``pre_mask``/``post_mask``, ``zero``) are not persistent,
    so the state_dict is empty, as SEED-Voken's. SEED-Voken also keeps every code in the buffer
    ``codebook`` (``[2^d, d]``, 19 MiB at 2^18 codes); here :attr:`codebook` is computed when read.

    ``forward(x, inv_temperature=100., return_loss_breakdown=False, mask=None, return_loss=True)``
    takes ``x [B, dim, ...]`` (float32, float16, bfloat16 or float64) and returns ``(quantized,
    entropy_aux_loss, indices)`` and, with ``return_loss_breakdown``, that tuple and
    ``LossBreakdown(per_sample_entropy, codebook_entropy, commitment, avg_probs)``:

    - ``quantized``: ``x``'s shape and dtype, the signs, with the straight-through gradient to ``x``;
    - ``indices``: int64, flat ``[B * positions * num_codebooks]`` (with ``token_factorization`` a
      pair of such tensors);
    - in training (and ``return_loss``): the entropy terms of ``p_n = softmax(2 x_n . c /
      temperature)`` over every code ``c``, ``temperature = 1 / inv_temperature``:
      ``per_sample_entropy = mean_n H(p_n)``, ``codebook_entropy = -sum a log(a + 1e-5)`` for ``a =
      mean_n p_n`` (``n`` over the rows of every codebook group), and ``entropy_aux_loss`` as above;
      scalars, float32 (float64 for float64 input); otherwise the ``zero`` buffer;
    - in training, ``commitment = mean((x - sg[quantized])^2)`` over the positions ``mask [B,
      positions]`` keeps (all without a mask); otherwise ``zero``. ``avg_probs`` is always ``zero``.

    ``inv_temperature``: SEED-Voken takes it and ignores it (its temperature is always 0.01, its
    default ``1 / 100``); here it sets the temperature, so the two agree at the default.

    Raises:
        ValueError: a ``codebook_size`` that is not a power of two, ``dim`` not ``codebook_dim *
            num_codebooks``, ``factorized_bits`` not summing to ``codebook_dim``, non-finite weights; in
            ``forward``, ``x`` with fewer than 2 dimensions or ``dim`` channels, or a non-positive
            ``inv_temperature``.
        TypeError: a non-tensor or non-float ``x``.
    """

    def __init__(
        self,
        *,
        dim: Optional[int] = None,
        codebook_size: Optional[int] = None,
        num_codebooks: int = 1,
        sample_minimization_weight: float = 1.0,
        batch_maximization_weight: float = 1.0,
        token_factorization: bool = False,
        factorized_bits: Sequence[int] = (9, 9),
    ):
        super().__init__()
        if dim is None and codebook_size is None:
            raise ValueError("LFQ needs dim or codebook_size")
        check_positive_int("num_codebooks", num_codebooks)
        if codebook_size is None:
            codebook_size = 2 ** (check_positive_int("dim", dim) // num_codebooks)
        check_positive_int("codebook_size", codebook_size)
        if codebook_size < 2 or codebook_size & (codebook_size - 1):
            suggestion = 2 ** math.ceil(math.log2(codebook_size))
            raise ValueError(
                f"codebook_size must be a power of 2 (>= 2) for lookup-free quantization, got {codebook_size} "
                f"(suggested {suggestion})"
            )
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_size.bit_length() - 1
        self.num_codebooks = num_codebooks
        codebook_dims = self.codebook_dim * num_codebooks
        dim = codebook_dims if dim is None else check_positive_int("dim", dim)
        if dim != codebook_dims:
            raise ValueError(
                f"dim must be log2(codebook_size) * num_codebooks = {codebook_dims} (SEED-Voken's LFQ has no "
                f"projection), got dim={dim}"
            )
        self.dim = dim
        self.has_projections = False
        self.sample_minimization_weight = check_real("sample_minimization_weight", sample_minimization_weight)
        self.batch_maximization_weight = check_real("batch_maximization_weight", batch_maximization_weight)
        self.token_factorization = token_factorization
        if token_factorization:
            factorized_bits = list(factorized_bits)
            if len(factorized_bits) != 2 or sum(factorized_bits) != self.codebook_dim or min(factorized_bits) < 1:
                raise ValueError(
                    f"factorized_bits must be two positive sizes summing to log2(codebook_size) = {self.codebook_dim}, "
                    f"got {factorized_bits}"
                )
            self.factorized_bits = factorized_bits
            self.register_buffer("pre_mask", 2 ** torch.arange(factorized_bits[0]), persistent=False)
            self.register_buffer("post_mask", 2 ** torch.arange(factorized_bits[1]), persistent=False)
        else:
            self.register_buffer("mask", 2 ** torch.arange(self.codebook_dim), persistent=False)
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)

    @classmethod
    def from_original(cls, module: nn.Module) -> "LFQ":
        """The fastvq equivalent of a SEED-Voken ``LFQ``: same configuration, on the same device and in the
        same dtype and training mode (it has no state to load)."""
        layer = cls(dim=module.dim, codebook_size=module.codebook_size, num_codebooks=module.num_codebooks,
                    sample_minimization_weight=module.sample_minimization_weight,
                    batch_maximization_weight=module.batch_maximization_weight,
                    token_factorization=module.token_factorization,
                    factorized_bits=getattr(module, "factorized_bits", (9, 9)))
        layer.to(device=module.zero.device, dtype=module.zero.dtype)
        layer.load_state_dict(module.state_dict(), strict=True)
        return adopt_tensors(layer.train(module.training), module)

    @property
    def dtype(self) -> torch.dtype:
        return self.zero.dtype

    @property
    def codebook(self) -> Tensor:
        """Every code ``[codebook_size, codebook_dim]`` (``+-1``, index order), computed when read."""
        codes = torch.arange(self.codebook_size, device=self.zero.device)
        return self.indices_to_bits(codes).to(self.dtype) * 2 - 1

    def _weights(self, num_bits: int) -> Tensor:
        return 2 ** torch.arange(num_bits, device=self.zero.device, dtype=torch.long)

    def indices_to_bits(self, x: Tensor) -> Tensor:
        """Indices (int) -> their ``codebook_dim`` bits, bool ``[*x.shape, codebook_dim]``, bit ``b`` worth ``2^b``."""
        return (x.unsqueeze(-1) & self._weights(self.codebook_dim).to(x.device)) != 0

    def bits_to_indices(self, bits: Tensor) -> Tensor:
        """Bits ``[..., codebook_dim]`` (bool or 0/1) -> int64 indices ``[...]``."""
        if bits.shape[-1] != self.codebook_dim:
            raise ValueError(
                f"bits must have {self.codebook_dim} entries in the last dimension, got shape {tuple(bits.shape)}"
            )
        return (bits.long() * self._weights(self.codebook_dim).to(bits.device)).sum(-1)

    def decode(self, x: Tensor) -> Tensor:
        """Indices ``[..., num_codebooks]`` -> codes ``[..., num_codebooks * codebook_dim]`` (``+-1``, ``dtype``)."""
        codes = self.indices_to_bits(x).to(self.dtype) * 2 - 1
        return codes.flatten(-2)

    def get_codebook_entry(self, x: Tensor, bhwc: Sequence[int], order: Optional[str] = None) -> Tensor:
        """Indices ``x [B, H*W]`` -> codes ``[B, C, H, W]`` (float32 ``+-1``) for ``bhwc = (B, H, W, C)``, ``C``
        the bits of the index: ``codebook_dim``, or with ``token_factorization`` ``factorized_bits[0]``
        for ``order="pre"`` and ``factorized_bits[1]`` otherwise."""
        if self.token_factorization:
            num_bits = self.factorized_bits[0] if order == "pre" else self.factorized_bits[1]
        else:
            num_bits = self.codebook_dim
        codes = ((x.unsqueeze(-1) & self._weights(num_bits).to(x.device)) != 0) * 2.0 - 1.0
        batch, height, width, channels = bhwc
        return codes.reshape(batch, height, width, channels).permute(0, 3, 1, 2)

    def _indices(self, signs: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """``signs [B, n, c, d]`` (bool, positive) -> flat int64 indices (a pair with token factorization)."""
        bits = signs.long()
        if not self.token_factorization:
            return (bits * self.mask).sum(-1).flatten()
        split = self.factorized_bits[0]
        indices_pre = (bits[..., :split] * self.pre_mask).sum(-1).flatten()
        indices_post = (bits[..., split:] * self.post_mask).sum(-1).flatten()
        return indices_pre, indices_post

    def _entropy_terms(self, rows: Tensor, inv_temperature: float) -> tuple[Tensor, Tensor, Tensor]:
        """The entropy terms of ``rows [B, n, c, d]`` over all ``2^d`` codes.

        The logit of code ``c`` (bits ``c_b``, codes ``2 c_b - 1``) is ``2 x . (2 c - 1) / T``, which is
        ``sum_b c_b (4 x_b / T)`` up to a constant per row: ``p`` is a product of independent bits with
        logits ``4 x_b / T``, so each row's entropy is the sum of the bits' binary entropies.
        """
        bit_logits = rows.flatten(0, 1) * (4.0 * inv_temperature)
        entropy_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
        per_sample_entropy = _binary_entropy_of_logit(bit_logits.to(entropy_dtype)).sum(-1).mean()
        _, avg_probs = code_entropy(bit_logits, eps=ENTROPY_EPS)
        avg_probs = avg_probs.mean(0)  # every group has the same rows: the mean over all (row, group) pairs
        codebook_entropy = -torch.sum(avg_probs * torch.log(avg_probs + ENTROPY_EPS))
        loss = self.sample_minimization_weight * per_sample_entropy - self.batch_maximization_weight * codebook_entropy
        return per_sample_entropy, codebook_entropy, loss

    def forward(
        self,
        x: Tensor,
        inv_temperature: float = 100.0,
        return_loss_breakdown: bool = False,
        mask: Optional[Tensor] = None,
        return_loss: bool = True,
    ):
        x = check_float_input(x)
        if x.dim() < 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be [B, dim={self.dim}, ...], got shape {tuple(x.shape)}")
        inv_temperature = check_real("inv_temperature", inv_temperature, above=0.0)
        channels_last = x.movedim(1, -1)
        rows = channels_last.reshape(x.shape[0], -1, self.num_codebooks, self.codebook_dim)
        positive = rows > 0
        signs = torch.where(positive, 1.0, -1.0).to(rows.dtype)
        indices = self._indices(positive)

        if self.training and return_loss:
            per_sample_entropy, codebook_entropy, entropy_aux_loss = self._entropy_terms(rows, inv_temperature)
        else:
            per_sample_entropy = codebook_entropy = entropy_aux_loss = self.zero
        if self.training:
            commitment = (rows - signs) ** 2
            if mask is not None:
                commitment = commitment[mask]
            commitment = commitment.mean()
        else:
            commitment = self.zero

        quantized = rows + (signs - rows).detach()
        quantized = quantized.reshape(channels_last.shape).movedim(-1, 1)
        result = (quantized, entropy_aux_loss, indices)
        if not return_loss_breakdown:
            return result
        return result, LossBreakdown(per_sample_entropy, codebook_entropy, commitment, self.zero)
