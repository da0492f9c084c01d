"""DeepMind Sonnet's ``VectorQuantizerEMA`` (VQ-VAE, van den Oord et al. 2017) on fastvq's ops.

The search, gather, straight-through estimator and commitment loss run in
``fastvq.functional.vector_quantize``; the zero-debiased moving averages of the cluster sizes
and sums run in ``fastvq.functional.ema_update_``. Neither builds the ``N x K`` distance or
one-hot matrices that Sonnet builds; those two are returned only when asked for.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.segment_reduce import ema_update_, segment_reduce
from ..ops.vector_quantize import vector_quantize

__all__ = ["VectorQuantizerEMA"]


class VectorQuantizerEMA(nn.Module):
    """Sonnet's ``VectorQuantizerEMA``: a VQ-VAE codebook trained by exponential moving averages.

    Args:
        embedding_dim: code dimension ``D``; the input's last dimension.
        num_embeddings: number of codes ``K``.
        commitment_cost: ``beta``, the weight of the commitment loss ``mean((x - sg[q])^2)``.
        decay: decay of the moving averages, in ``[0, 1)`` (0.99 in the paper).
        epsilon: Laplace smoothing of the cluster sizes, ``>= 0``.

    State (buffers, all in the state_dict):
        ``embeddings [K, D]``: the codes, initialised uniform in ``[-sqrt(3/D), sqrt(3/D)]``
        (Sonnet's ``VarianceScaling(distribution="uniform")``). Sonnet stores them transposed,
        ``[D, K]``; here row ``k`` is code ``k``, as in ``nn.Embedding``.
        ``ema_cluster_size [K]`` and ``ema_dw [K, D]``: the hidden moving averages of the cluster
        sizes and sums (Sonnet's ``ExponentialMovingAverage.hidden``), starting at zero.
        ``counter``: int64 scalar, the number of updates, for the zero-debiasing
        ``average = hidden / (1 - decay^counter)``.

    Sonnet's ``is_training`` argument is the module's mode: ``forward`` in ``train()`` mode
    updates the moving averages and the codebook, in ``eval()`` mode it leaves them alone.
    One training step, with ``n_k`` the number of inputs assigned to code ``k`` and ``s_k`` their
    sum, is::

        counter += 1
        ema_cluster_size <- decay * ema_cluster_size + (1 - decay) * n
        ema_dw           <- decay * ema_dw + (1 - decay) * s
        N = ema_cluster_size / (1 - decay^counter);  m = ema_dw / (1 - decay^counter)
        N <- (N + epsilon) / (sum(N) + K epsilon) * sum(N)
        embeddings = m / N

    so a code that has never been chosen becomes zero after the first update, as in Sonnet.

    ``forward(inputs, *, return_encodings=False, return_distances=False)`` takes ``inputs`` of
    shape ``[..., D]``, channels last as in Sonnet (permute a ``[B, D, H, W]`` feature map to
    ``[B, H, W, D]`` first), float32, float16, bfloat16 or float64, and returns a dict:

    - ``"quantize"``: ``[..., D]`` in ``inputs``' dtype; the codes chosen before this step's
      update, with the gradient passed straight through to ``inputs``;
    - ``"loss"``: float32 scalar ``commitment_cost * mean((inputs - sg[quantize])^2)``, in both
      modes;
    - ``"perplexity"``: float32 scalar ``exp(-sum(p log(p + 1e-10)))`` of the batch's code usage
      ``p`` (1 for an empty batch);
    - ``"encoding_indices"``: int64 ``[...]``;
    - ``"encodings"``: only with ``return_encodings``, the one-hot ``[N, K]`` matrix (``N`` the
      number of input vectors) in ``inputs``' dtype;
    - ``"distances"``: only with ``return_distances``, the float32 ``[N, K]`` squared distances
      ``|x|^2 - 2 x.e + |e|^2`` as Sonnet computes them.

    The two optional outputs are ``N x K`` matrices, which the layer otherwise never builds.

    Raises:
        ValueError: non-positive sizes, ``decay`` outside ``[0, 1)``, a negative ``epsilon`` or
            ``commitment_cost``; in ``forward``, an input whose last dimension is not ``D``.
        TypeError: a non-tensor or non-float input.
    """

    def __init__(
        self, embedding_dim: int, num_embeddings: int, commitment_cost: float, decay: float, epsilon: float = 1e-5
    ):
        super().__init__()
        for name, value in (("embedding_dim", embedding_dim), ("num_embeddings", num_embeddings)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("commitment_cost", commitment_cost), ("decay", decay), ("epsilon", epsilon)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite float, got {value!r}")
        if commitment_cost < 0:
            raise ValueError(f"commitment_cost must be >= 0, got {commitment_cost!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        if epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
        self.embedding_dim = embedding_dim
        self.num_embeddings = num_embeddings
        self.commitment_cost = float(commitment_cost)
        self.decay = float(decay)
        self.epsilon = float(epsilon)
        limit = math.sqrt(3.0 / embedding_dim)
        self.register_buffer("embeddings", torch.empty(num_embeddings, embedding_dim).uniform_(-limit, limit))
        self.register_buffer("ema_cluster_size", torch.zeros(num_embeddings))
        self.register_buffer("ema_dw", torch.zeros(num_embeddings, embedding_dim))
        self.register_buffer("counter", torch.zeros((), dtype=torch.int64))

    def forward(
        self, inputs: Tensor, *, return_encodings: bool = False, return_distances: bool = False
    ) -> dict[str, Tensor]:
        if not isinstance(inputs, Tensor):
            raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
        if not inputs.is_floating_point():
            raise TypeError(
                f"inputs must be a floating-point tensor, got dtype {inputs.dtype} with shape {tuple(inputs.shape)}"
            )
        if inputs.dim() < 1 or inputs.shape[-1] != self.embedding_dim:
            raise ValueError(
                f"inputs must be channels-last [..., embedding_dim={self.embedding_dim}], "
                f"got shape {tuple(inputs.shape)}"
            )
        flat = inputs.reshape(-1, self.embedding_dim)
        quantized, indices, loss = vector_quantize(
            flat, self.embeddings, metric="l2", beta=self.commitment_cost, codebook_weight=0.0
        )
        deterministic = torch.are_deterministic_algorithms_enabled()
        # Counting reduces a column of ones: O(N) work, no one-hot matrix.
        ones = flat.new_ones(flat.shape[0], 1)
        counts, _ = segment_reduce(ones, indices, self.num_embeddings, deterministic=deterministic)
        probs = counts / max(flat.shape[0], 1)
        perplexity = torch.exp(-torch.sum(probs * torch.log(probs + 1e-10)))
        distances = None
        if return_distances:
            # Sonnet's formula against the codes searched, before the update below; built only on
            # request, the search itself never needs it.
            embeddings = self.embeddings.float()
            rows = flat.detach().float()
            distances = rows.pow(2).sum(1, keepdim=True) - 2.0 * rows @ embeddings.T + embeddings.pow(2).sum(1)
        if self.training:
            # The op's backward reads the codes it returned, not the codebook, so rewriting the
            # codebook in place here cannot leak into this step's gradient.
            # Under torch.distributed the statistics are summed over ranks first (see ema_update_).
            ema_update_(
                self.embeddings,
                self.ema_cluster_size,
                self.ema_dw,
                flat.detach(),
                indices,
                decay=self.decay,
                eps=self.epsilon,
                step=self.counter,
                deterministic=deterministic,
                check_indices_range=False,
            )
        out = {
            "quantize": quantized.to(inputs.dtype).reshape(inputs.shape),
            "loss": loss,
            "perplexity": perplexity,
            "encoding_indices": indices.reshape(inputs.shape[:-1]),
        }
        if return_encodings:
            out["encodings"] = F.one_hot(indices, self.num_embeddings).to(inputs.dtype)
        if distances is not None:
            out["distances"] = distances
        return out

    def quantize(self, encoding_indices: Tensor) -> Tensor:
        """The codes of ``encoding_indices`` (int, any shape ``[...]``) as ``[..., D]``."""
        if not isinstance(encoding_indices, Tensor) or encoding_indices.dtype not in (torch.int64, torch.int32):
            found = encoding_indices.dtype if isinstance(encoding_indices, Tensor) else type(encoding_indices).__name__
            raise TypeError(f"encoding_indices must be an int64 or int32 tensor, got {found}")
        return F.embedding(encoding_indices.long(), self.embeddings)
