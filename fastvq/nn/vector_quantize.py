"""``VectorQuantize``: vector-quantize-pytorch's layer on fastvq's fused ops.

Every constructor argument, forward keyword, method, buffer name and return structure follows
vector-quantize-pytorch 1.32's ``VectorQuantize`` (``_codebook.embed [C, K, D]``,
``_codebook.embed_avg``, ``_codebook.cluster_size [C, K]``, ``_codebook.initted``, the affine
statistics, ``project_in``/``project_out``), so its state_dicts load here and give the same
outputs. The layer holds state and reshapes; the search, gather, gradient estimator, commitment
loss and EMA statistics run in ``fastvq.ops``, and no ``N x K`` matrix is built except
where the math is a softmax over every code (see :class:`VectorQuantize`).
"""

from __future__ import annotations

from collections import namedtuple
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from .._checks import check_real
from .._distributed import all_reduce_sum_, is_distributed, sample_rows
from ..clustering import kmeans
from ..losses import (
    code_cross_entropy,
    codebook_diversity_loss,
    directional_reparam,
    diversity_of_probabilities,
    orthogonal_loss,
    rotate_to,
)
from ..ops.search import draw_seed, nearest_code
from ..ops.segment_reduce import segment_reduce
from ..ops.soft_quantize import soft_quantize
from ..ops.topk import nearest_codes
from ..ops.vector_quantize import vector_quantize

# vector-quantize-pytorch's l2norm floor.
L2NORM_EPS = 1e-6

LossBreakdown = namedtuple("LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"])


def l2norm(tensor: Tensor) -> Tensor:
    return F.normalize(tensor, dim=-1, eps=L2NORM_EPS)


def perplexity_of(counts: Tensor) -> Tensor:
    """``exp(entropy)`` of the code usage ``counts [..., K]``; K when uniform, 1 when one code."""
    probs = counts / counts.sum(dim=-1, keepdim=True).clamp_min(1.0)
    return torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum(dim=-1))


def lens_to_mask(lens: Tensor, max_length: int) -> Tensor:
    return torch.arange(max_length, device=lens.device) < lens[:, None]


def gumbel_noise(tensor: Tensor) -> Tensor:
    """vector-quantize-pytorch's Gumbel noise, drawn like theirs (one uniform per entry)."""
    noise = torch.zeros_like(tensor).uniform_(0, 1)
    return -torch.log((-torch.log(noise.clamp(min=1e-20))).clamp(min=1e-20))


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class _Search(NamedTuple):
    """One codebook pass over the rows ``[C, M, d]`` of every codebook."""

    indices: Tensor  # [C, M] int64 (``[C, M, k]`` for top-k)
    codes: Tensor  # [C, M, d] (``[C, M, k, d]``): the chosen codes, with gradient to a learnable codebook
    estimated: Optional[Tensor]  # [C, M, d]: the fused op's straight-through / rotated output
    commitment: Optional[Tensor]  # scalar: the fused op's mean((z - sg[e])^2) over every head
    logits: Optional[Tensor]  # [C, M, K]: the logits of per-row codebooks (codebook_transform_fn)


