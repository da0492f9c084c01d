"""LlamaGen's image-tokenizer quantizer (FoundationVision/LlamaGen, ``tokenizer/tokenizer_image/vq_model.py``;
also the base of FVQ) on fastvq's ops.

LlamaGen's ``VectorQuantizer`` builds the ``N x K`` matrix of squared distances for the argmin and, for
its entropy loss, the softmax of that matrix divided by 0.01 and its log-softmax (two more ``N x K``
tensors and their gradients). :class:`VectorQuantizer` keeps its constructor, attributes, return tuple,
``get_codebook_entry`` and state_dict keys (``embedding.weight``, and ``codebook_used`` with
``show_usage``), finds the codes with ``fastvq.functional.nearest_code`` and streams the entropy terms
with ``fastvq.functional.soft_entropy`` (``metric="l2"``: the logits ``-|z - e|^2 / 0.01`` are LlamaGen's
``-d / 0.01``), so nothing of size ``N x K`` exists.

Differences from LlamaGen, stated rather than hidden:

- ``codebook_used`` is a plain float32 buffer. LlamaGen registers an ``nn.Parameter`` as the buffer,
  which then requires grad, so its in-place update raises on CPU (a ``.to(device)`` copy to another
  device hides it there); here it is updated without autograd. A batch of more than 65 536 rows keeps
  its last 65 536 indices (LlamaGen fails on the shape mismatch).
- With ``entropy_loss_ratio == 0`` the entropy loss is a zero scalar that is not computed (LlamaGen
  computes the ``N x K`` softmax and multiplies it by 0).
- Bad arguments raise ``ValueError``/``TypeError`` naming the argument.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_real
from ..functional import nearest_code, soft_entropy
from ._adopt import adopt_tensors
from .fsq import check_positive_int

__all__ = ["VectorQuantizer", "ENTROPY_TEMPERATURE", "USAGE_WINDOW"]

# LlamaGen's compute_entropy_loss: the softmax temperature and the floor inside the batch entropy's log.
ENTROPY_TEMPERATURE = 0.01
ENTROPY_EPS = 1e-5
# The number of most recent code indices ``codebook_used`` remembers.
USAGE_WINDOW = 65536

Losses = tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Union[float, int]]


class VectorQuantizer(nn.Module):
    """LlamaGen's ``VectorQuantizer``: VQGAN's quantizer with optionally l2-normalised codes, an entropy
    loss and a running codebook-usage count.

    Args (LlamaGen's, all positional and required, in its order):
        n_e: number of codes ``K`` (LlamaGen: 16 384).
        e_dim: code dimension ``D``, the channel count of the input (LlamaGen: 8).
        beta: commitment weight.
        entropy_loss_ratio: weight of the entropy loss ``sample_entropy - batch_entropy`` of
            ``softmax(-|z - e|^2 / 0.01)``.
        l2_norm: l2-normalise ``z`` and the codes before the search, the losses and the output.
        show_usage: keep the buffer ``codebook_used`` (the last 65 536 chosen indices, as floats) and
            return the fraction of codes among them in training.

    The codebook ``embedding.weight`` ``[n_e, e_dim]`` starts uniform in ``[-1/n_e, 1/n_e]`` (then
    normalised with ``l2_norm``), as in LlamaGen.

    ``forward(z)`` takes ``z [B, e_dim, H, W]`` (float32, float16, bfloat16 or float64) and returns
    ``(z_q, (vq_loss, commit_loss, entropy_loss, codebook_usage), (None, None, indices))``:

    - ``z_q [B, e_dim, H, W]``: the chosen (normalised) codes, with the straight-through gradient to
      the (normalised) ``z``; a channels-last view, as LlamaGen's;
    - in training, ``vq_loss = mean((z_q - sg[z])^2)`` (to the codebook), ``commit_loss = beta *
      mean((sg[z_q] - z)^2)`` and ``entropy_loss = entropy_loss_ratio * (mean_n H(p_n) - H(mean_n
      p_n))`` with ``p_n = softmax(-|z_n - e|^2 / 0.01)``, ``H(p) = -sum p log p`` per row and ``-sum
      a log(a + 1e-5)`` for the batch mean ``a``: scalars in ``z``'s dtype (float32 for float16 and
      bfloat16 input); ``codebook_usage`` a Python float with ``show_usage``, else 0. In eval mode
      the three losses are ``None`` and ``codebook_usage`` is 0, as in LlamaGen;
    - ``indices``: int64 ``[B*H*W]``.

    ``codebook_usage`` counts the distinct codes in ``codebook_used``, which needs a host
    synchronisation (as LlamaGen's ``torch.unique``).

    Raises:
        ValueError: non-positive sizes, non-finite ``beta`` or ``entropy_loss_ratio``; in ``forward``,
            ``z`` not shaped ``[B, e_dim, H, W]``.
        TypeError: a non-tensor or non-float ``z``.
    """

    def __init__(self, n_e: int, e_dim: int, beta: float, entropy_loss_ratio: float, l2_norm: bool,
                 show_usage: bool):
        super().__init__()
        check_positive_int("n_e", n_e)
        check_positive_int("e_dim", e_dim)
        check_real("beta", beta)
        check_real("entropy_loss_ratio", entropy_loss_ratio)
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.entropy_loss_ratio = entropy_loss_ratio
        self.l2_norm = l2_norm
        self.show_usage = show_usage
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        if l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, p=2, dim=-1)
        if show_usage:
            self.register_buffer("codebook_used", torch.zeros(USAGE_WINDOW))

    @classmethod
    def from_original(cls, module: nn.Module) -> "VectorQuantizer":
        """The fastvq equivalent of a LlamaGen ``VectorQuantizer``: same configuration, same state
        (strictly loaded), on the same device and in the same dtype and training mode."""
        weight = module.embedding.weight
        layer = cls(module.n_e, module.e_dim, module.beta, module.entropy_loss_ratio, module.l2_norm,
                    module.show_usage)
        layer.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.load_state_dict({key: value.detach() for key, value in module.state_dict().items()}, strict=True)
        layer = adopt_tensors(layer.train(module.training), module)
        if "codebook_used" in layer._buffers:
            # LlamaGen registers an nn.Parameter as this buffer, which in-place usage updates cannot write: fastvq
            # keeps a plain tensor of the same values (a usage counter, which no optimizer holds).
            layer.codebook_used = module.codebook_used.detach().clone()
        return layer

    def codes(self) -> Tensor:
        """The codebook the search and the lookups use: ``[n_e, e_dim]``, l2-normalised with ``l2_norm``."""
        weight = self.embedding.weight
        return F.normalize(weight, p=2, dim=-1) if self.l2_norm else weight

    def forward(self, z: Tensor) -> tuple[Tensor, Losses, tuple[None, None, Tensor]]:
        if not isinstance(z, Tensor):
            raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
        if not z.is_floating_point():
            raise TypeError(f"z must be a floating-point tensor, got dtype {z.dtype} with shape {tuple(z.shape)}")
        if z.dim() != 4 or z.shape[1] != self.e_dim:
            raise ValueError(f"z must be a feature map [B, e_dim={self.e_dim}, H, W], got shape {tuple(z.shape)}")
        z = z.permute(0, 2, 3, 1)
        if self.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
        rows = z.reshape(-1, self.e_dim)
        codebook = self.codes()
        indices, _ = nearest_code(rows.detach(), codebook.detach(), metric="l2")
        z_q = F.embedding(indices, codebook).view(z.shape)

        vq_loss = commit_loss = entropy_loss = None
        codebook_usage: Union[float, int] = 0
        if self.show_usage and self.training:
            codebook_usage = self._record_usage(indices)
        if self.training:
            vq_loss = torch.mean((z_q - z.detach()) ** 2)
            commit_loss = self.beta * torch.mean((z_q.detach() - z) ** 2)
            entropy_loss = self._entropy_loss(rows, codebook)

        z_q = z + (z_q - z).detach()
        z_q = z_q.permute(0, 3, 1, 2)
        return z_q, (vq_loss, commit_loss, entropy_loss, codebook_usage), (None, None, indices)

    def _record_usage(self, indices: Tensor) -> float:
        """Shifts ``indices`` into the window of recent codes; the fraction of codes the window holds."""
        with torch.no_grad():
            recent = indices[-USAGE_WINDOW:].to(self.codebook_used.dtype)
            self.codebook_used.copy_(torch.cat([self.codebook_used[recent.shape[0]:], recent]))
        return len(torch.unique(self.codebook_used)) / self.n_e

    def _entropy_loss(self, rows: Tensor, codebook: Tensor) -> Tensor:
        if self.entropy_loss_ratio == 0:
            return rows.new_zeros((), dtype=torch.promote_types(rows.dtype, torch.float32))
        row_entropy, mean_probs = soft_entropy(rows, codebook, metric="l2", temperature=ENTROPY_TEMPERATURE)
        batch_entropy = -torch.sum(mean_probs * torch.log(mean_probs + ENTROPY_EPS))
        return self.entropy_loss_ratio * (row_entropy.mean() - batch_entropy)

    def get_codebook_entry(self, indices: Tensor, shape: Optional[tuple[int, int, int, int]] = None,
                           channel_first: bool = True) -> Tensor:
        """The (normalised) codes of ``indices``: ``[*indices.shape, e_dim]`` when ``shape`` is None; for
        ``shape = (B, e_dim, H, W)`` (``channel_first``) the map ``[B, e_dim, H, W]``, else ``shape`` itself
        (``(B, H, W, e_dim)``), as LlamaGen."""
        z_q = F.embedding(indices, self.codes())
        if shape is None:
            return z_q
        if channel_first:
            return z_q.reshape(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2).contiguous()
        return z_q.view(shape)
