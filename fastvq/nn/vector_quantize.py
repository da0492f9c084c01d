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
from .._distributed import all_reduce_sum_, is_distributed
from ..losses import (
    code_cross_entropy,
    codebook_diversity_loss,
    directional_reparam,
    diversity_of_probabilities,
    orthogonal_loss,
    rotate_to,
)
from ..ops.search import draw_seed, nearest_code
from ..ops.sinkhorn import sinkhorn_assign
from ..ops.soft_quantize import soft_quantize
from ..ops.topk import nearest_codes
from ..ops.vector_quantize import vector_quantize
from ._adopt import build_like
from .codebook import L2NORM_EPS, Codebook, l2norm, perplexity_of  # noqa: F401  (importable from here as before)
from .errors import raises_config_error

LossBreakdown = namedtuple("LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"])


def lens_to_mask(lens: Tensor, max_length: int) -> Tensor:
    return torch.arange(max_length, device=lens.device) < lens[:, None]


def vqp_gumbel_noise(tensor: Tensor) -> Tensor:
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


def vqp_vector_quantize_config(original: nn.Module) -> dict:
    """The constructor arguments (after ``dim`` and ``codebook_size``) of a live vector-quantize-pytorch
    ``VectorQuantize``, read back from its attributes; its in-place codebook optimizer is passed on as is."""
    codebook = original._codebook
    sampling = codebook.gumbel_sample.keywords
    distributed_kmeans = getattr(codebook.sample_fn, "__name__", "") == "sample_vectors_distributed"
    optimizer = original.in_place_codebook_optimizer
    return dict(
        codebook_dim=codebook.embed.shape[-1],
        heads=original.heads,
        separate_codebook_per_head=original.separate_codebook_per_head,
        decay=codebook.decay,
        eps=original.eps,
        freeze_codebook=original.freeze_codebook,
        kmeans_init=not bool(codebook.initted),
        kmeans_iters=codebook.kmeans_iters,
        sync_kmeans=distributed_kmeans or not codebook.use_ddp,
        use_cosine_sim=original.use_cosine_sim,
        layernorm_after_project_in=any(isinstance(m, nn.LayerNorm) for m in original.project_in.modules()),
        threshold_ema_dead_code=codebook.threshold_ema_dead_code,
        channel_last=original.channel_last,
        accept_image_fmap=original.accept_image_fmap,
        accept_3d_fmap=original.accept_3d_fmap,
        commitment_weight=original.commitment_weight,
        commitment_use_cross_entropy_loss=original.commitment_use_cross_entropy_loss,
        orthogonal_reg_weight=original.orthogonal_reg_weight,
        orthogonal_reg_active_codes_only=original.orthogonal_reg_active_codes_only,
        orthogonal_reg_max_codes=original.orthogonal_reg_max_codes,
        codebook_diversity_loss_weight=original.codebook_diversity_loss_weight,
        codebook_diversity_temperature=original.codebook_diversity_temperature,
        stochastic_sample_codes=sampling.get("stochastic", False),
        sample_codebook_temp=codebook.sample_codebook_temp,
        straight_through=sampling.get("straight_through", False),
        rotation_trick=original.rotation_trick,
        directional_reparam=original.directional_reparam,
        directional_reparam_variance=original.directional_reparam_variance,
        sync_codebook=codebook.use_ddp,
        sync_affine_param=codebook.sync_affine_param,
        ema_update=codebook.ema_update,
        vq_bridge=codebook.vq_bridge,
        manual_ema_update=codebook.manual_ema_update,
        learnable_codebook=original.learnable_codebook,
        in_place_codebook_optimizer=None if optimizer is None else lambda _: optimizer,
        manual_in_place_optimizer_update=original.manual_in_place_optimizer_update,
        affine_param=codebook.affine_param,
        affine_param_batch_decay=getattr(codebook, "affine_param_batch_decay", 0.99),
        affine_param_codebook_decay=getattr(codebook, "affine_param_codebook_decay", 0.9),
        sync_update_v=original.sync_update_v,
        return_zeros_for_masked_padding=original.return_zeros_for_masked_padding,
        route_gradients_to_input=original.route_gradients_to_input,
    )


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
    - ``sinkhorn_iters``, ``sinkhorn_epsilon`` (fastvq; default 0, off): in training, each head's codes are the
      balanced assignment of :func:`fastvq.functional.sinkhorn_assign` over the batch (``sinkhorn_iters``
      log-domain iterations at ``sinkhorn_epsilon``, on the layer's metric with LC-Rec's min-max cost
      normalisation, as the semantic-ID tokenizers' ``VectorQuantizer(..., sk_epsilon, sk_iters)``) instead of
      the nearest code; on only when both are ``> 0`` (LC-Rec's ``sk_epsilon <= 0`` is the nearest code). The
      loss and estimator are the usual ones on the chosen codes; masked positions take part in the marginals.

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

    @raises_config_error
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
        *,
        sinkhorn_iters: int = 0,
        sinkhorn_epsilon: float = 0.0,
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
        if isinstance(sinkhorn_iters, bool) or not isinstance(sinkhorn_iters, int) or sinkhorn_iters < 0:
            raise ValueError(f"sinkhorn_iters must be an int >= 0, got {sinkhorn_iters!r}")
        self.sinkhorn_iters = sinkhorn_iters
        self.sinkhorn_epsilon = check_real("sinkhorn_epsilon", sinkhorn_epsilon, minimum=0.0)

    @classmethod
    def from_original(cls, original: nn.Module) -> "VectorQuantize":
        """A layer holding the tensors of a live vector-quantize-pytorch ``VectorQuantize`` (the same objects),
        its configuration and training flags, for ``fastvq.swap_quantizers``.

        Its ``vq_bridge`` module and in-place codebook optimizer, if any, are shared, not copied.

        Raises:
            ValueError: an option of ``original`` that this layer would not reproduce.
        """
        config = vqp_vector_quantize_config(original)
        return build_like(original, lambda: cls(original.dim, original.codebook_size, **config))

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
                raise ValueError(f"x must be an image feature map [B, {dim}, H, W] (accept_image_fmap=True), "
                                 f"got shape {tuple(x.shape)}")
            return rearrange(x, "b d h w -> b (h w) d"), "b d h w", dict(h=x.shape[2], w=x.shape[3])
        if self.accept_3d_fmap:
            if x.dim() != 5 or x.shape[1] != dim:
                raise ValueError(f"x must be a 3-D feature map [B, {dim}, T, H, W] (accept_3d_fmap=True), "
                                 f"got shape {tuple(x.shape)}")
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
        *,
        active: Optional[Tensor] = None,
    ):
        """See the class docstring. ``active`` (not in vector-quantize-pytorch) is a bool scalar tensor
        that switches the whole call off on the device when False, as if every position were masked
        (ResidualVQ's quantize dropout decides which layers run without a host synchronisation)."""
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
        fused_commit = (fuse and self.has_commitment_loss and not self.commitment_use_cross_entropy_loss
                        and valid is None)
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

        # n as well as b: with an empty batch einops cannot infer n from b
        quantized = rearrange(quantize, f"{rows_pattern} d -> b n (h d)", b=batch, n=length, h=heads)
        quantized = quantized.to(projected.dtype)
        quantized = self.project_out(quantized).to(x.dtype)
        embed_ind = rearrange(embed_ind, f"{rows_pattern} -> b n h", b=batch, n=length, h=heads)
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
        elif self._balanced_codes():
            search = self._search_balanced(flatten, books)
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
                soft_metric = "dot" if self._codebook.use_cosine_sim else "euclidean"
                soft, chosen, _ = soft_quantize(rows, book, metric=soft_metric, temperature=soft_temperature,
                                                gumbel=seed is not None, seed=seed)
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

    def _balanced_codes(self) -> bool:
        return self.training and self.sinkhorn_iters > 0 and self.sinkhorn_epsilon > 0

    def _search_balanced(self, flatten: Tensor, books: Tensor) -> _Search:
        """Each head's codes by Sinkhorn over its rows (``sinkhorn_iters``, ``sinkhorn_epsilon``): no fused
        loss or estimator; the forward applies them to these codes."""
        indices, codes = [], []
        for head in range(flatten.shape[0]):
            book = books[head if books.shape[0] > 1 else 0]
            chosen, _, _ = sinkhorn_assign(flatten[head], book.detach(), epsilon=self.sinkhorn_epsilon,
                                           iters=self.sinkhorn_iters, metric=self._codebook.metric,
                                           normalize="minmax")
            indices.append(chosen)
            codes.append(F.embedding(chosen, book) if book.requires_grad else book.detach()[chosen])
        return _Search(torch.stack(indices), torch.stack(codes), None, None, None)

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
            scores = logits / temperature + vqp_gumbel_noise(logits) if temperature > 0 else logits
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
        return rearrange(quantize, f"{self._rows_pattern()} d -> {pattern}", b=batch, n=length, h=self.heads)

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
