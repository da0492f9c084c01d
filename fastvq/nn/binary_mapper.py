"""``BinaryMapper``: vector-quantize-pytorch's binary mapper (Fleuret 2025, arXiv 2510.17558).

``bits`` logits per position are sampled as independent Bernoulli bits and returned as a one-hot
over the ``2^bits`` codes, with a straight-through gradient through the codes' probabilities
``prod_b sigmoid(+-l_b)`` and a KL aux loss that keeps each position's bit entropy above a
threshold. The output itself is ``[..., 2^bits]``; fastvq builds the probabilities as the product
of two half-width tables (as the code entropy op does) instead of summing ``bits`` log terms per
code. Names, arguments, defaults and return structures are vector-quantize-pytorch 1.32's.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_real
from .errors import raises_config_error
from .fsq import check_float_input, check_positive_int

__all__ = ["BinaryMapper", "binary_entropy"]

NAT = math.log(2)


def binary_entropy(logits: Tensor) -> Tensor:
    """The summed entropy of independent bits with ``logits [..., bits]``, in nats: ``[...]``."""
    prob = logits.sigmoid()
    return -(prob * F.logsigmoid(logits) + (1.0 - prob) * F.logsigmoid(-logits)).sum(dim=-1)


def _code_probs(logits: Tensor) -> Tensor:
    """``[M, bits]`` -> ``[M, 2^bits]``, code ``c`` having bit ``b`` of ``c`` (least significant first)."""
    probs = logits.new_ones((logits.shape[0], 1))
    for bit in reversed(range(logits.shape[-1])):
        pair = torch.stack((torch.sigmoid(-logits[:, bit]), torch.sigmoid(logits[:, bit])), dim=-1)
        probs = (probs[:, :, None] * pair[:, None, :]).flatten(1)
    return probs


class BinaryMapper(nn.Module):
    """Binary mapper, a drop-in for vector-quantize-pytorch's ``BinaryMapper(bits=1,
    kl_loss_threshold=log 2, deterministic_on_eval=False)``.

    ``forward(logits [..., bits], temperature=1.0, straight_through=None (training),
    calc_aux_loss=None (training), deterministic=None, return_indices=False,
    reduce_aux_kl_loss=True)`` samples bits from ``sigmoid(logits / temperature)`` (or thresholds
    them at 0.5 when deterministic, by default in eval mode with ``deterministic_on_eval``) and
    returns ``(one_hot [..., 2^bits], aux_kl_loss)`` or ``(one_hot, indices [...], aux_kl_loss)``.
    Code ``c``'s bit ``b`` is bit ``b`` of ``c`` (least significant first, as theirs). With
    ``straight_through`` the one-hot carries the gradient of the codes' probabilities. The aux loss
    is ``relu(bits log 2 - H(bits) - kl_loss_threshold)``, averaged unless
    ``reduce_aux_kl_loss=False``.

    ``log_prob(logits, *, indices=None, one_hot=None, sum_bits=True)`` is the log-probability of
    given codes; ``calc_aux_loss(logits, reduce_aux_kl_loss=True)`` the aux loss alone.

    Raises:
        ValueError: ``bits < 1``, logits whose last axis is not ``bits``, or neither / both of
            ``indices`` and ``one_hot``.
    """

    @raises_config_error
    def __init__(self, bits: int = 1, kl_loss_threshold: float = NAT, deterministic_on_eval: bool = False):
        super().__init__()
        check_positive_int("bits", bits)
        check_real("kl_loss_threshold", kl_loss_threshold)
        self.bits = bits
        self.num_codes = 2**bits
        power_two = 2 ** torch.arange(bits)
        self.register_buffer("power_two", power_two, persistent=False)
        self.register_buffer("codes", (torch.arange(self.num_codes)[:, None] & power_two) != 0, persistent=False)
        self.kl_loss_threshold = kl_loss_threshold
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)
        self.deterministic_on_eval = deterministic_on_eval

    def binary_entropy(self, logits: Tensor) -> Tensor:
        return binary_entropy(logits)

    def _check(self, logits: object) -> Tensor:
        logits = check_float_input(logits, "logits")
        if logits.dim() < 1 or logits.shape[-1] != self.bits:
            raise ValueError(f"logits must have a last dimension of {self.bits}, got shape {tuple(logits.shape)}")
        return logits

    def calc_aux_loss(self, logits: Tensor, reduce_aux_kl_loss: bool = True) -> Tensor:
        logits = self._check(logits)
        kl_div = self.bits * NAT - self.binary_entropy(logits)
        aux_kl_loss = F.relu(kl_div - self.kl_loss_threshold)
        return aux_kl_loss.mean() if reduce_aux_kl_loss else aux_kl_loss

    def log_prob(self, logits: Tensor, *, indices: Optional[Tensor] = None, one_hot: Optional[Tensor] = None,
                 sum_bits: bool = True) -> Tensor:
        logits = self._check(logits)
        if (indices is None) == (one_hot is None):
            raise ValueError("give exactly one of indices and one_hot")
        if one_hot is not None:
            indices = one_hot.argmax(dim=-1)
        sampled_bits = self.codes[indices.long()]
        log_probs = torch.where(sampled_bits, F.logsigmoid(logits), F.logsigmoid(-logits))
        return log_probs.sum(dim=-1) if sum_bits else log_probs

    def forward(
        self,
        logits: Tensor,
        temperature: float = 1.0,
        straight_through: Optional[bool] = None,
        calc_aux_loss: Optional[bool] = None,
        deterministic: Optional[bool] = None,
        return_indices: bool = False,
        reduce_aux_kl_loss: bool = True,
    ):
        logits = self._check(logits)
        deterministic = self.deterministic_on_eval and not self.training if deterministic is None else deterministic
        straight_through = self.training if straight_through is None else straight_through
        calc_aux_loss = self.training if calc_aux_loss is None else calc_aux_loss
        leading = logits.shape[:-1]
        flat = logits.reshape(-1, self.bits)
        prob_for_sample = (flat / temperature).sigmoid()
        if deterministic:
            sampled_bits = (prob_for_sample > 0.5).long()
        else:
            sampled_bits = prob_for_sample.bernoulli().long()
        indices = (self.power_two * sampled_bits).sum(dim=-1)
        one_hot = F.one_hot(indices, self.num_codes).float()
        aux_kl_loss = self.calc_aux_loss(logits, reduce_aux_kl_loss=reduce_aux_kl_loss) if calc_aux_loss else self.zero
        if straight_through:
            soft = _code_probs(flat)
            one_hot = one_hot + soft - soft.detach()
        one_hot = one_hot.reshape(*leading, self.num_codes)
        indices = indices.reshape(leading)
        if not return_indices:
            return one_hot, aux_kl_loss
        return one_hot, indices, aux_kl_loss
