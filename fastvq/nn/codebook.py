"""``Codebook``: the codebooks of :class:`fastvq.nn.VectorQuantize`, with vector-quantize-pytorch's
buffer names, EMA training, dead-code replacement, k-means initialisation and affine statistics.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from einops import repeat
from torch import Tensor, nn

from .._checks import check_real
from .._distributed import all_reduce_sum_, is_distributed, sample_rows
from ..clustering import kmeans
from ..ops.segment_reduce import segment_reduce
from .errors import raises_config_error

# vector-quantize-pytorch's l2norm floor.
L2NORM_EPS = 1e-6


def l2norm(tensor: Tensor) -> Tensor:
    return F.normalize(tensor, dim=-1, eps=L2NORM_EPS)


def perplexity_of(counts: Tensor) -> Tensor:
    """``exp(entropy)`` of the code usage ``counts [..., K]``; K when uniform, 1 when one code."""
    probs = counts / counts.sum(dim=-1, keepdim=True).clamp_min(1.0)
    return torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum(dim=-1))


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

    @raises_config_error
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
            # every iteration on all rows (no sample), as vector-quantize-pytorch's kmeans
            means, assignments, _ = kmeans(rows, self.codebook_size, iters=self.kmeans_iters, init=means,
                                           metric="cosine" if self.use_cosine_sim else "l2", tol=None,
                                           empty_clusters="keep", sync=synced, max_points_per_centroid=None)
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
