"""``VectorQuantize``: vector-quantize-pytorch's layer on fastvq's fused ops.

The argument names, defaults, buffer names and shapes follow vector-quantize-pytorch's
``VectorQuantize`` (``_codebook.embed [C, K, D]``, ``_codebook.embed_avg``,
``_codebook.cluster_size [C, K]``, ``_codebook.initted``, ``project_in``/``project_out``), so its
state_dicts load here and give the same outputs. The layer holds state and reshapes; the search,
gather, gradient estimator, loss and EMA statistics all run in ``torch.ops.fastvq.*``, and no
``N x K`` matrix is ever built.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .. import _ops  # noqa: F401  (registers torch.ops.fastvq.*)
from .._distributed import all_reduce_sum_, is_distributed, sample_rows
from ..clustering import kmeans

# vector-quantize-pytorch's l2norm floor.
L2NORM_EPS = 1e-6

# Arguments of vector-quantize-pytorch's VectorQuantize that fastvq does not implement, with the
# value that leaves them inert. Passing the inert value is accepted; anything else is refused.
UNSUPPORTED_ARGUMENTS = {
    "commitment_use_cross_entropy_loss": False,
    "orthogonal_reg_weight": 0.0,
    "orthogonal_reg_active_codes_only": False,
    "orthogonal_reg_max_codes": None,
    "codebook_diversity_loss_weight": 0.0,
    "codebook_diversity_temperature": 100.0,
    "directional_reparam": False,
    "directional_reparam_variance": 5e-3,
    "sync_affine_param": False,
    "vq_bridge": None,
    "manual_ema_update": False,
    "in_place_codebook_optimizer": None,
    "manual_in_place_optimizer_update": False,
    "affine_param": False,
    "affine_param_batch_decay": 0.99,
    "affine_param_codebook_decay": 0.9,
    "sync_update_v": 0.0,
    "route_gradients_to_input": True,
}


def l2norm(tensor: Tensor) -> Tensor:
    return F.normalize(tensor, dim=-1, eps=L2NORM_EPS)


def perplexity_of(counts: Tensor) -> Tensor:
    """``exp(entropy)`` of the code usage ``counts [..., K]``; K when uniform, 1 when one code."""
    probs = counts / counts.sum(dim=-1, keepdim=True).clamp_min(1.0)
    return torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum(dim=-1))


def reject_unsupported(owner: str, kwargs: dict) -> None:
    """Raises for arguments fastvq does not implement, naming them; nothing is silently ignored."""
    for name, value in kwargs.items():
        if name not in UNSUPPORTED_ARGUMENTS:
            raise TypeError(f"{owner}() got an unexpected keyword argument {name!r}")
        if value != UNSUPPORTED_ARGUMENTS[name]:
            raise NotImplementedError(
                f"{owner}({name}={value!r}) is not supported by fastvq "
                f"(only the default {UNSUPPORTED_ARGUMENTS[name]!r} is)"
            )


class Codebook(nn.Module):
    """``C`` codebooks of ``K`` codes in ``D`` dimensions, trained by EMA or by gradient.

    Buffers (vector-quantize-pytorch's names): ``initted`` (bool), ``cluster_size [C, K]``,
    ``embed_avg [C, K, D]`` and ``embed [C, K, D]`` (a Parameter when ``learnable_codebook``).
    Non-persistent buffers ``last_perplexity [C]`` and ``last_codes_used [C]`` describe the code
    usage of the latest batch (updated on every forward, with no host synchronisation).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        num_codebooks: int = 1,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        sync_kmeans: bool = True,
        decay: float = 0.8,
        eps: float = 1e-5,
        threshold_ema_dead_code: float = 0,
        use_ddp: bool = False,
        learnable_codebook: bool = False,
        sample_codebook_temp: float = 1.0,
        stochastic_sample_codes: bool = False,
        ema_update: bool = True,
        use_cosine_sim: bool = False,
    ):
        super().__init__()
        if kmeans_init:
            embed = torch.zeros(num_codebooks, codebook_size, dim)
        else:
            embed = torch.empty(num_codebooks, codebook_size, dim)
            nn.init.kaiming_uniform_(embed)
            if use_cosine_sim:
                embed = l2norm(embed)
        self.dim = dim
        self.codebook_size = codebook_size
        self.num_codebooks = num_codebooks
        self.kmeans_iters = kmeans_iters
        self.sync_kmeans = sync_kmeans
        self.decay = float(decay)
        self.eps = float(eps)
        self.threshold_ema_dead_code = float(threshold_ema_dead_code)
        self.use_ddp = use_ddp
        self.learnable_codebook = learnable_codebook
        self.sample_codebook_temp = float(sample_codebook_temp)
        self.stochastic_sample_codes = stochastic_sample_codes
        self.ema_update = ema_update
        # ResidualVQ's shared codebook accumulates every layer's statistics before renormalising once.
        self.manual_ema_update = False
        self.use_cosine_sim = use_cosine_sim
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.ones(num_codebooks, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        if learnable_codebook:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        self.register_buffer("last_perplexity", torch.zeros(num_codebooks), persistent=False)
        self.register_buffer("last_codes_used", torch.zeros(num_codebooks, dtype=torch.int64), persistent=False)
        # A Python mirror of `initted`, so the k-means branch is decided without reading a device
        # tensor (no host sync, and torch.compile specialises on it instead of breaking the graph).
        self._initted = not kmeans_init
        self._register_load_state_dict_pre_hook(self._sync_initted_from_state)

    def _sync_initted_from_state(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "initted"
        if key in state_dict:
            self._initted = bool(state_dict[key])

    @property
    def metric(self) -> str:
        return "cosine" if self.use_cosine_sim else "l2"

    @property
    def has_dead_code_replacement(self) -> bool:
        return self.threshold_ema_dead_code > 0

    # ------------------------------------------------------------------ EMA statistics

    @torch.no_grad()
    def _ema_step(self, head: int, flat: Tensor, indices: Tensor, update_codes: bool, active: Optional[Tensor]) -> None:
        """Folds one batch into the moving averages of codebook ``head``; renormalises its codes.
        ``active`` False (a device tensor) leaves everything as it was."""
        counts, sums = torch.ops.fastvq.segment_reduce(
            flat, indices, self.codebook_size, torch.are_deterministic_algorithms_enabled()
        )
        if self.use_ddp:
            all_reduce_sum_(counts)
            all_reduce_sum_(sums)
        weight = 1.0 - self.decay
        if active is not None:
            weight = active.to(torch.float32) * weight
        self.cluster_size[head].lerp_(counts, weight)
        self.embed_avg[head].lerp_(sums, weight)
        if update_codes:
            self.renormalize(head, active)

    @torch.no_grad()
    def renormalize(self, head: int, active: Optional[Tensor] = None) -> None:
        """``embed = embed_avg / laplace_smoothed(cluster_size)`` (l2-normalised for cosine codes)."""
        sizes = self.cluster_size[head]
        total = sizes.sum()
        smoothed = (sizes + self.eps) / (total + self.codebook_size * self.eps) * total
        codes = self.embed_avg[head] / smoothed[:, None]
        if self.use_cosine_sim:
            codes = l2norm(codes)
        keep_new = total > 0  # no mass at all: 0/0 codes are not written
        if active is not None:
            keep_new = keep_new & active
        codes = torch.where(keep_new, codes, self.embed[head])
        self.embed.data[head].copy_(codes)

    @torch.no_grad()
    def expire_codes_(self, head: int, flat: Tensor, valid: Optional[Tensor], active: Optional[Tensor] = None) -> None:
        """Replaces codes whose EMA cluster size fell below ``threshold_ema_dead_code`` by rows of
        the batch, resetting their statistics to the threshold, as vector-quantize-pytorch does.
        Every code gets a candidate and ``torch.where`` keeps the live ones: no host sync."""
        rows = l2norm(flat) if self.use_cosine_sim else flat
        candidates, found = sample_rows(rows, self.codebook_size, synced=self.use_ddp, valid=valid)
        candidates = candidates.to(self.embed.dtype)
        dead = (self.cluster_size[head] < self.threshold_ema_dead_code) & found
        if active is not None:
            dead = dead & active
        reset = self.threshold_ema_dead_code
        self.embed.data[head].copy_(torch.where(dead[:, None], candidates, self.embed[head]))
        self.cluster_size[head].copy_(torch.where(dead, torch.full_like(self.cluster_size[head], reset), self.cluster_size[head]))
        self.embed_avg[head].copy_(torch.where(dead[:, None], candidates.to(self.embed_avg.dtype) * reset, self.embed_avg[head]))

    # ------------------------------------------------------------------ k-means

    @torch.no_grad()
    def kmeans_init_(self, flats: list[Tensor]) -> None:
        """Initialises every codebook by k-means on the batch (vector-quantize-pytorch's recipe:
        seeds sampled from the rows, ``kmeans_iters`` Lloyd steps, empty clusters keep their
        seed), run by ``fastvq.kmeans``. Under ``sync_kmeans`` its counts and sums are summed
        over ranks."""
        synced = self.use_ddp and self.sync_kmeans
        available = torch.tensor(float(min(flat.shape[0] for flat in flats)))
        if synced:
            all_reduce_sum_(available)
        if available.item() == 0:
            # No rows to cluster (every position masked, or a layer dropped out): initialise on a
            # later batch, as vector-quantize-pytorch does when it never sees the layer run.
            return
        for head, rows in enumerate(flats):
            rows = rows.detach().float()
            num_rows = rows.shape[0]
            if synced and is_distributed():
                means, _ = sample_rows(rows, self.codebook_size, synced=True)
            elif num_rows >= self.codebook_size:
                means = rows[torch.randperm(num_rows, device=rows.device)[: self.codebook_size]]
            else:
                means = rows[torch.randint(0, max(num_rows, 1), (self.codebook_size,), device=rows.device)]
            means, assignments, _ = kmeans(rows, self.codebook_size, iters=self.kmeans_iters, init=means,
                                           metric=self.metric, tol=None, empty_clusters="keep", sync=synced)
            counts = torch.zeros(self.codebook_size, device=rows.device).index_add_(
                0, assignments, torch.ones_like(assignments, dtype=torch.float32))
            if synced:
                all_reduce_sum_(counts)
            self.embed_avg[head].copy_(means * counts[:, None])
            self.cluster_size[head].copy_(counts)
            self.renormalize(head)
        self.initted.fill_(True)
        self._initted = True

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        flats: list[Tensor],
        *,
        valid: Optional[Tensor],
        commitment_weight: float,
        rotation_trick: bool,
        freeze_codebook: bool,
        sample_codebook_temp: Optional[float],
        active: Optional[Tensor] = None,
    ) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Quantizes ``flats``, one ``[M, D]`` tensor per codebook (all against codebook 0 when
        there is one codebook and several heads have been stacked into ``M``).

        ``valid [M]`` marks the rows that count (the others are excluded from losses, statistics
        and k-means). Returns the quantized rows, their indices and the summed commitment loss.
        """
        if not self._initted:
            self.kmeans_init_(flats if valid is None else [flat[valid] for flat in flats])
        temperature = self.sample_codebook_temp if sample_codebook_temp is None else float(sample_codebook_temp)
        sampling = self.training and self.stochastic_sample_codes and temperature > 0
        train_codes = self.training and not freeze_codebook
        codebook_grad_weight = commitment_weight if self.learnable_codebook and not freeze_codebook else 0.0
        quantized_heads, index_heads = [], []
        loss = flats[0].new_zeros((), dtype=torch.float32)
        for head, flat in enumerate(flats):
            codebook = self.embed[head] if self.learnable_codebook and not freeze_codebook else self.embed[head].detach()
            seed = torch.randint(0, 2**62, (), device=flat.device) if sampling else None
            if self.training:
                weight = commitment_weight if valid is None else 0.0
                quantized, indices, head_loss = torch.ops.fastvq.vector_quantize(
                    flat,
                    codebook,
                    self.metric,
                    weight,
                    codebook_grad_weight if valid is None else 0.0,
                    rotation_trick,
                    temperature if sampling else 0.0,
                    seed,
                )
                if valid is not None:
                    head_loss = self._masked_loss(flat, quantized, valid, commitment_weight, codebook_grad_weight)
                if codebook_grad_weight:
                    # vector-quantize-pytorch's learnable-codebook loss is ONE term, w * mse(q, x),
                    # whose gradient reaches both x and the codes; the op's two terms carry exactly
                    # that gradient but twice that value, so half the value is taken back, detached.
                    head_loss = head_loss - 0.5 * head_loss.detach()
                loss = loss + head_loss
            else:
                indices, _, quantized = torch.ops.fastvq.nearest_code(flat, codebook, self.metric, True, 0.0, None)
            if valid is not None:
                indices = torch.where(valid, indices, -1)
            if train_codes and (self.ema_update or self.has_dead_code_replacement):
                update_codes = self.ema_update and not self.manual_ema_update
                self._ema_step(head, flat.detach(), indices, update_codes, active)
                if self.has_dead_code_replacement:
                    self.expire_codes_(head, flat.detach(), valid, active)
            self._record_usage(head, indices)
            quantized_heads.append(quantized)
            index_heads.append(indices)
        # Each head's loss is a mean over its rows; the layer's is the mean over all of them.
        return quantized_heads, index_heads, loss / len(flats)

    @staticmethod
    def _masked_loss(flat: Tensor, quantized: Tensor, valid: Tensor, commitment_weight: float,
                     codebook_weight: float) -> Tensor:
        """The VQ losses over the valid rows only: an elementwise O(M D) expression."""
        weights = valid.to(torch.float32)[:, None]
        denominator = weights.sum().clamp_min(1.0) * flat.shape[1]
        commitment = ((flat.float() - quantized.detach().float()).square() * weights).sum() / denominator
        loss = commitment_weight * commitment
        if codebook_weight:
            codebook_term = ((flat.detach().float() - quantized.float()).square() * weights).sum() / denominator
            loss = loss + codebook_weight * codebook_term
        return loss

    @torch.no_grad()
    def _record_usage(self, head: int, indices: Tensor) -> None:
        safe = torch.where((indices >= 0) & (indices < self.codebook_size), indices, self.codebook_size)
        counts = torch.zeros(self.codebook_size + 1, device=indices.device).index_add_(
            0, safe, torch.ones_like(safe, dtype=torch.float32)
        )[: self.codebook_size]
        self.last_perplexity[head] = perplexity_of(counts)
        self.last_codes_used[head] = (counts > 0).sum()


class VectorQuantize(nn.Module):
    """Vector quantization layer, a drop-in for vector-quantize-pytorch's ``VectorQuantize``.

    Arguments have vector-quantize-pytorch's names, defaults and meanings:

    - ``dim``: feature dimension of the input; ``codebook_size``: codes per codebook ``K``.
    - ``codebook_dim``: code dimension; when ``codebook_dim * heads != dim`` the input is
      projected in (``project_in``, optionally followed by a LayerNorm with
      ``layernorm_after_project_in``) and the output projected back (``project_out``).
    - ``heads``: split each vector into ``heads`` sub-vectors, quantized against one shared
      codebook or, with ``separate_codebook_per_head``, one codebook each.
    - ``decay``, ``eps``: EMA decay and Laplace smoothing; ``ema_update`` (default True unless
      ``learnable_codebook``): train the codes by EMA; ``learnable_codebook``: the codes are a
      Parameter trained by the gradient of ``commitment_weight * mean((q - x)^2)`` (both sides).
    - ``freeze_codebook``: no codebook updates (also a ``forward`` argument).
    - ``kmeans_init``, ``kmeans_iters``, ``sync_kmeans``: initialise the codes by k-means on the
      first batch (fused search + segment reduce; no N x K matrix).
    - ``use_cosine_sim``: l2-normalise inputs and codes, search by cosine similarity.
    - ``threshold_ema_dead_code``: codes whose EMA cluster size falls below it are replaced by
      vectors from the batch (no host synchronisation).
    - ``channel_last``, ``accept_image_fmap``, ``accept_3d_fmap``: input layouts.
    - ``commitment_weight``: weight of the commitment loss ``mean((x - sg[q])^2)``.
    - ``stochastic_sample_codes``, ``sample_codebook_temp``: in training, sample codes from
      ``softmax(-distance / T)`` by Gumbel-max inside the fused search.
    - ``rotation_trick`` (default ``dim > 1``, as vector-quantize-pytorch): pass gradients to the
      input through the rotation trick (Fifty et al. 2024) instead of straight through.
    - ``straight_through``: the Gumbel-softmax straight-through estimator; not supported (it
      needs the ``N x K`` softmax), ``True`` raises ``NotImplementedError``.
    - ``sync_codebook`` (default: whether a process group of several ranks is initialised):
      all-reduce the EMA statistics so every rank keeps the same codebook.
    - ``return_zeros_for_masked_padding``: masked positions output zeros (else the input).

    Arguments of vector-quantize-pytorch that fastvq does not implement (orthogonal
    regularisation, codebook diversity loss, affine parameters, in-place codebook optimisers,
    cross-entropy commitment, directional reparametrisation, VQ bridges, ...) are accepted at
    their inert defaults and raise ``NotImplementedError`` naming them otherwise.

    ``forward(x, mask=None, *, freeze_codebook=None, sample_codebook_temp=None)`` takes
    ``[B, dim]``, ``[B, N, dim]`` (``[B, dim, N]`` when not ``channel_last``), ``[B, dim, H, W]``
    with ``accept_image_fmap`` or ``[B, dim, T, H, W]`` with ``accept_3d_fmap``; ``mask [B, N]``
    (bool) marks the valid positions of ``[B, N, dim]`` inputs. Returns ``(quantized, indices,
    loss)``: ``quantized`` shaped and typed like ``x``; ``indices`` int64 ``[B]``, ``[B, N]``,
    ``[B, H, W]``, ... with a trailing ``heads`` axis when ``heads > 1`` (``-1`` at masked
    positions); ``loss`` a float32 scalar, the weighted commitment loss in training and 0 in eval.

    After each forward, ``codebook_perplexity`` and ``codes_used`` describe the batch's code usage.

    Raises:
        ValueError: bad sizes or incompatible options, or an input whose shape does not fit
            (the message shows the shape). TypeError: a non-float input or unknown argument.
        NotImplementedError: a vector-quantize-pytorch argument fastvq does not implement.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: Optional[int] = None,
        heads: int = 1,
        separate_codebook_per_head: bool = False,
        decay: float = 0.8,
        eps: float = 1e-5,
        freeze_codebook: bool = False,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        sync_kmeans: bool = True,
        use_cosine_sim: bool = False,
        layernorm_after_project_in: bool = False,
        threshold_ema_dead_code: float = 0,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
        commitment_weight: float = 1.0,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 1.0,
        straight_through: bool = False,
        rotation_trick: Optional[bool] = None,
        sync_codebook: Optional[bool] = None,
        ema_update: Optional[bool] = None,
        learnable_codebook: Optional[bool] = None,
        return_zeros_for_masked_padding: bool = True,
        **unsupported,
    ):
        super().__init__()
        reject_unsupported("VectorQuantize", unsupported)
        for name, value in (("dim", dim), ("codebook_size", codebook_size), ("heads", heads),
                            ("kmeans_iters", kmeans_iters)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if codebook_dim is not None and (not isinstance(codebook_dim, int) or codebook_dim < 1):
            raise ValueError(f"codebook_dim must be a positive int or None, got {codebook_dim!r}")
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        if float(eps) < 0.0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        if float(commitment_weight) < 0.0:
            raise ValueError(f"commitment_weight must be >= 0, got {commitment_weight!r}")
        if float(threshold_ema_dead_code) < 0.0:
            raise ValueError(f"threshold_ema_dead_code must be >= 0, got {threshold_ema_dead_code!r}")
        if float(sample_codebook_temp) < 0.0:
            raise ValueError(f"sample_codebook_temp must be >= 0, got {sample_codebook_temp!r}")
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("accept_image_fmap and accept_3d_fmap cannot both be True")
        ema_update = True if ema_update is None else bool(ema_update)
        learnable_codebook = False if learnable_codebook is None else bool(learnable_codebook)
        rotation_trick = dim > 1 if rotation_trick is None else bool(rotation_trick)
        if straight_through and rotation_trick:
            raise ValueError("straight_through and rotation_trick cannot both be True (pass rotation_trick=False)")
        if straight_through:
            raise NotImplementedError(
                "VectorQuantize(straight_through=True) is not supported by fastvq: the Gumbel-softmax "
                "straight-through estimator needs the N x K softmax that fastvq never builds"
            )
        if ema_update and learnable_codebook:
            raise ValueError("learnable_codebook=True is not compatible with ema_update=True (pass ema_update=False)")
        if use_cosine_sim and learnable_codebook:
            raise ValueError("use_cosine_sim=True is not compatible with learnable_codebook=True")

        codebook_dim = dim if codebook_dim is None else codebook_dim
        codebook_input_dim = codebook_dim * heads
        self.has_projections = codebook_input_dim != dim
        if self.has_projections:
            # A bare Linear, or Linear + LayerNorm in a Sequential: vector-quantize-pytorch's keys.
            linear = nn.Linear(dim, codebook_input_dim)
            if layernorm_after_project_in:
                self.project_in = nn.Sequential(linear, nn.LayerNorm(codebook_input_dim))
            else:
                self.project_in = linear
            self.project_out = nn.Linear(codebook_input_dim, dim)
        else:
            if layernorm_after_project_in:
                raise ValueError("layernorm_after_project_in needs a projection (codebook_dim * heads != dim)")
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()

        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.heads = heads
        self.separate_codebook_per_head = separate_codebook_per_head
        self.commitment_weight = float(commitment_weight)
        self.rotation_trick = rotation_trick
        self.use_cosine_sim = use_cosine_sim
        self.learnable_codebook = learnable_codebook
        self.channel_last = channel_last
        self.accept_image_fmap = accept_image_fmap
        self.accept_3d_fmap = accept_3d_fmap
        self.freeze_codebook = freeze_codebook
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self._codebook = Codebook(
            codebook_dim,
            codebook_size,
            num_codebooks=heads if separate_codebook_per_head else 1,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            sync_kmeans=sync_kmeans,
            decay=decay,
            eps=eps,
            threshold_ema_dead_code=threshold_ema_dead_code,
            use_ddp=is_distributed() if sync_codebook is None else bool(sync_codebook),
            learnable_codebook=learnable_codebook,
            sample_codebook_temp=sample_codebook_temp,
            stochastic_sample_codes=stochastic_sample_codes,
            ema_update=ema_update,
            use_cosine_sim=use_cosine_sim,
        )

    @property
    def ema_update(self) -> bool:
        return self._codebook.ema_update

    @property
    def codebook(self) -> Tensor:
        """The codes: ``[K, codebook_dim]``, or ``[heads, K, codebook_dim]`` with separate codebooks."""
        codebook = self._codebook.embed
        return codebook if self.separate_codebook_per_head else codebook[0]

    @codebook.setter
    def codebook(self, codes: Tensor) -> None:
        if not self.separate_codebook_per_head:
            codes = codes[None]
        with torch.no_grad():
            self._codebook.embed.copy_(codes)

    @property
    def codebook_perplexity(self) -> Tensor:
        """Perplexity of the latest batch's code usage (``[heads]`` with separate codebooks)."""
        usage = self._codebook.last_perplexity
        return usage if self.separate_codebook_per_head else usage[0]

    @property
    def codes_used(self) -> Tensor:
        """Number of distinct codes the latest batch used (``[heads]`` with separate codebooks)."""
        used = self._codebook.last_codes_used
        return used if self.separate_codebook_per_head else used[0]

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """``indices`` as returned by ``forward`` -> the codes, in the layout of ``quantized``
        before ``project_out`` (channels first for image/3-D maps or ``channel_last=False``)."""
        if not isinstance(indices, Tensor) or indices.dtype not in (torch.int64, torch.int32):
            raise TypeError("indices must be an int64 or int32 tensor")
        indices = indices.long()
        if self.heads == 1:
            codes = F.embedding(indices.clamp_min(0), self.codebook)
        else:
            if indices.shape[-1] != self.heads:
                raise ValueError(f"indices must end in a heads axis of {self.heads}, got shape {tuple(indices.shape)}")
            books = self._codebook.embed
            parts = [
                F.embedding(indices[..., h].clamp_min(0), books[h if self.separate_codebook_per_head else 0])
                for h in range(self.heads)
            ]
            codes = torch.cat(parts, dim=-1)
        if not self.channel_last or self.accept_image_fmap or self.accept_3d_fmap:
            if codes.dim() > 2:
                codes = codes.movedim(-1, 1)
        return codes

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """The layer's output for ``indices`` (codes through ``project_out``)."""
        codes = self.get_codes_from_indices(indices)
        if self.has_projections:
            channels_first = (not self.channel_last or self.accept_image_fmap or self.accept_3d_fmap) and codes.dim() > 2
            if channels_first:
                codes = codes.movedim(1, -1)
            codes = self.project_out(codes)
            if channels_first:
                codes = codes.movedim(-1, 1)
        return codes

    def _to_sequence(self, x: Tensor) -> tuple[Tensor, str, dict]:
        """``x`` -> ``[B, N, dim]`` plus the pattern to undo it."""
        dim = self.dim
        if self.accept_image_fmap:
            if x.dim() != 4 or x.shape[1] != dim:
                raise ValueError(f"x must be an image feature map [B, {dim}, H, W] (accept_image_fmap=True), got shape {tuple(x.shape)}")
            return rearrange(x, "b d h w -> b (h w) d"), "b d h w", dict(h=x.shape[2], w=x.shape[3])
        if self.accept_3d_fmap:
            if x.dim() != 5 or x.shape[1] != dim:
                raise ValueError(f"x must be a 3-D feature map [B, {dim}, T, H, W] (accept_3d_fmap=True), got shape {tuple(x.shape)}")
            return rearrange(x, "b d t h w -> b (t h w) d"), "b d t h w", dict(t=x.shape[2], h=x.shape[3], w=x.shape[4])
        if x.dim() == 2 and x.shape[1] == dim:
            return x[:, None], "b d", {}
        if x.dim() == 3 and self.channel_last and x.shape[2] == dim:
            return x, "b n d", {}
        if x.dim() == 3 and not self.channel_last and x.shape[1] == dim:
            return rearrange(x, "b d n -> b n d"), "b d n", {}
        layout = "[B, N, dim]" if self.channel_last else "[B, dim, N]"
        raise ValueError(f"x must be [B, dim] or {layout} with dim = {dim}, got shape {tuple(x.shape)}")

    def forward(
        self,
        x: Tensor,
        mask: Optional[Tensor] = None,
        *,
        freeze_codebook: Optional[bool] = None,
        sample_codebook_temp: Optional[float] = None,
        active: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """See the class docstring. ``active`` (a bool scalar tensor) switches the whole call off
        on the device when False, as if every position were masked: ResidualVQ's quantize dropout
        uses it so that which layers drop out is decided without a host synchronisation."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        freeze_codebook = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        sequence, pattern, sizes = self._to_sequence(x)
        batch, length = sequence.shape[:2]
        if mask is not None:
            if pattern != "b n d" or mask.shape != (batch, length) or mask.dtype != torch.bool:
                raise ValueError(
                    f"mask must be a bool [B, N] = [{batch}, {length}] tensor for a [B, N, dim] input, "
                    f"got {tuple(mask.shape)} {mask.dtype} for x of shape {tuple(x.shape)}"
                )
        projected = self.project_in(sequence)
        heads = self.heads
        # Rows are ordered (head, batch, position) so each head's rows are contiguous.
        rows = rearrange(projected, "b n (h d) -> h (b n) d", h=heads)
        if self.use_cosine_sim:
            rows = l2norm(rows)
        valid = None if mask is None else mask.reshape(-1)
        if active is not None:
            keep = active.reshape(()).expand(batch * length)
            valid = keep if valid is None else valid & keep
        if self.separate_codebook_per_head:
            flats = list(rows.unbind(0))
            row_valid = valid
        else:
            flats = [rows.reshape(heads * batch * length, self.codebook_dim)]
            row_valid = None if valid is None else valid.repeat(heads)
        quantized_heads, index_heads, loss = self._codebook(
            flats,
            valid=row_valid,
            commitment_weight=self.commitment_weight if self.training else 0.0,
            rotation_trick=self.rotation_trick,
            freeze_codebook=freeze_codebook,
            sample_codebook_temp=sample_codebook_temp,
            active=None if active is None else active.reshape(()),
        )
        quantized = torch.stack(quantized_heads).reshape(heads, batch * length, self.codebook_dim)
        indices = torch.stack(index_heads).reshape(heads, batch, length)
        quantized = rearrange(quantized, "h (b n) d -> b n (h d)", b=batch).to(projected.dtype)
        quantized = self.project_out(quantized).to(x.dtype)
        indices = rearrange(indices, "h b n -> b n h") if heads > 1 else indices[0]
        if valid is not None:
            fill = torch.zeros_like(quantized) if self.return_zeros_for_masked_padding else sequence.to(quantized.dtype)
            quantized = torch.where(valid.reshape(batch, length, 1), quantized, fill)
        quantized, indices = _from_sequence(quantized, indices, pattern, sizes)
        return quantized, indices, loss


def _from_sequence(quantized: Tensor, indices: Tensor, pattern: str, sizes: dict) -> tuple[Tensor, Tensor]:
    """Undoes ``VectorQuantize._to_sequence`` for the output and the indices."""
    if pattern == "b d":
        return quantized[:, 0], indices[:, 0]
    if pattern == "b n d":
        return quantized, indices
    if pattern == "b d n":
        return rearrange(quantized, "b n d -> b d n"), indices
    if pattern == "b d h w":
        return (
            rearrange(quantized, "b (h w) d -> b d h w", **sizes),
            rearrange(indices, "b (h w) ... -> b h w ...", **sizes),
        )
    return (
        rearrange(quantized, "b (t h w) d -> b d t h w", **sizes),
        rearrange(indices, "b (t h w) ... -> b t h w ...", **sizes),
    )