class Codebook(nn.Module):
    """``C`` codebooks of ``K`` codes in ``D`` dimensions, trained by EMA or by gradient.

    Buffers (vector-quantize-pytorch's names): ``initted`` (bool), ``cluster_size [C, K]``,
    ``embed_avg [C, K, D]`` and ``embed [C, K, D]`` (a Parameter when ``learnable_codebook``);
    with ``affine_param`` also ``batch_mean``/``batch_variance [C, 1, D]`` (``None`` until the
    first batch, as theirs), ``codebook_mean``/``codebook_variance [C, 1, D]`` and their
    ``*_needs_init`` flags. Non-persistent buffers ``last_perplexity [C]`` and ``last_codes_used
    [C]`` describe the code usage of the latest batch.

    Methods with vector-quantize-pytorch's meaning: :meth:`update_ema`, :meth:`expire_codes_`,
    :meth:`update_indices`, :meth:`update_codebook`, :meth:`init_embed_`, :meth:`update_affine`.
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
        threshold_ema_dead_code: float = 2,
        reset_cluster_size: Optional[float] = None,
        use_ddp: bool = False,
        learnable_codebook: bool = False,
        sample_codebook_temp: float = 1.0,
        stochastic_sample_codes: bool = False,
        ema_update: bool = True,
        manual_ema_update: bool = False,
        affine_param: bool = False,
        sync_affine_param: bool = False,
        affine_param_batch_decay: float = 0.99,
        affine_param_codebook_decay: float = 0.9,
        use_cosine_sim: bool = False,
        vq_bridge: Optional[nn.Module] = None,
    ):
        super().__init__()
        for name, value in (("decay", decay), ("affine_param_batch_decay", affine_param_batch_decay),
                            ("affine_param_codebook_decay", affine_param_codebook_decay)):
            check_real(name, value, minimum=0.0, maximum=1.0)
        for name, value in (("eps", eps), ("threshold_ema_dead_code", threshold_ema_dead_code),
                            ("sample_codebook_temp", sample_codebook_temp)):
            check_real(name, value, minimum=0.0)
        if reset_cluster_size is not None:
            check_real("reset_cluster_size", reset_cluster_size, minimum=0.0)
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
        self.reset_cluster_size = float(threshold_ema_dead_code if reset_cluster_size is None else reset_cluster_size)
        self.use_ddp = use_ddp
        self.learnable_codebook = learnable_codebook
        self.sample_codebook_temp = float(sample_codebook_temp)
        self.stochastic_sample_codes = stochastic_sample_codes
        self.ema_update = ema_update
        self.manual_ema_update = manual_ema_update
        self.use_cosine_sim = use_cosine_sim
        self.vq_bridge = vq_bridge
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self.register_buffer("cluster_size", torch.ones(num_codebooks, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        if learnable_codebook:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        self.affine_param = affine_param
        self.sync_affine_param = sync_affine_param
        self.affine_param_batch_decay = float(affine_param_batch_decay)
        self.affine_param_codebook_decay = float(affine_param_codebook_decay)
        if affine_param:
            self.register_buffer("batch_mean", None)
            self.register_buffer("batch_variance", None)
            self.register_buffer("codebook_mean_needs_init", torch.tensor(True))
            self.register_buffer("codebook_mean", torch.empty(num_codebooks, 1, dim))
            self.register_buffer("codebook_variance_needs_init", torch.tensor(True))
            self.register_buffer("codebook_variance", torch.empty(num_codebooks, 1, dim))
        self.register_buffer("last_perplexity", torch.zeros(num_codebooks), persistent=False)
        self.register_buffer("last_codes_used", torch.zeros(num_codebooks, dtype=torch.int64), persistent=False)
        # A Python mirror of `initted`, so the k-means branch is decided without reading a device
        # tensor (no host sync, and torch.compile specialises on it instead of breaking the graph).
        self._initted = not kmeans_init
        # accum_ema_update's statistics waiting for the next update (vector-quantize-pytorch keeps
        # them in the buffers' .grad).
        self._pending: Optional[tuple[Tensor, Tensor]] = None
        self._register_load_state_dict_pre_hook(self._prepare_for_state)

    def _prepare_for_state(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "initted"
        if key in state_dict:
            self._initted = bool(state_dict[key])
        # The batch statistics exist only once a batch was seen; a state that has them brings them.
        for name in ("batch_mean", "batch_variance"):
            if self.affine_param and getattr(self, name) is None and prefix + name in state_dict:
                self.register_buffer(name, torch.empty_like(state_dict[prefix + name], device=self.embed.device))

    @property
    def has_dead_code_replacement(self) -> bool:
        return self.threshold_ema_dead_code > 0

    @property
    def metric(self) -> str:
        """The search metric: l2, or the dot product of l2-normalised rows with the codes (cosine)."""
        return "dot" if self.use_cosine_sim else "l2"

    def transform_input(self, x: Tensor) -> Tensor:
        return l2norm(x) if self.use_cosine_sim else x

    # ------------------------------------------------------------------ the codes searched

    def search_codebooks(self) -> Tensor:
        """The codes the search and the gather use, ``[C, K, D]`` fp32: ``embed`` (with its gradient
        when learnable), through ``vq_bridge`` and the affine re-normalisation when present."""
        embed = self.embed if self.learnable_codebook else self.embed.detach()
        embed = embed.float()
        if self.vq_bridge is not None:
            embed = self.vq_bridge(embed)
        if self.affine_param:
            codebook_std = self.codebook_variance.clamp(min=1e-5).sqrt()
            batch_std = self.batch_variance.clamp(min=1e-5).sqrt()
            embed = (embed - self.codebook_mean) * (batch_std / codebook_std) + self.batch_mean
        return embed

    # ------------------------------------------------------------------ affine parameters

    @torch.no_grad()
    def update_with_decay(self, buffer_name: str, new_value: Tensor, decay: float) -> None:
        old_value = getattr(self, buffer_name)
        needs_init = getattr(self, buffer_name + "_needs_init", None)
        first = needs_init is not None and bool(needs_init)
        if first:
            needs_init.fill_(False)
        if old_value is None:
            self.register_buffer(buffer_name, new_value.detach().clone())
        elif first:
            old_value.copy_(new_value)
        else:
            old_value.copy_(old_value * decay + new_value.detach() * (1 - decay))

    @torch.no_grad()
    def update_affine(self, data: Tensor, embed: Tensor, mask: Optional[Tensor] = None) -> None:
        """Moving averages of the codebook's (training only) and the batch's per-dimension mean and
        (biased) variance, from ``data [C, M, D]`` (the rows where ``mask [C, M]``)."""
        if self.training:
            self.update_with_decay("codebook_mean", embed.mean(dim=1, keepdim=True), self.affine_param_codebook_decay)
            self.update_with_decay("codebook_variance", embed.var(dim=1, unbiased=False, keepdim=True),
                                   self.affine_param_codebook_decay)
        if mask is not None:
            data = data[mask].reshape(data.shape[0], -1, data.shape[-1])
        if not self.sync_affine_param:
            self.update_with_decay("batch_mean", data.mean(dim=1, keepdim=True), self.affine_param_batch_decay)
            self.update_with_decay("batch_variance", data.var(dim=1, unbiased=False, keepdim=True),
                                   self.affine_param_batch_decay)
            return
        num_vectors = all_reduce_sum_(torch.tensor(float(data.shape[1]), device=data.device, dtype=data.dtype))
        batch_mean = all_reduce_sum_(data.sum(dim=1, keepdim=True)) / num_vectors
        self.update_with_decay("batch_mean", batch_mean, self.affine_param_batch_decay)
        variance = all_reduce_sum_(((data - batch_mean) ** 2).sum(dim=1, keepdim=True)) / num_vectors
        self.update_with_decay("batch_variance", variance, self.affine_param_batch_decay)

    def _to_codebook_space(self, rows: Tensor) -> Tensor:
        """Rows mapped by the inverse of the affine re-normalisation, for the EMA statistics."""
        codebook_std = self.codebook_variance.clamp(min=1e-5).sqrt()
        batch_std = self.batch_variance.clamp(min=1e-5).sqrt()
        return (rows - self.batch_mean) * (codebook_std / batch_std) + self.codebook_mean

    # ------------------------------------------------------------------ EMA statistics

    @torch.no_grad()
    def track_cluster_size_and_embed_avg(
        self,
        flatten: Tensor,
        indices: Tensor,
        mask: Optional[Tensor] = None,
        ema_update_weight: Union[Tensor, Callable, None] = None,
        accum_ema_update: bool = False,
        active: Optional[Tensor] = None,
    ) -> None:
        """Folds the batch ``flatten [C, M, D]`` with its codes ``indices [C, M]`` into the moving
        averages (``mask [C, M]`` False rows do not count). ``ema_update_weight`` (a tensor ``[K]``
        or ``[C, K]``, or a callable of ``(embed_sum, cluster_size)``) scales each code's update;
        ``accum_ema_update`` only accumulates the statistics for the next update. ``active`` False
        (a device tensor) leaves everything as it was."""
        if self.affine_param:
            flatten = self._to_codebook_space(flatten)
        if mask is not None:
            indices = torch.where(mask, indices, -1)
        deterministic = torch.are_deterministic_algorithms_enabled()
        counts, sums = [], []
        for head in range(flatten.shape[0]):
            head_counts, head_sums = segment_reduce(
                flatten[head], indices[head], self.codebook_size, deterministic=deterministic
            )
            counts.append(head_counts)
            sums.append(head_sums)
        cluster_size, embed_sum = torch.stack(counts), torch.stack(sums)
        if self.use_ddp:
            all_reduce_sum_(cluster_size)
            all_reduce_sum_(embed_sum)
        if callable(ema_update_weight):
            ema_update_weight = ema_update_weight(embed_sum, cluster_size)
        if accum_ema_update:
            pending = (cluster_size, embed_sum) if self._pending is None else (
                self._pending[0] + cluster_size, self._pending[1] + embed_sum)
            self._pending = pending
            return
        if self._pending is not None:
            cluster_size = cluster_size + self._pending[0]
            embed_sum = embed_sum + self._pending[1]
            self._pending = None
        weight = 1.0 - self.decay
        if isinstance(ema_update_weight, Tensor):
            if ema_update_weight.dim() == 1:
                ema_update_weight = ema_update_weight[None]
            if ema_update_weight.shape != self.cluster_size.shape:
                raise ValueError(f"ema_update_weight must be [K] or [C, K] = {tuple(self.cluster_size.shape)}, got "
                                 f"{tuple(ema_update_weight.shape)}")
            weight = weight * ema_update_weight.to(self.cluster_size.dtype)
        elif ema_update_weight is not None:
            weight = weight * float(ema_update_weight)
        if active is not None:
            weight = weight * active.to(torch.float32)
        weight = torch.as_tensor(weight, dtype=self.cluster_size.dtype, device=self.cluster_size.device)
        self.cluster_size.lerp_(cluster_size.to(self.cluster_size.dtype), weight)
        embed_weight = weight[..., None] if weight.dim() == 2 else weight
        self.embed_avg.lerp_(embed_sum.to(self.embed_avg.dtype), embed_weight)

    @torch.no_grad()
    def update_ema(self, active: Optional[Tensor] = None) -> None:
        """``embed = embed_avg / laplace_smoothed(cluster_size)`` for every codebook (l2-normalised
        for cosine codes). A codebook with no mass at all keeps its codes instead of turning 0/0."""
        sizes = self.cluster_size
        total = sizes.sum(dim=-1, keepdim=True)
        smoothed = (sizes + self.eps) / (total + self.codebook_size * self.eps) * total
        codes = self.embed_avg / smoothed[..., None]
        if self.use_cosine_sim:
            codes = l2norm(codes)
        keep_new = total[..., None] > 0
        if active is not None:
            keep_new = keep_new & active
        self.embed.data.copy_(torch.where(keep_new, codes.to(self.embed.dtype), self.embed.data))

    @torch.no_grad()
    def update_codebook(
        self,
        flatten: Tensor,
        indices: Tensor,
        mask: Optional[Tensor] = None,
        ema_update_weight: Union[Tensor, Callable, None] = None,
        accum_ema_update: bool = False,
        ema_update: Optional[bool] = None,
        active: Optional[Tensor] = None,
    ) -> None:
        """One training step of the codebook: the EMA statistics, the renormalisation (unless
        ``manual_ema_update``) and the dead-code replacement, as vector-quantize-pytorch orders them."""
        ema_update = self.ema_update if ema_update is None else ema_update
        if not ema_update and not self.has_dead_code_replacement:
            return
        self.track_cluster_size_and_embed_avg(flatten, indices, mask, ema_update_weight, accum_ema_update, active)
        if accum_ema_update:
            return
        if ema_update and not self.manual_ema_update:
            self.update_ema(active)
        self.expire_codes_(flatten, seq_mask=mask, active=active)

    @torch.no_grad()
    def update_indices(
        self,
        x: Tensor,
        embed_ind: Tensor,
        mask: Optional[Tensor] = None,
        ema_update_weight: Union[Tensor, Callable, None] = None,
        accum_ema_update: bool = False,
        ema_update: Optional[bool] = None,
    ) -> None:
        """Trains the codebook on given codes: ``x [..., D]`` (``[C, ..., D]`` with several codebooks)
        and ``embed_ind [...]``. Index ``-1`` counts as code 0, as in vector-quantize-pytorch;
        ``mask [B, N]`` excludes rows."""
        if x.dim() < 4:
            x, embed_ind = x[None], embed_ind[None]
        flatten = x.float().reshape(x.shape[0], -1, x.shape[-1])
        embed_ind = embed_ind.reshape(embed_ind.shape[0], -1).long()
        embed_ind = embed_ind.masked_fill(embed_ind == -1, 0)
        if mask is not None:
            mask = repeat(mask, "b n -> c (b h n)", c=flatten.shape[0],
                          h=flatten.shape[-2] // (mask.shape[0] * mask.shape[1]))
        self.update_codebook(flatten, embed_ind, mask, ema_update_weight, accum_ema_update, ema_update)

    update_ema_indices = update_indices

    # ------------------------------------------------------------------ dead codes

    @torch.no_grad()
    def expire_codes_(self, batch_samples: Tensor, seq_mask: Optional[Tensor] = None,
                      active: Optional[Tensor] = None) -> None:
        """Replaces the codes whose EMA cluster size fell below ``threshold_ema_dead_code`` by rows of
        ``batch_samples [C, ..., D]`` (the rows where ``seq_mask [C, M]``), resetting their statistics
        to ``reset_cluster_size``. Training only, as vector-quantize-pytorch.

        In eager mode the draw is vector-quantize-pytorch's, random number for random number (one
        host synchronisation, as theirs); under ``torch.compile`` or a process group it is made
        without any: each dead code, in random order, takes a distinct random valid row of the
        batch, and dead codes beyond the number of valid rows wait for a later batch (theirs too)."""
        if not self.has_dead_code_replacement or not self.training:
            return
        batch_samples = batch_samples.reshape(batch_samples.shape[0], -1, batch_samples.shape[-1])
        expired = self.cluster_size < self.threshold_ema_dead_code
        if self.use_cosine_sim:
            batch_samples = l2norm(batch_samples)
        if torch.compiler.is_compiling() or (self.use_ddp and is_distributed()):
            self._replace_without_sync(batch_samples, expired, seq_mask, active)
            return
        if active is not None:
            expired = expired & active
        if not torch.any(expired):
            return
        for head in range(min(batch_samples.shape[0], expired.shape[0])):
            samples = batch_samples[head]
            if seq_mask is not None:
                samples = samples[seq_mask[head]]
            if samples.numel() == 0:
                continue
            self._replace_head(head, samples, expired[head])

    def _replace_head(self, head: int, samples: Tensor, dead: Tensor) -> None:
        """vector-quantize-pytorch's ``replace`` for one codebook."""
        num_samples = samples.shape[0]
        num_dead = int(dead.sum())
        if num_dead > num_samples:
            dead_indices = dead.nonzero(as_tuple=True)[0]
            dead_indices = dead_indices[torch.randperm(num_dead, device=dead.device)[:num_samples]]
            dead = torch.zeros_like(dead)
            dead[dead_indices] = True
            num_dead = num_samples
        if num_samples >= num_dead:
            picks = torch.randperm(num_samples, device=samples.device)[:num_dead]
        else:
            picks = torch.randint(0, num_samples, (num_dead,), device=samples.device)
        sampled = samples[picks].to(self.embed.dtype)
        reset = self.reset_cluster_size
        self.embed.data[head][dead] = sampled
        self.cluster_size.data[head][dead] = reset
        self.embed_avg.data[head][dead] = sampled.to(self.embed_avg.dtype) * reset

    def _replace_without_sync(self, batch_samples: Tensor, expired: Tensor, seq_mask: Optional[Tensor],
                              active: Optional[Tensor]) -> None:
        num_codes = self.codebook_size
        reset = self.reset_cluster_size
        for head in range(min(batch_samples.shape[0], expired.shape[0])):
            rows = batch_samples[head]
            valid = None if seq_mask is None else seq_mask[head]
            dead = expired[head]
            if self.use_ddp and is_distributed():
                candidates, found = sample_rows(rows, num_codes, synced=self.sync_kmeans, valid=valid)
                dead = dead & found
            else:
                candidates, taken = _distinct_rows_for(dead, rows, valid)
                dead = dead & taken
            if active is not None:
                dead = dead & active
            candidates = candidates.to(self.embed.dtype)
            self.embed.data[head].copy_(torch.where(dead[:, None], candidates, self.embed[head]))
            self.cluster_size[head].copy_(torch.where(dead, torch.full_like(self.cluster_size[head], reset),
                                                      self.cluster_size[head]))
            self.embed_avg[head].copy_(torch.where(dead[:, None], candidates.to(self.embed_avg.dtype) * reset,
                                                   self.embed_avg[head]))

    # ------------------------------------------------------------------ k-means

    @torch.no_grad()
    def init_embed_(self, data: Tensor, mask: Optional[Tensor] = None) -> None:
        """Initialises every codebook by k-means on ``data [C, M, D]`` (the rows where ``mask``):
        vector-quantize-pytorch's recipe (seeds drawn from the rows, ``kmeans_iters`` Lloyd steps,
        empty clusters keep their mean), run by ``fastvq.kmeans``. Under ``sync_kmeans`` its counts
        and sums are summed over ranks."""
        if self._initted:
            return
        flats = [data[head] if mask is None else data[head][mask[head]] for head in range(data.shape[0])]
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
                                           metric="cosine" if self.use_cosine_sim else "l2", tol=None,
                                           empty_clusters="keep", sync=synced)
            counts = torch.zeros(self.codebook_size, device=rows.device).index_add_(
                0, assignments, torch.ones_like(assignments, dtype=torch.float32))
            if synced:
                all_reduce_sum_(counts)
            self.embed_avg[head].copy_(means * counts[:, None])
            self.cluster_size[head].copy_(counts)
        self.update_ema()
        self.initted.fill_(True)
        self._initted = True

    # ------------------------------------------------------------------ usage

    @torch.no_grad()
    def record_usage(self, indices: Tensor) -> None:
        """``last_perplexity`` and ``last_codes_used`` of ``indices [C, M]`` (``-1`` rows excluded)."""
        for head in range(indices.shape[0]):
            chosen = indices[head].reshape(-1)
            safe = torch.where((chosen >= 0) & (chosen < self.codebook_size), chosen, self.codebook_size)
            counts = torch.zeros(self.codebook_size + 1, device=chosen.device).index_add_(
                0, safe, torch.ones_like(safe, dtype=torch.float32)
            )[: self.codebook_size]
            self.last_perplexity[head] = perplexity_of(counts)
            self.last_codes_used[head] = (counts > 0).sum()


