"""OptVQ's quantizers (Zhang et al. 2024, zbr17/OptVQ ``optvq.models.quantizer``) on fastvq's ops.

``VectorQuantizer``, ``VectorQuantizerSinkhorn`` and ``Identity`` keep OptVQ's constructor arguments (in
order), attribute names, state_dict keys (``embedding.weight``; ``proj.weight``, ``proj.bias`` with
``use_proj``), input layouts (``(B, C, H, W)`` or ``(B, T, C)``) and returns ``(x_q, loss, indices)``, so an
OptVQ checkpoint loads and its training loop runs unchanged. OptVQ builds the ``N x K`` ``torch.cdist`` matrix
for the search, for its cross-entropy loss and for ``sinkhorn``'s plan; here:

- the nearest code is ``fastvq.functional.nearest_code`` (Euclidean distance, the same argmin as ``cdist``);
- ``VectorQuantizerSinkhorn``'s assignment is ``fastvq.functional.sinkhorn_assign`` with OptVQ's options
  (``metric="euclidean"``, ``normalize_mode="all"`` as ``normalize="standardize"``, ``"dim"`` as an
  ``epsilon`` scaled by ``sqrt(dim)``, ``order="columns_first"``, ``epsilon = 1 / OptVQ's epsilon`` and its
  ``1e-8`` guard as ``sum_eps``), fused passes that never build the plan;
- the ``"ce"`` loss ``cross_entropy(-cdist, indices)`` is ``mean(lse + d)`` with ``lse`` the log-sum-exp
  over codes of ``-cdist`` from ``fastvq.functional.soft_quantize`` (``metric="euclidean"``), whose backward
  recomputes the probabilities tile by tile, and ``d`` the distance to the chosen code.

Differences from OptVQ, stated rather than hidden:

- the statistics logging (``optvq.utils.logger``) is not reproduced; ``start_quantize_steps`` compares with
  the attribute ``total_steps`` (0 at construction; a training loop sets it, where OptVQ reads its logger's
  global step);
- ``use_prob=True`` draws each row's code from its row of the plan with ``torch.multinomial`` on row chunks of
  at most ``CHUNK_BYTES`` (OptVQ: one call on the whole ``N x K`` plan): the same distribution, and the same
  draws whenever the batch fits one chunk;
- the ``"ce"`` loss floors each squared distance at ``1e-8`` inside its log-sum-exp (``soft_quantize``'s
  euclidean logits), so it differs from OptVQ's where a row lies within ``1e-4`` of a code;
- under ``torch.distributed`` the cost's statistics are those of all ranks' rows, so the assignment is the
  one a single process computes on the concatenated batch (OptVQ standardises each rank's costs with its own
  statistics before the synchronised iteration);
- bad arguments raise ``ValueError`` naming the argument (OptVQ asserts or fails inside a matmul).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..backends.common import CHUNK_BYTES
from ..ops.search import nearest_code
from ..ops.sinkhorn import sinkhorn_assign, sinkhorn_cost_stats
from ..ops.soft_quantize import soft_quantize

__all__ = ["VectorQuantizer", "VectorQuantizerSinkhorn", "Identity", "LOSS_TYPES", "NORMALIZE_MODES"]

LOSS_TYPES = ("ce", "l2", "l1")
NORMALIZE_MODES = ("all", "dim", "null")
# OptVQ's guard: every sum its exp-domain Sinkhorn divides by has this added.
OPTVQ_SUM_EPS = 1e-8


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class VectorQuantizer(nn.Module):
    """OptVQ's plain quantizer: nearest code by Euclidean distance, straight-through output.

    Args (OptVQ's, in its order):
        n_e: codebook size ``K``. e_dim: channels ``C`` of the input.
        beta: weight of the codebook term of the ``"l2"``/``"l1"`` losses.
        use_norm: must be False (OptVQ asserts it).
        use_proj: the codebook is ``proj(embedding.weight)``, a linear map initialised with std ``code_dim**-0.5``.
        fix_codes: freeze ``embedding.weight``.
        loss_q_type: ``"ce"`` (cross-entropy of ``-distance`` against the chosen code), ``"l2"`` or ``"l1"``.
        num_head: split each vector into this many heads of ``e_dim // num_head`` channels, each quantized alone.
        start_quantize_steps: while training and ``total_steps`` is below it, the input passes unquantized.

    ``forward(x)`` takes ``(B, C, H, W)`` or ``(B, T, C)`` (any float dtype, computed in float32) and returns
    ``(x_q, loss, indices)``: ``x_q`` in ``x``'s layout, ``loss`` a float32 scalar, ``indices`` int64
    ``(B, T, num_head)``, or ``(B, num_head, H, W)`` for an image input (OptVQ's shapes).
    """

    def __init__(self, n_e: int = 1024, e_dim: int = 128, beta: float = 1.0, use_norm: bool = False,
                 use_proj: bool = True, fix_codes: bool = False, loss_q_type: str = "ce", num_head: int = 1,
                 start_quantize_steps: Optional[int] = None):
        super().__init__()
        self.n_e = _positive_int("n_e", n_e)
        self.e_dim = _positive_int("e_dim", e_dim)
        self.num_head = _positive_int("num_head", num_head)
        if e_dim % num_head:
            raise ValueError(f"e_dim must be divisible by num_head, got e_dim={e_dim} and num_head={num_head}")
        if use_norm:
            raise ValueError("use_norm=True is not supported (OptVQ no longer supports it either)")
        if loss_q_type not in LOSS_TYPES:
            raise ValueError(f"loss_q_type must be one of {LOSS_TYPES}, got {loss_q_type!r}")
        self.beta = beta
        self.loss_q_type = loss_q_type
        self.start_quantize_steps = start_quantize_steps
        self.code_dim = self.e_dim // self.num_head
        self.use_proj = use_proj
        self.total_steps = 0
        self.embedding = nn.Embedding(num_embeddings=n_e, embedding_dim=self.code_dim)
        if use_proj:
            self.proj = nn.Linear(self.code_dim, self.code_dim)
            torch.nn.init.normal_(self.proj.weight, std=self.code_dim ** -0.5)
        if fix_codes:
            self.embedding.weight.requires_grad = False

    def norm(self, x: Tensor) -> Tensor:
        return x

    def codebook(self) -> Tensor:
        return self.proj(self.embedding.weight) if self.use_proj else self.embedding.weight

    def get_codebook(self, return_numpy: bool = True):
        embed = self.codebook().data
        return embed.cpu().numpy() if return_numpy else embed

    def reshape_input(self, x: Tensor):
        """``(B, C, H, W)`` -> ``(B, H W, C)`` with the size; ``(B, T, C)`` as it is."""
        if x.ndim == 4:
            _, channels, height, width = x.shape
            return x.permute(0, 2, 3, 1).reshape(-1, height * width, channels), {"size": (height, width)}
        if x.ndim == 3:
            return x, None
        raise ValueError(f"x must be (B, C, H, W) or (B, T, C), got shape {tuple(x.shape)}")

    def recover_output(self, x: Tensor, info):
        if info is None:
            return x
        height, width = info["size"]
        if x.ndim == 3:
            return x.reshape(-1, height, width, x.shape[2]).permute(0, 3, 1, 2).contiguous()
        if x.ndim == 2:
            return x.reshape(-1, height, width)
        raise ValueError(f"cannot restore an output of shape {tuple(x.shape)} to an image")

    def assign(self, query: Tensor, reference: Tensor) -> Tensor:
        """The codes of ``query [N, C]`` in ``reference [K, C]``: the nearest by Euclidean distance."""
        return nearest_code(query, reference)[0]

    def compute_codebook_loss(self, query: Tensor, indices: Tensor, nearest_ref: Tensor, reference: Tensor) -> Tensor:
        if self.loss_q_type == "l2":
            return (torch.mean((query - nearest_ref.detach()).pow(2))
                    + torch.mean((nearest_ref - query.detach()).pow(2)) * self.beta)
        if self.loss_q_type == "l1":
            return (torch.mean((query - nearest_ref.detach()).abs())
                    + torch.mean((nearest_ref - query.detach()).abs()) * self.beta)
        if query.shape[0] == 0:
            return query.sum() * 0.0
        # cross_entropy(-cdist, indices) = mean(logsumexp_k(-d_k) + d_chosen), without the N x K logits.
        _, lse = soft_quantize(query, reference, metric="euclidean", temperature=1.0, return_hard=False)
        chosen = (query - nearest_ref).square().sum(dim=1).clamp_min(1e-8).sqrt()
        return (lse + chosen).mean()

    def compute_quantized_output(self, x: Tensor, x_q: Tensor) -> Tensor:
        if self.start_quantize_steps is not None and self.training and self.total_steps < self.start_quantize_steps:
            return x
        return x + (x_q - x).detach()

    def embed_code(self, code: Tensor, size=None, code_format: str = "image") -> Tensor:
        """OptVQ's decoding of codes ``(B, ...)`` (``num_head`` per position) to features."""
        code = code.reshape(code.shape[0], -1)
        batch, length = code.shape
        positions = length // self.num_head
        height, width = (size[0], size[1]) if size is not None else (int(math.sqrt(positions)),) * 2
        if height * width * self.num_head != length:
            raise ValueError(f"code of shape {tuple(code.shape)} does not hold {self.num_head} heads of "
                             f"{height}x{width} positions")
        x_q = self.codebook()[code]
        if code_format == "image":
            x_q = x_q.reshape(batch, self.num_head, positions, -1).permute(0, 2, 1, 3).reshape(batch, positions, -1)
        elif code_format == "sequence":
            x_q = x_q.reshape(batch, positions, -1)
        return self.recover_output(x_q, {"size": (height, width)})

    @torch.autocast(device_type="cuda", enabled=False)
    def forward(self, x: Tensor):
        x = x.float()
        x, info = self.reshape_input(x)
        batch, length, channels = x.shape
        if channels != self.e_dim:
            raise ValueError(f"x must have e_dim={self.e_dim} channels, got shape {tuple(x.shape)}")
        x = x.reshape(-1, channels)
        embed = self.codebook()
        if self.num_head > 1:
            x = x.reshape(-1, self.code_dim)
        indices = self.assign(x, embed)
        x_q = embed[indices]
        loss = self.compute_codebook_loss(x, indices, x_q, embed)
        x_q = self.compute_quantized_output(x, x_q).reshape(batch, length, channels)
        indices = indices.reshape(batch, length, self.num_head)
        return self.recover_output(x_q, info), loss, self.recover_output(indices, info)


class VectorQuantizerSinkhorn(VectorQuantizer):
    """OptVQ's optimal-transport quantizer: codes from a few Sinkhorn iterations over the batch's costs.

    Args (OptVQ's, in its order, then :class:`VectorQuantizer`'s by keyword):
        epsilon: OptVQ's inverse temperature of ``exp(-cost * epsilon)``, ``> 0``.
        n_iters: Sinkhorn iterations.
        normalize_mode: ``"all"`` (standardise the whole cost, then subtract its minimum), ``"dim"`` (divide
            by ``sqrt(code_dim)``) or ``"null"``.
        use_prob: draw each row's code from its row of the plan (OptVQ's default) instead of its argmax.
        sum_eps: (fastvq) the guard OptVQ adds to every sum it divides by; 0 runs the exact iteration.
    """

    def __init__(self, epsilon: float = 10.0, n_iters: int = 5, normalize_mode: str = "all", use_prob: bool = True,
                 *args, sum_eps: float = OPTVQ_SUM_EPS, **kwargs):
        super().__init__(*args, **kwargs)
        if normalize_mode not in NORMALIZE_MODES:
            raise ValueError(f"normalize_mode must be one of {NORMALIZE_MODES}, got {normalize_mode!r}")
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 < epsilon < math.inf:
            raise ValueError(f"epsilon must be a finite float > 0, got {epsilon!r}")
        self.epsilon = epsilon
        self.n_iters = n_iters
        self.normalize_mode = normalize_mode
        self.use_prob = use_prob
        self.sum_eps = sum_eps

    def assign(self, query: Tensor, reference: Tensor) -> Tensor:
        # exp(-normalised * epsilon) with "dim"'s normalised = cost / sqrt(dim): an epsilon of sqrt(dim) / epsilon.
        epsilon = 1.0 / self.epsilon * (math.sqrt(reference.shape[1]) if self.normalize_mode == "dim" else 1.0)
        normalize = "standardize" if self.normalize_mode == "all" else None
        indices, _, column_potential = sinkhorn_assign(
            query, reference, epsilon=epsilon, iters=self.n_iters, metric="euclidean", normalize=normalize,
            order="columns_first", sum_eps=self.sum_eps)
        if not self.use_prob:
            return indices
        return self._sample(query.detach(), reference.detach(), column_potential, epsilon, indices)

    def _sample(self, query: Tensor, reference: Tensor, column_potential: Tensor, epsilon: float,
                argmax: Tensor) -> Tensor:
        """One code per row drawn from its row of the plan, ``exp(g_k - cost_ik / epsilon)`` normalised, in row
        chunks; like OptVQ, ``1e-8`` is added to each row's largest entry first."""
        shift, scale = 0.0, 1.0
        if self.normalize_mode == "all":
            count, low, _, _, squares = sinkhorn_cost_stats(query, reference, metric="euclidean").unbind()
            shift, scale = low, 1.0 / (torch.sqrt(squares / (count - 1)) + 1e-6)
        rows_per_chunk = max(1, CHUNK_BYTES // (16 * reference.shape[0]))
        drawn = []
        for start in range(0, query.shape[0], rows_per_chunk):
            chunk = slice(start, start + rows_per_chunk)
            cost = (torch.cdist(query[chunk], reference) - shift) * scale
            plan = torch.softmax(column_potential[None, :] - cost / epsilon, dim=1)
            plan[torch.arange(plan.shape[0], device=plan.device), argmax[chunk]] += 1e-8
            drawn.append(torch.multinomial(plan, num_samples=1).squeeze(1))
        return torch.cat(drawn) if drawn else argmax


class Identity(VectorQuantizer):
    """OptVQ's pass-through "quantizer": ``(x.float(), 0.0, None)``."""

    @torch.autocast(device_type="cuda", enabled=False)
    def forward(self, x: Tensor):
        x = x.float()
        return x, torch.tensor(0.0, device=x.device, dtype=x.dtype), None