def _distinct_rows_for(dead: Tensor, rows: Tensor, valid: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """For each code a row of ``rows [M, D]``, distinct across the ``dead [K]`` codes and drawn
    uniformly from the valid rows, plus which dead codes got one: the dead codes in random order
    take the first of the valid rows in random order; those past the number of valid rows get none."""
    num_codes, num_rows = dead.shape[0], rows.shape[0]
    if num_rows == 0:
        return rows.new_zeros(num_codes, rows.shape[1]), torch.zeros_like(dead)
    keys = torch.rand(num_rows, device=rows.device)
    if valid is not None:
        keys = torch.where(valid, keys, -1.0)
    drawn = min(num_codes, num_rows)
    order = torch.topk(keys, drawn).indices
    priority = torch.where(dead, torch.rand(num_codes, device=dead.device), 2.0)
    rank = torch.empty_like(priority, dtype=torch.int64).scatter_(
        0, torch.argsort(priority), torch.arange(num_codes, device=dead.device)
    )
    num_valid = torch.tensor(num_rows, device=rows.device) if valid is None else valid.sum()
    taken = rank < torch.clamp(num_valid, max=drawn)
    return rows[order[rank.clamp(max=drawn - 1)]], taken


class VectorQuantize(nn.Module):
    """Vector quantization layer, a drop-in for vector-quantize-pytorch's ``VectorQuantize``.

    Arguments, in vector-quantize-pytorch's order, with its names, defaults and meanings:

    - ``dim``: feature dimension of the input; ``codebook_size``: codes per codebook ``K``.
    - ``codebook_dim``: code dimension; when ``codebook_dim * heads != dim`` the input is
      projected in (``project_in``, optionally followed by a LayerNorm with
      ``layernorm_after_project_in``) and the output projected back (``project_out``).
    - ``heads``: split each vector into ``heads`` sub-vectors, quantized against one shared
      codebook or, with ``separate_codebook_per_head``, one codebook each.
    - ``decay`` (in ``[0, 1]``; 1 freezes the averages), ``eps``: EMA decay and Laplace smoothing.
    - ``freeze_codebook``: no codebook updates (also a ``forward`` argument).
    - ``kmeans_init``, ``kmeans_iters``, ``sync_kmeans``: initialise the codes by k-means on the
      first batch (fused search + segment reduce).
    - ``use_cosine_sim``: l2-normalise inputs and codes, search by cosine similarity.
    - ``threshold_ema_dead_code``: codes whose EMA cluster size falls below it are replaced by
      vectors of the batch.
    - ``channel_last``, ``accept_image_fmap``, ``accept_3d_fmap``: input layouts.
    - ``commitment_weight``: weight of the commitment loss ``mean((x - sg[q])^2)``.
    - ``commitment_use_cross_entropy_loss``: the commitment loss is instead the cross-entropy of
      the softmax over codes of minus the distances against the chosen code.
    - ``orthogonal_reg_weight``, ``orthogonal_reg_active_codes_only``, ``orthogonal_reg_max_codes``:
      the orthogonal regulariser of the codebook (which then becomes a Parameter, as theirs).
    - ``codebook_diversity_loss_weight``, ``codebook_diversity_temperature``: minus the entropy of
      the average code distribution ``softmax(temperature * -distance)`` at each position.
    - ``stochastic_sample_codes``, ``sample_codebook_temp``: in training, sample codes from
      ``softmax(-distance / T)`` by Gumbel-max inside the fused search.
    - ``straight_through`` (needs ``rotation_trick=False`` and no ``learnable_codebook``): the
      Gumbel-softmax straight-through codes of vector-quantize-pytorch, ``hard + p @ sg(C) -
      sg(p @ sg(C))`` with ``p = softmax(-|x - e| / T)`` (``T = sample_codebook_temp``; cosine:
      ``softmax(cos / T)``), computed by ``fastvq.soft_quantize`` without the ``N x K`` matrix. As
      there, the layer applies the plain straight-through estimator ``x + sg(q - x)`` when its
      input requires a gradient (and ``route_gradients_to_input``), which drops ``p``'s gradient;
      so ``p`` is computed in training only when the estimator does not apply and the codebook's
      input requires a gradient (a trained ``project_in``), and the gradient reaches it through
      ``p``. The gradient uses the codes of the forward (vector-quantize-pytorch's backward sees
      the codes its EMA step rewrote in place). With ``codebook_transform_fn`` it raises
      ``NotImplementedError``.
    - ``rotation_trick`` (default ``dim > 1`` unless ``directional_reparam``): pass gradients to the
      input through the rotation trick (Fifty et al. 2024) instead of straight through.
    - ``directional_reparam``, ``directional_reparam_variance``: DiVeQ's estimator (output
      ``x + noisy unit direction * |q - x|``), which trains the codebook by gradient.
    - ``sync_codebook`` (default: whether a process group of several ranks is initialised):
      all-reduce the EMA statistics so every rank keeps the same codebook.
    - ``affine_param``, ``sync_affine_param``, ``affine_param_batch_decay``,
      ``affine_param_codebook_decay``: re-normalise the codes to the moving mean and variance of
      the batches (the statistics summed over ranks with ``sync_affine_param``).
    - ``ema_update`` (default True unless ``directional_reparam`` or ``vq_bridge``): train the
      codes by EMA. ``manual_ema_update``: track the statistics, renormalise only when
      ``_codebook.update_ema()`` is called.
    - ``vq_bridge``: a module applied to the codebook before the search (its output is searched).
    - ``learnable_codebook``: the codes are a Parameter trained by the gradient of
      ``commitment_weight * mean((q - x)^2)``.
    - ``in_place_codebook_optimizer`` (a callable making an optimizer of the codebook's
      parameters), ``manual_in_place_optimizer_update``: in training, one optimizer step on
      ``mean((q - sg[x])^2)`` before quantizing again (the step at once unless manual:
      :meth:`update_in_place_optimizer`).
    - ``sync_update_v``: the synchronous update rule's ``v`` (in ``[0, 1]``).
    - ``return_zeros_for_masked_padding``: masked positions output zeros (else the input).
    - ``route_gradients_to_input``: False gives the codes themselves, no estimator.

    ``forward(x, indices=None, mask=None, lens=None, topk=None, sample_codebook_temp=None,
    freeze_codebook=None, return_loss_breakdown=False, codebook_transform_fn=None,
    ema_update_weight=None, accum_ema_update=False, ema_update=None)`` takes ``[B, dim]``,
    ``[B, N, dim]`` (``[B, dim, N]`` when not ``channel_last``), ``[B, dim, H, W]`` with
    ``accept_image_fmap`` or ``[B, dim, T, H, W]`` with ``accept_3d_fmap``; ``mask [B, N]`` (bool, or
    ``lens [B]``) marks the valid positions of sequences. Returns ``(quantized, indices, loss)``
    and, with ``return_loss_breakdown``, a :data:`LossBreakdown` ``(commitment,
    codebook_diversity, orthogonal_reg, inplace_optimize)`` of unweighted terms. ``quantized`` is
    shaped and typed like ``x``; ``indices`` int64 ``[B]``, ``[B, N]``, ``[B, H, W]``, ... with a
    trailing ``heads`` axis when ``heads > 1`` (``-1`` at masked positions); ``loss`` a float32
    scalar. With ``indices`` given, returns ``(quantized, cross_entropy)`` as theirs (quantized in
    the internal ``[B, N, codebook_dim]`` layout, heads split). ``codebook_transform_fn`` maps the
    codebook ``[C, K, D]`` to per-position codebooks ``[C, B, N, K, D]`` (QINCo); ``ema_update`` and
    the other keywords override the constructor's choice for one call.

    Memory: the search, gather, estimator, commitment loss and EMA statistics never build an
    ``N x K`` matrix. A softmax over every code does need all ``N x K`` logits: the cross-entropy
    commitment loss and the diversity loss compute them in checkpointed row chunks of at most
    32 MiB (the diversity loss also keeps its ``[N_positions, K]`` averages), where
    vector-quantize-pytorch keeps the whole ``N x K`` matrix and its softmax for the backward.
    The orthogonal regulariser is ``K x K`` cosines in theirs; here it is the ``D x D`` Gram
    matrix when ``D < K`` (the same sum). Per-position codebooks (``codebook_transform_fn``) are
    ``N x K x D`` by construction; their logits are ``N x K``.

    After each forward, ``codebook_perplexity`` and ``codes_used`` describe the batch's code usage.

    Raises:
        ValueError: bad sizes or incompatible options, or an input whose shape does not fit
            (the message shows the shape). TypeError: a non-float input or an unknown argument.
        NotImplementedError: ``straight_through=True`` with a live soft gradient and a
            ``codebook_transform_fn``.
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
        commitment_use_cross_entropy_loss: bool = False,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_active_codes_only: bool = False,
        orthogonal_reg_max_codes: Optional[int] = None,
        codebook_diversity_loss_weight: float = 0.0,
        codebook_diversity_temperature: float = 100.0,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 1.0,
        straight_through: bool = False,
        rotation_trick: Optional[bool] = None,
        directional_reparam: bool = False,
        directional_reparam_variance: float = 5e-3,
        sync_codebook: Optional[bool] = None,
        sync_affine_param: bool = False,
        ema_update: Optional[bool] = None,
        vq_bridge: Optional[nn.Module] = None,
        manual_ema_update: bool = False,
        learnable_codebook: Optional[bool] = None,
        in_place_codebook_optimizer: Optional[Callable[..., torch.optim.Optimizer]] = None,
        manual_in_place_optimizer_update: bool = False,
        affine_param: bool = False,
        affine_param_batch_decay: float = 0.99,
        affine_param_codebook_decay: float = 0.9,
        sync_update_v: float = 0.0,
        return_zeros_for_masked_padding: bool = True,
        route_gradients_to_input: bool = True,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("codebook_size", codebook_size), ("heads", heads),
                            ("kmeans_iters", kmeans_iters)):
            _positive_int(name, value)
        if codebook_dim is not None:
            _positive_int("codebook_dim", codebook_dim)
        if orthogonal_reg_max_codes is not None:
            _positive_int("orthogonal_reg_max_codes", orthogonal_reg_max_codes)
        for name, value in (("decay", decay), ("sync_update_v", sync_update_v),
                            ("affine_param_batch_decay", affine_param_batch_decay),
                            ("affine_param_codebook_decay", affine_param_codebook_decay)):
            check_real(name, value, minimum=0.0, maximum=1.0)
        for name, value in (("eps", eps), ("commitment_weight", commitment_weight),
                            ("threshold_ema_dead_code", threshold_ema_dead_code),
                            ("sample_codebook_temp", sample_codebook_temp),
                            ("orthogonal_reg_weight", orthogonal_reg_weight),
                            ("codebook_diversity_loss_weight", codebook_diversity_loss_weight),
                            ("directional_reparam_variance", directional_reparam_variance)):
            check_real(name, value, minimum=0.0)
        check_real("codebook_diversity_temperature", codebook_diversity_temperature, above=0.0)
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("accept_image_fmap and accept_3d_fmap cannot both be True")

        ema_update = (not directional_reparam and vq_bridge is None) if ema_update is None else bool(ema_update)
        learnable_codebook = (directional_reparam or vq_bridge is not None) if learnable_codebook is None else bool(
            learnable_codebook)
        rotation_trick = (not directional_reparam and dim > 1) if rotation_trick is None else bool(rotation_trick)
        if use_cosine_sim and learnable_codebook:
            raise ValueError("use_cosine_sim=True is not compatible with learnable_codebook=True")
        if sum(map(bool, (straight_through, rotation_trick, directional_reparam))) > 1:
            raise ValueError("at most one of straight_through, rotation_trick and directional_reparam may be True "
                             "(pass rotation_trick=False with the others)")
        if directional_reparam and not float(threshold_ema_dead_code) > 0:
            raise ValueError("directional_reparam needs dead-code replacement (threshold_ema_dead_code > 0)")
        if straight_through and learnable_codebook:
            raise ValueError("straight_through is not compatible with learnable_codebook=True")
        if ema_update and learnable_codebook:
            raise ValueError("learnable_codebook=True is not compatible with ema_update=True (pass ema_update=False)")
        if vq_bridge is not None and not learnable_codebook:
            raise ValueError("vq_bridge needs learnable_codebook=True")
        if vq_bridge is not None and ema_update:
            raise ValueError("vq_bridge needs ema_update=False")
        if float(sync_update_v) > 0 and not learnable_codebook:
            raise ValueError("sync_update_v > 0 needs learnable_codebook=True")
        if affine_param and use_cosine_sim:
            raise ValueError("affine_param is only compatible with the euclidean codebook (use_cosine_sim=False)")
        if orthogonal_reg_active_codes_only and heads > 1 and separate_codebook_per_head:
            raise ValueError("orthogonal_reg_active_codes_only is not compatible with separate codebooks per head")

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
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()

        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.heads = heads
        self.separate_codebook_per_head = separate_codebook_per_head
        self.eps = float(eps)
        self.commitment_weight = float(commitment_weight)
        self.has_commitment_loss = self.commitment_weight > 0 and not directional_reparam
        self.commitment_use_cross_entropy_loss = commitment_use_cross_entropy_loss
        self.learnable_codebook = learnable_codebook
        self.orthogonal_reg_weight = float(orthogonal_reg_weight)
        self.has_codebook_orthogonal_loss = self.orthogonal_reg_weight > 0
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.codebook_diversity_loss_weight = float(codebook_diversity_loss_weight)
        self.has_codebook_diversity_loss = self.codebook_diversity_loss_weight > 0
        self.codebook_diversity_temperature = float(codebook_diversity_temperature)
        self.straight_through = straight_through
        self.rotation_trick = rotation_trick
        self.directional_reparam = directional_reparam
        self.directional_reparam_variance = float(directional_reparam_variance)
        self.route_gradients_to_input = route_gradients_to_input
        self.sync_update_v = float(sync_update_v)
        self.use_cosine_sim = use_cosine_sim
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
            learnable_codebook=self.has_codebook_orthogonal_loss or learnable_codebook,
            sample_codebook_temp=sample_codebook_temp,
            stochastic_sample_codes=stochastic_sample_codes,
            ema_update=ema_update,
            manual_ema_update=manual_ema_update,
            affine_param=affine_param,
            sync_affine_param=sync_affine_param,
            affine_param_batch_decay=affine_param_batch_decay,
            affine_param_codebook_decay=affine_param_codebook_decay,
            use_cosine_sim=use_cosine_sim,
            vq_bridge=vq_bridge,
        )
        self.in_place_codebook_optimizer = (
            in_place_codebook_optimizer(self._codebook.parameters()) if in_place_codebook_optimizer is not None
            else None
        )
        self.manual_in_place_optimizer_update = manual_in_place_optimizer_update
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)

    # ------------------------------------------------------------------ properties

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

    @property
    def _channels_first(self) -> bool:
        return not self.channel_last or self.accept_image_fmap or self.accept_3d_fmap

    # ------------------------------------------------------------------ methods of theirs

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """``indices`` as returned by ``forward`` -> the codes (of ``embed`` itself), in the layout
        of ``quantized`` before ``project_out`` (channels first for image/3-D maps or
        ``channel_last=False``)."""
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
        if self._channels_first and codes.dim() > 2:
            codes = codes.movedim(-1, 1)
        return codes

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """The layer's output for ``indices`` (codes through ``project_out``)."""
        codes = self.get_codes_from_indices(indices)
        if self.has_projections:
            channels_first = self._channels_first and codes.dim() > 2
            if channels_first:
                codes = codes.movedim(1, -1)
            codes = self.project_out(codes)
            if channels_first:
                codes = codes.movedim(-1, 1)
        return codes

    def update_in_place_optimizer(self) -> None:
        """One step of ``in_place_codebook_optimizer`` (gradients averaged over ranks under
        ``sync_codebook``), then ``zero_grad``; nothing without one."""
        if self.in_place_codebook_optimizer is None:
            return
        if self._codebook.use_ddp and is_distributed():
            world = torch.distributed.get_world_size()
            for parameter in self._codebook.parameters():
                if parameter.grad is not None:
                    all_reduce_sum_(parameter.grad)
                    parameter.grad /= world
        self.in_place_codebook_optimizer.step()
        self.in_place_codebook_optimizer.zero_grad()

    def maybe_split_heads_from_input(self, x: Tensor) -> Tensor:
        """``x [B, N, heads * d]`` -> ``[heads, B, N, d]`` (separate codebooks) or ``[1, B * heads, N, d]``."""
        if self.heads == 1:
            return x
        pattern = "h b n d" if self.separate_codebook_per_head else "1 (b h) n d"
        return rearrange(x, f"b n (h d) -> {pattern}", h=self.heads)

    def expire_codes_(self, x: Tensor) -> None:
        """Replaces dead codes by rows of ``x [B, N, codebook_dim * heads]`` (already projected), as
        vector-quantize-pytorch does; its leading axis is read as the codebooks'."""
        x = self._codebook.transform_input(x)
        self._codebook.expire_codes_(self.maybe_split_heads_from_input(x))

    def update_indices(self, x: Tensor, indices: Tensor, mask: Optional[Tensor] = None) -> None:
        """Trains the codebook by EMA on the codes ``indices`` (as ``forward`` returns them) for ``x``
        (as ``forward`` takes it), without searching."""
        if self.accept_image_fmap or self.accept_3d_fmap:
            if mask is not None:
                raise ValueError("update_indices takes no mask with image or 3-D feature maps")
            x = x.flatten(2).transpose(1, 2)
            indices = indices.flatten(1, 3 if self.accept_3d_fmap else 2)
        elif not self.channel_last:
            x = x.transpose(1, 2)
        x = self._codebook.transform_input(self.maybe_split_heads_from_input(self.project_in(x)))
        if self.heads > 1:
            pattern = "h b n" if self.separate_codebook_per_head else "1 (b h) n"
            indices = rearrange(indices, f"b n h -> {pattern}")
        if x.dim() == 2:
            indices = indices[:, None]
        self._codebook.update_indices(x, indices, mask=mask)

    update_ema_indices = update_indices

    # ------------------------------------------------------------------ layouts

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

    def _rows_pattern(self) -> str:
        """How the rows ``[C, M]`` of the codebooks hold the batch: vector-quantize-pytorch's order."""
        return "1 (b h n)" if self.heads > 1 and not self.separate_codebook_per_head else "h (b n)"

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        x: Tensor,
        indices: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        lens: Optional[Tensor] = None,
        topk: Optional[int] = None,
        sample_codebook_temp: Optional[float] = None,
        freeze_codebook: Optional[bool] = None,
        return_loss_breakdown: bool = False,
        codebook_transform_fn: Optional[Callable[[Tensor], Tensor]] = None,
        ema_update_weight: Union[Tensor, Callable, None] = None,
        accum_ema_update: bool = False,
        ema_update: Optional[bool] = None,
    ):
        """See the class docstring."""
        return self._forward(
            x, indices=indices, mask=mask, lens=lens, topk=topk, sample_codebook_temp=sample_codebook_temp,
            freeze_codebook=freeze_codebook, return_loss_breakdown=return_loss_breakdown,
            codebook_transform_fn=codebook_transform_fn, ema_update_weight=ema_update_weight,
            accum_ema_update=accum_ema_update, ema_update=ema_update,
        )

    def _forward(
        self,
        x: Tensor,
        *,
        indices: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        lens: Optional[Tensor] = None,
        topk: Optional[int] = None,
        sample_codebook_temp: Optional[float] = None,
        freeze_codebook: Optional[bool] = None,
        return_loss_breakdown: bool = False,
        codebook_transform_fn: Optional[Callable[[Tensor], Tensor]] = None,
        ema_update_weight: Union[Tensor, Callable, None] = None,
        accum_ema_update: bool = False,
        ema_update: Optional[bool] = None,
        active: Optional[Tensor] = None,
    ):
        """``forward``, plus ``active``: a bool scalar tensor that switches the whole call off on
        the device when False, as if every position were masked (ResidualVQ's quantize dropout
        decides which layers run without a host synchronisation)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        freeze_codebook = self.freeze_codebook if freeze_codebook is None else freeze_codebook
        if mask is not None and lens is not None:
            raise ValueError("pass mask or lens, not both")
        sequence, pattern, sizes = self._to_sequence(x)
        batch, length = sequence.shape[:2]
        if lens is not None:
            mask = lens_to_mask(lens, length)
        if mask is not None and (pattern not in ("b n d", "b d n") or mask.shape != (batch, length)
                                 or mask.dtype != torch.bool):
            raise ValueError(
                f"mask must be a bool [B, N] = [{batch}, {length}] tensor for a [B, N, dim] input, "
                f"got {tuple(mask.shape)} {mask.dtype} for x of shape {tuple(x.shape)}"
            )
        if topk is not None:
            quantized, embed_ind, loss, breakdown = self._topk_sequence(
                sequence, mask, topk, input_requires_grad=x.requires_grad, sample_codebook_temp=sample_codebook_temp,
                freeze_codebook=freeze_codebook, codebook_transform_fn=codebook_transform_fn, active=active,
            )
            quantized, embed_ind, loss = _from_sequence_topk(quantized.to(x.dtype), embed_ind, loss, pattern, sizes)
            return (quantized, embed_ind, loss, breakdown) if return_loss_breakdown else (quantized, embed_ind, loss)
        codebook = self._codebook
        input_requires_grad = x.requires_grad
        rows_pattern = self._rows_pattern()
        heads = self.heads
        projected = self.project_in(sequence)
        flatten = codebook.transform_input(
            rearrange(projected, f"b n (h d) -> {rows_pattern} d", h=heads)
        ).float()
        num_books = flatten.shape[0]
        valid = None
        if mask is not None:
            valid = repeat(mask, f"b n -> {rows_pattern}", h=heads)
        if active is not None:
            active = active.reshape(())
            valid = active.expand(flatten.shape[:2]) if valid is None else valid & active
        temperature = codebook.sample_codebook_temp if sample_codebook_temp is None else float(sample_codebook_temp)
        soft_temperature = temperature
        temperature = temperature if self.training and codebook.stochastic_sample_codes and temperature > 0 else 0.0
        training_codes = self.training and not freeze_codebook
        commit_grad = self.learnable_codebook and not freeze_codebook
        estimator = self.training and input_requires_grad and self.route_gradients_to_input
        # Gumbel straight-through: vector-quantize-pytorch's estimator x + sg(q - x) would discard
        # the soft assignment's gradient, so it is only computed where the estimator does not apply.
        live_soft = self.straight_through and self.training and not estimator and flatten.requires_grad
        soft_temperature = soft_temperature if live_soft and soft_temperature > 0 else 0.0
        if soft_temperature and codebook_transform_fn is not None:
            raise NotImplementedError("VectorQuantize(straight_through=True) with a codebook_transform_fn and an "
                                      "input without gradient (the soft codes' gradient) is not supported by fastvq")
        fuse = (
            estimator and not self.directional_reparam and codebook_transform_fn is None
        )
        fused_commit = fuse and self.has_commitment_loss and not self.commitment_use_cross_entropy_loss and valid is None
        update = dict(ema_update_weight=ema_update_weight, accum_ema_update=accum_ema_update,
                      ema_update=ema_update, active=active)

        codebook.init_embed_(flatten, valid)
        inplace_optimize_loss = self.zero
        if (self.in_place_codebook_optimizer is not None and training_codes
                and (active is None or bool(active))):
            _, search = self._codebook_pass(flatten, valid, codebook_transform_fn, temperature, None, training_codes,
                                            update)
            inplace_optimize_loss = self._masked_mean_square(search.codes, flatten.detach(), valid)
            inplace_optimize_loss.backward()
            if not self.manual_in_place_optimizer_update:
                self.update_in_place_optimizer()
            training_codes = False  # quantize again, without a second codebook update
        fused = (fused_commit, fused_commit and commit_grad) if fuse else None
        books, search = self._codebook_pass(flatten, valid, codebook_transform_fn, temperature, fused, training_codes,
                                            update, logit_losses=indices is not None or self.training and (
                                                self.commitment_use_cross_entropy_loss
                                                or self.has_codebook_diversity_loss),
                                            soft_temperature=soft_temperature)
        codes = search.codes
        embed_ind = search.indices

        if self.training:
            if estimator:
                if search.estimated is not None:
                    quantize = search.estimated
                elif self.directional_reparam:
                    quantize = directional_reparam(flatten, codes, self.directional_reparam_variance)
                elif self.rotation_trick:
                    quantize = rotate_to(flatten, codes)
                else:
                    quantize = flatten + (codes - flatten).detach()
            else:
                quantize = codes
            if self.sync_update_v > 0:
                quantize = quantize + self.sync_update_v * (quantize - quantize.detach())
        else:
            quantize = codes

        if indices is not None:
            targets = self._indices_to_rows(indices, batch, length)
            ce = self._cross_entropy(flatten, books, search, targets)
            return self._internal_layout(quantize.to(x.dtype), batch, length), ce

        embed_ind_for_loss = embed_ind if valid is None else torch.where(valid, embed_ind, -1)
        loss = self.zero
        commit_loss = orthogonal_reg_loss = codebook_diversity_loss_value = self.zero
        if self.training:
            if self.has_codebook_diversity_loss:
                codebook_diversity_loss_value = self._diversity(flatten, books, search, length)
                loss = loss + codebook_diversity_loss_value * self.codebook_diversity_loss_weight
            if self.has_commitment_loss:
                if self.commitment_use_cross_entropy_loss:
                    commit_loss = self._cross_entropy(flatten, books, search, embed_ind_for_loss)
                elif search.commitment is not None:
                    commit_loss = search.commitment
                else:
                    commit_q = codes if commit_grad else codes.detach()
                    target = flatten
                    if mask is not None and heads == 1 and not self.has_projections:
                        # vector-quantize-pytorch compares the masked codes with its input itself.
                        target = sequence.reshape(1, -1, sequence.shape[-1]).float()
                    commit_loss = self._masked_mean_square(commit_q, target, valid)
                loss = loss + commit_loss * self.commitment_weight
            if self.has_codebook_orthogonal_loss:
                orthogonal_reg_loss = self._orthogonal(embed_ind_for_loss, x.device)
                loss = loss + orthogonal_reg_loss * self.orthogonal_reg_weight
            if not loss.requires_grad and torch.is_grad_enabled():
                # vector-quantize-pytorch's training loss always requires grad (so backward() works).
                loss = loss.detach().requires_grad_()

        quantized = rearrange(quantize, f"{rows_pattern} d -> b n (h d)", b=batch, h=heads).to(projected.dtype)
        quantized = self.project_out(quantized).to(x.dtype)
        embed_ind = rearrange(embed_ind, f"{rows_pattern} -> b n h", b=batch, h=heads)
        if heads == 1:
            embed_ind = embed_ind[..., 0]
        if valid is not None:
            keep = active.expand(batch, length) if mask is None else mask if active is None else mask & active
            fill = torch.zeros_like(quantized) if self.return_zeros_for_masked_padding else sequence.to(quantized.dtype)
            quantized = torch.where(keep[..., None], quantized, fill)
            embed_ind = torch.where(keep[..., None] if heads > 1 else keep, embed_ind, -1)
        quantized, embed_ind = _from_sequence(quantized, embed_ind, pattern, sizes)
        if not return_loss_breakdown:
            return quantized, embed_ind, loss
        return quantized, embed_ind, loss, LossBreakdown(commit_loss, codebook_diversity_loss_value,
                                                         orthogonal_reg_loss, inplace_optimize_loss)

    # ------------------------------------------------------------------ top-k

    def _topk_sequence(self, sequence: Tensor, mask: Optional[Tensor], topk: int, *, input_requires_grad: bool,
                       sample_codebook_temp: Optional[float] = None, freeze_codebook: bool = False,
                       codebook_transform_fn: Optional[Callable] = None, active: Optional[Tensor] = None):
        """``forward(topk=k)`` on a sequence ``[B, N, dim]``: the ``k`` nearest codes of every
        position, as vector-quantize-pytorch returns them: ``quantized [B, N, k, dim]`` (through the
        estimator in training), ``indices [B, N, k]`` (``-1`` where masked), and the loss: per
        candidate ``[B, N, k]`` (the commitment mean over dimensions, weighted when the layer has a
        commitment loss) in eval and with a commitment loss in training, else a scalar. No codebook
        update. The search is ``nearest_codes``: no ``N x K`` matrix."""
        if self.heads != 1:
            raise ValueError(f"topk needs heads == 1, got heads = {self.heads}")
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be a positive int, got {topk!r}")
        if self.training and self.commitment_use_cross_entropy_loss:
            raise ValueError("topk is not compatible with commitment_use_cross_entropy_loss in training")
        if self.training and self.in_place_codebook_optimizer is not None:
            raise ValueError("topk is not compatible with in_place_codebook_optimizer in training")
        topk = min(topk, self.codebook_size)
        codebook = self._codebook
        batch, length = sequence.shape[:2]
        projected = self.project_in(sequence)
        flatten = codebook.transform_input(projected).reshape(1, batch * length, -1).float()
        valid = None if mask is None else mask.reshape(1, -1)
        if active is not None:
            active = active.reshape(())
            valid = active.expand(flatten.shape[:2]) if valid is None else valid & active
        temperature = codebook.sample_codebook_temp if sample_codebook_temp is None else float(sample_codebook_temp)
        temperature = temperature if self.training and codebook.stochastic_sample_codes and temperature > 0 else 0.0
        codebook.init_embed_(flatten, valid)
        if codebook.affine_param:
            codebook.update_affine(flatten, codebook.embed, valid)
        books = codebook.search_codebooks()
        if codebook_transform_fn is not None:
            search = self._search_transformed(flatten, books, codebook_transform_fn, temperature, topk)
        else:
            search = self._search_topk(flatten, books, temperature, topk)
        codes, indices = search.codes, search.indices
        codebook.record_usage(indices[..., 0] if valid is None else torch.where(valid, indices[..., 0], -1))
        rows = flatten[:, :, None, :].expand_as(codes)
        keep = None if valid is None else valid[..., None]
        commit_grad = self.learnable_codebook and not freeze_codebook
        zero = self.zero
        commit_loss = codebook_diversity_loss_value = orthogonal_reg_loss = zero
        if self.training:
            if input_requires_grad and self.route_gradients_to_input:
                if self.directional_reparam:
                    quantize = directional_reparam(rows, codes, self.directional_reparam_variance)
                elif self.rotation_trick:
                    quantize = rotate_to(rows, codes)
                else:
                    quantize = rows + (codes - rows).detach()
            else:
                quantize = codes
            if self.sync_update_v > 0:
                quantize = quantize + self.sync_update_v * (quantize - quantize.detach())
            loss = zero
            if self.has_codebook_diversity_loss:
                codebook_diversity_loss_value = self._diversity(flatten, books, search, length)
                loss = loss + codebook_diversity_loss_value * self.codebook_diversity_loss_weight
            if self.has_commitment_loss:
                commit_q = codes if commit_grad else codes.detach()
                commit_loss = (commit_q - rows).square().mean(dim=-1)
                if keep is not None:
                    commit_loss = torch.where(keep, commit_loss, 0.0)
                loss = loss + commit_loss * self.commitment_weight
            if self.has_codebook_orthogonal_loss:
                orthogonal_reg_loss = self._orthogonal(indices, flatten.device)
                loss = loss + orthogonal_reg_loss * self.orthogonal_reg_weight
            if not loss.requires_grad and torch.is_grad_enabled():
                loss = loss.detach().requires_grad_()
        else:
            quantize = codes
            commit_loss = (codes - rows).square().mean(dim=-1)
            if keep is not None:
                commit_loss = torch.where(keep, commit_loss, 0.0)
            loss = commit_loss * self.commitment_weight if self.has_commitment_loss else commit_loss
        quantized = self.project_out(quantize[0].reshape(batch, length, topk, -1).to(projected.dtype))
        indices = indices[0].reshape(batch, length, topk)
        if loss.dim() > 0:
            loss = loss[0].reshape(batch, length, topk)
        if commit_loss.dim() > 0:
            commit_loss = commit_loss[0].reshape(batch, length, topk)
        if valid is not None:
            keep_positions = valid[0].reshape(batch, length)
            fill = torch.zeros_like(quantized) if self.return_zeros_for_masked_padding else \
                sequence[:, :, None, :].to(quantized.dtype).expand_as(quantized)
            quantized = torch.where(keep_positions[..., None, None], quantized, fill)
            indices = torch.where(keep_positions[..., None], indices, -1)
        breakdown = LossBreakdown(commit_loss, codebook_diversity_loss_value, orthogonal_reg_loss, zero)
        return quantized, indices, loss, breakdown

    def _search_topk(self, flatten: Tensor, books: Tensor, temperature: float, topk: int) -> _Search:
        seed = draw_seed(flatten.device) if temperature > 0 else None
        book = books[0]
        indices, _ = nearest_codes(flatten[0], book.detach(), topk, metric=self._codebook.metric,
                                   sample_temperature=temperature, seed=seed)
        codes = F.embedding(indices, book) if book.requires_grad else book[indices]
        return _Search(indices[None], codes[None], None, None, None)

    # ------------------------------------------------------------------ pieces of forward

    def _codebook_pass(self, flatten: Tensor, valid: Optional[Tensor], transform: Optional[Callable],
                       temperature: float, fused: Optional[tuple[bool, bool]], update_codes: bool,
                       update: dict, logit_losses: bool = False,
                       soft_temperature: float = 0.0) -> tuple[Tensor, _Search]:
        """vector-quantize-pytorch's ``Codebook.forward``: the affine statistics, the search and
        gather, then (training) the codebook update. ``fused = (commitment, commitment grad to the
        codebook)`` runs the search, estimator and commitment loss as one fused op. With
        ``logit_losses`` the codes searched are kept as they were for the losses on the logits.
        ``soft_temperature > 0``: the codes are the Gumbel straight-through ones (``_search``)."""
        codebook = self._codebook
        if codebook.affine_param:
            codebook.update_affine(flatten, codebook.embed, valid)
        books = codebook.search_codebooks()
        if update_codes and logit_losses and not books.requires_grad:
            books = books.clone()  # the losses on the logits see the codes the search saw, not the updated ones
        if transform is not None:
            search = self._search_transformed(flatten, books, transform, temperature)
        else:
            search = self._search(flatten, books, temperature, fused, soft_temperature)
        if update_codes:
            codebook.update_codebook(flatten, search.indices, valid, **update)
        codebook.record_usage(search.indices if valid is None else torch.where(valid, search.indices, -1))
        return books, search

    def _search(self, flatten: Tensor, books: Tensor, temperature: float,
                fused: Optional[tuple[bool, bool]], soft_temperature: float = 0.0) -> _Search:
        """The search and gather of every head. ``soft_temperature > 0`` (not with ``fused``):
        vector-quantize-pytorch's ``gumbel_sample(straight_through=True)`` and codebook product,
        ``(one_hot + p - sg(p)) @ sg(C)`` with ``p = softmax(logits / T)``, without the N x K
        matrices: ``soft_quantize`` streams ``p`` over the codes (their logits, ``-cdist`` or the
        dot product of the normalised rows and codes) and picks the hard code as their argmax,
        after Gumbel noise when sampling."""
        metric = self._codebook.metric
        indices, codes, estimated, commitment = [], [], [], None
        for head in range(flatten.shape[0]):
            rows = flatten[head]
            book = books[head if books.shape[0] > 1 else 0]
            seed = draw_seed(rows.device) if temperature > 0 else None
            if fused is not None:
                commit, commit_grad = fused
                quantized, chosen, loss = vector_quantize(
                    rows, book if commit_grad else book.detach(), metric=metric, beta=1.0 if commit else 0.0,
                    codebook_weight=1.0 if commit_grad else 0.0, rotation_trick=self.rotation_trick,
                    sample_temperature=temperature, seed=seed,
                )
                if commit_grad:
                    # vector-quantize-pytorch's learnable-codebook loss is ONE term, mse(q, x), whose
                    # gradient reaches both x and the codes; the op's two terms carry exactly that
                    # gradient but twice that value, so half the value is taken back, detached.
                    loss = loss - 0.5 * loss.detach()
                if commit:
                    commitment = loss if commitment is None else commitment + loss
                estimated.append(quantized)
                chosen_codes = quantized.detach()
            elif soft_temperature > 0:
                # A copy: the EMA step rewrites the codes in place after this pass, and the backward
                # recomputes the probabilities from the codes it saved, which must stay these.
                book = book.detach().clone()
                soft, chosen, _ = soft_quantize(rows, book, metric="dot" if self._codebook.use_cosine_sim else "euclidean",
                                                temperature=soft_temperature, gumbel=seed is not None, seed=seed)
                chosen_codes = F.embedding(chosen, book) + (soft - soft.detach())
            else:
                chosen, _, chosen_codes = nearest_code(rows, book.detach(), metric=metric, return_codes=True,
                                                       sample_temperature=temperature, seed=seed)
            indices.append(chosen)
            codes.append(F.embedding(chosen, book) if book.requires_grad else chosen_codes)
        if commitment is not None:
            # Each head's loss is a mean over its rows; the layer's is the mean over all of them.
            commitment = commitment / flatten.shape[0]
        return _Search(torch.stack(indices), torch.stack(codes), torch.stack(estimated) if estimated else None,
                       commitment, None)

    def _search_transformed(self, flatten: Tensor, books: Tensor, transform: Callable,
                            temperature: float, topk: Optional[int] = None) -> _Search:
        """Per-row codebooks ``transform(books) [C, B, N, K, d]`` (QINCo's): they are ``N x K x d`` by
        construction, so their ``N x K`` logits are computed directly, as vector-quantize-pytorch does."""
        transformed = transform(books)
        transformed = transformed.reshape(transformed.shape[0], -1, *transformed.shape[-2:])
        if self._codebook.use_cosine_sim:
            transformed = l2norm(transformed)
            logits = torch.einsum("hnd,hncd->hnc", flatten, transformed)
        else:
            logits = -F.pairwise_distance(flatten[..., None, :], transformed)
        with torch.no_grad():
            scores = logits / temperature + gumbel_noise(logits) if temperature > 0 else logits
            indices = scores.argmax(dim=-1, keepdim=True) if topk is None else scores.topk(topk, dim=-1).indices
        codes = transformed.gather(2, indices[..., None].expand(*indices.shape, transformed.shape[-1]))
        if topk is None:
            indices, codes = indices[..., 0], codes[:, :, 0]
        return _Search(indices, codes, None, None, logits)

    @staticmethod
    def _masked_mean_square(values: Tensor, target: Tensor, valid: Optional[Tensor]) -> Tensor:
        """``mean((values - target)^2)`` over the rows where ``valid [C, M]`` (all rows without it)."""
        square = (values.float() - target.float()).square()
        if valid is None:
            return square.mean()
        weights = valid.to(torch.float32)[..., None]
        return (square * weights).sum() / (weights.sum().clamp_min(1.0) * values.shape[-1])

    def _indices_to_rows(self, indices: Tensor, batch: int, length: int) -> Tensor:
        """Indices in ``forward``'s output layout -> the rows' layout ``[C, M]``."""
        indices = indices.long().reshape(batch, length, self.heads)
        return rearrange(indices, f"b n h -> {self._rows_pattern()}")

    def _internal_layout(self, quantize: Tensor, batch: int, length: int) -> Tensor:
        """vector-quantize-pytorch's layout of ``quantize`` inside its forward, before the heads
        are merged: ``[B, N, d]``, ``[heads, B, N, d]`` or ``[1, B * heads, N, d]``."""
        if self.heads == 1:
            return quantize.reshape(batch, length, -1)
        pattern = "h b n d" if self.separate_codebook_per_head else "1 (b h) n d"
        return rearrange(quantize, f"{self._rows_pattern()} d -> {pattern}", b=batch, h=self.heads)

    def _cross_entropy(self, flatten: Tensor, books: Tensor, search: _Search, targets: Tensor) -> Tensor:
        if search.logits is not None:
            return F.cross_entropy(search.logits.reshape(-1, search.logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=-1)
        return code_cross_entropy(flatten, books, targets, metric=self._logit_metric)

    def _diversity(self, flatten: Tensor, books: Tensor, search: _Search, length: int) -> Tensor:
        positions = torch.arange(flatten.shape[1], device=flatten.device) % length
        if search.logits is not None:
            probabilities = (search.logits * self.codebook_diversity_temperature).softmax(dim=-1)
            average = probabilities.reshape(-1, length, probabilities.shape[-1]).mean(dim=0)
            return diversity_of_probabilities(average)
        return codebook_diversity_loss(flatten, books, positions, length,
                                       temperature=self.codebook_diversity_temperature, metric=self._logit_metric)

    @property
    def _logit_metric(self) -> str:
        # vector-quantize-pytorch's logits: -cdist, or the dot product of the normalised rows with the codes.
        return "dot" if self.use_cosine_sim else "l2"

    def _orthogonal(self, embed_ind: Tensor, device: torch.device) -> Tensor:
        codebook = self._codebook.embed
        num_codes = codebook.shape[-2]
        used = None
        if self.orthogonal_reg_active_codes_only:
            # -1 (a masked row under the cross-entropy loss) picks the last code, as theirs does.
            used = torch.zeros(num_codes, dtype=torch.bool, device=embed_ind.device)
            used[embed_ind.reshape(-1) % num_codes] = True
            used = used[None].expand(codebook.shape[0], -1)
        limit = self.orthogonal_reg_max_codes
        if limit is not None:
            if used is not None:
                codebook = codebook[:, used[0].nonzero().squeeze(1)]
                used = None
            if codebook.shape[-2] > limit:
                codebook = codebook[:, torch.randperm(codebook.shape[-2], device=device)[:limit]]
        return orthogonal_loss(codebook, used)


def _from_sequence_topk(quantized: Tensor, indices: Tensor, loss: Tensor, pattern: str,
                        sizes: dict) -> tuple[Tensor, Tensor, Tensor]:
    """Undoes ``VectorQuantize._to_sequence`` for top-k outputs ``[B, N, k, dim]``, ``[B, N, k]``
    (and a per-candidate loss), the candidates' axis last but for the features."""
    per_candidate = loss.dim() > 0
    if pattern == "b d":
        return quantized[:, 0], indices[:, 0], loss[:, 0] if per_candidate else loss
    if pattern == "b n d":
        return quantized, indices, loss
    if pattern == "b d n":
        return rearrange(quantized, "b n k d -> b d n k"), indices, loss
    if pattern == "b d h w":
        unflatten = lambda t: rearrange(t, "b (h w) ... -> b h w ...", **sizes)  # noqa: E731
        return (rearrange(quantized, "b (h w) k d -> b d h w k", **sizes), unflatten(indices),
                unflatten(loss) if per_candidate else loss)
    unflatten = lambda t: rearrange(t, "b (t h w) ... -> b t h w ...", **sizes)  # noqa: E731
    return (rearrange(quantized, "b (t h w) k d -> b d t h w k", **sizes), unflatten(indices),
            unflatten(loss) if per_candidate else loss)


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
