"""taming-transformers' quantizers (Esser et al. 2021) on fastvq's ops.

``VectorQuantizer2`` and ``GumbelQuantize`` keep the constructor arguments, attribute names,
state_dict keys (``embedding.weight``; ``proj.weight``, ``proj.bias``, ``embed.weight``; ``used``
when remapping) and return structures of ``taming.modules.vqvae.quantize``, so a VQGAN checkpoint
loads and a VQGAN training loop runs unchanged. The nearest-code search, gather, straight-through
estimator and both VQ losses of ``VectorQuantizer2`` run in ``fastvq.functional.vector_quantize``,
which never builds the ``N x K`` distance matrix that taming's version builds.

Differences from taming-transformers, stated rather than hidden:

- losses are float32 scalars whatever the input dtype;
- bad arguments raise ``ValueError``/``TypeError`` naming the argument (taming asserts or fails
  inside a matmul);
- ``remap_to_used`` draws the random replacement of an unknown index for every entry and keeps
  those of the unknown ones (taming draws only as many as there are unknown entries), so the
  random values differ from taming's for the same seed; known indices are identical. It never
  builds taming's ``N x len(used)`` match matrix, and it needs no host synchronisation, so it
  runs under ``torch.compile(fullgraph=True)``;
- ``unmap_to_all`` does not modify its argument in place;
- nothing is printed when remapping is set up.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..ops.vector_quantize import vector_quantize
from ._adopt import build_like

__all__ = ["VectorQuantizer2", "GumbelQuantize"]

RemapSource = Union[str, "os.PathLike[str]", Tensor]


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _finite_float(name: str, value: object, *, minimum: Optional[float] = None, exclusive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite float, got {value!r}")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        raise ValueError(f"{name} must be {'>' if exclusive else '>='} {minimum}, got {value!r}")
    return float(value)


def _is_integer(tensor: Tensor) -> bool:
    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


def _check_indices(indices: object) -> None:
    if not isinstance(indices, Tensor) or not _is_integer(indices):
        found = indices.dtype if isinstance(indices, Tensor) else type(indices).__name__
        raise TypeError(f"indices must be an integer tensor, got {found}")


def _check_fmap(z: object, channels: int, channel_name: str) -> Tensor:
    if not isinstance(z, Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"z must be a floating-point tensor, got dtype {z.dtype} with shape {tuple(z.shape)}")
    if z.dim() != 4 or z.shape[1] != channels:
        raise ValueError(
            f"z must be a feature map [B, {channel_name}={channels}, H, W], got shape {tuple(z.shape)}"
        )
    return z


def _remap_of(original: nn.Module) -> tuple[Optional[Tensor], Union[str, int]]:
    """``(used, unknown_index)`` to build a fastvq layer remapping as a live taming layer does (taming stores an
    ``"extra"`` unknown index as the int ``len(used)``)."""
    if getattr(original, "remap", None) is None:
        return None, "random"
    extra = original.re_embed > original.used.shape[0]
    return original.used, "extra" if extra else original.unknown_index


class _IndexRemap(nn.Module):
    """taming's post-hoc remapping of code indices onto the subset ``used`` of the codebook.

    ``used`` (a buffer of ``U`` code indices, loaded from a ``.npy`` file) lists the codes a
    trained model actually uses; ``remap_to_used`` turns a full index ``used[j]`` into ``j`` and
    ``unmap_to_all`` turns it back, so a prior over the ``U`` (or ``U + 1`` with an ``"extra"``
    unknown token) remapped indices can be trained.
    """

    num_codes: int

    def _setup_remap(self, remap: Optional[RemapSource], unknown_index: Union[str, int]) -> None:
        self.remap = remap
        if remap is None:
            self.re_embed = self.num_codes
            return
        if isinstance(remap, Tensor):
            used = remap.detach().clone()
        elif isinstance(remap, (str, os.PathLike)):
            import numpy as np

            used = torch.as_tensor(np.load(remap))
        else:
            raise TypeError(
                f"remap must be a path to a .npy file of code indices or a tensor, got {type(remap).__name__}"
            )
        if used.dim() != 1 or used.numel() == 0 or not _is_integer(used):
            raise ValueError(
                f"remap must hold a non-empty 1-D array of integer code indices, got dtype {used.dtype} "
                f"and shape {tuple(used.shape)}"
            )
        used = used.to(torch.int64)
        if int(used.min()) < 0 or int(used.max()) >= self.num_codes:
            raise ValueError(
                f"remap indices must lie in [0, {self.num_codes}), got values in [{int(used.min())}, {int(used.max())}]"
            )
        self.register_buffer("used", used)
        self.re_embed = used.shape[0]
        if unknown_index == "extra":
            unknown_index = self.re_embed
            self.re_embed += 1
        elif unknown_index != "random" and (
            not isinstance(unknown_index, int)
            or isinstance(unknown_index, bool)
            or not 0 <= unknown_index < self.re_embed
        ):
            raise ValueError(
                f'unknown_index must be "random", "extra" or an int in [0, {self.re_embed}) '
                f"(the number of used codes), got {unknown_index!r}"
            )
        self.unknown_index = unknown_index

    def remap_to_used(self, inds: Tensor) -> Tensor:
        """Full code indices (any shape, int) -> their positions in ``used`` (int64, same shape).

        An index not in ``used`` becomes ``unknown_index``, or a random index in
        ``[0, re_embed)`` when ``unknown_index == "random"``. Where ``used`` lists a code twice,
        its first position is taken.
        """
        if self.remap is None:
            raise RuntimeError("remap_to_used needs the layer to be built with remap=<path to a .npy of used indices>")
        used = self.used.to(device=inds.device)
        num_used = used.shape[0]
        positions = torch.arange(num_used, device=inds.device)
        lookup = torch.full((self.num_codes,), num_used, dtype=torch.int64, device=inds.device)
        lookup = lookup.scatter_reduce(0, used, positions, reduce="amin")
        inds = inds.long()
        inside = (inds >= 0) & (inds < self.num_codes)
        new = lookup[inds.clamp(0, self.num_codes - 1)]
        unknown = ~inside | (new == num_used)
        if self.unknown_index == "random":
            replacement = torch.randint(0, self.re_embed, inds.shape, device=inds.device)
        else:
            replacement = torch.full_like(new, self.unknown_index)
        return torch.where(unknown, replacement, new)

    def unmap_to_all(self, inds: Tensor) -> Tensor:
        """Remapped indices in ``[0, re_embed)`` (any shape) -> full code indices (int64, same shape).

        The ``"extra"`` unknown token maps to ``used[0]``, as in taming.
        """
        if self.remap is None:
            raise RuntimeError("unmap_to_all needs the layer to be built with remap=<path to a .npy of used indices>")
        used = self.used.to(device=inds.device)
        inds = inds.long()
        if self.re_embed > used.shape[0]:
            inds = torch.where(inds >= used.shape[0], torch.zeros_like(inds), inds)
        return used[inds]


class VectorQuantizer2(_IndexRemap):
    """taming-transformers' ``VectorQuantizer2``: VQGAN's quantizer for feature maps.

    Args:
        n_e: number of codes ``K``.
        e_dim: code dimension ``D``, the channel count of the input.
        beta: weight of one of the two VQ losses, see ``legacy``.
        remap: optional path to a ``.npy`` file (or a 1-D integer tensor) of the ``U`` code
            indices in use; the returned indices are then positions in that list
            (``remap_to_used``), and ``get_codebook_entry`` maps them back. Adds the buffer
            ``used`` to the state_dict.
        unknown_index: with ``remap``, what a code outside ``used`` becomes: ``"random"`` (a
            random index in ``[0, U)``), ``"extra"`` (the extra index ``U``) or an int in ``[0, U)``.
        sane_index_shape: return indices shaped ``[B, H, W]`` instead of flat.
        legacy: taming's default, which puts ``beta`` on the wrong term:
            ``loss = mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)``. With
            ``legacy=False`` the loss is VQ-VAE's ``beta * mean((sg[z_q] - z)^2) +
            mean((z_q - sg[z])^2)``.

    The codebook ``embedding.weight`` (``[n_e, e_dim]``, initialised uniform in
    ``[-1/n_e, 1/n_e]``) is trained by the loss's codebook term; its gradient reaches the chosen
    codes only.

    ``forward(z, temp=None, rescale_logits=False, return_logits=False)`` takes
    ``z [B, e_dim, H, W]`` (float32, float16, bfloat16 or float64; the last three arguments exist
    for interface compatibility with ``GumbelQuantize`` and must keep their defaults) and returns
    ``(z_q, loss, (perplexity, min_encodings, min_encoding_indices))``:

    - ``z_q``: ``[B, e_dim, H, W]`` contiguous, in ``z``'s dtype promoted with the codebook's;
      its value is the chosen codes, its gradient goes to ``z`` unchanged (straight through);
    - ``loss``: float32 scalar, as ``legacy`` describes;
    - ``perplexity`` and ``min_encodings``: ``None``, as in taming;
    - ``min_encoding_indices``: int64, ``[B*H*W]`` (``[B*H*W, 1]`` with ``remap``; ``[B, H, W]``
      with ``sane_index_shape``).

    Raises:
        ValueError: non-positive sizes, a non-finite or negative ``beta``, a bad ``remap`` or
            ``unknown_index``; in ``forward``, ``z`` not shaped ``[B, e_dim, H, W]`` or a
            non-default ``temp``/``rescale_logits``/``return_logits``.
        TypeError: a non-tensor or non-float ``z``.
    """

    def __init__(
        self,
        n_e: int,
        e_dim: int,
        beta: float,
        remap: Optional[RemapSource] = None,
        unknown_index: Union[str, int] = "random",
        sane_index_shape: bool = False,
        legacy: bool = True,
    ):
        super().__init__()
        self.n_e = _positive_int("n_e", n_e)
        self.e_dim = _positive_int("e_dim", e_dim)
        self.beta = _finite_float("beta", beta, minimum=0.0)
        self.legacy = bool(legacy)
        self.sane_index_shape = bool(sane_index_shape)
        self.embedding = nn.Embedding(self.n_e, self.e_dim)
        self.embedding.weight.data.uniform_(-1.0 / self.n_e, 1.0 / self.n_e)
        self._setup_remap(remap, unknown_index)

    @property
    def num_codes(self) -> int:
        return self.n_e

    @classmethod
    def from_original(cls, original: nn.Module) -> "VectorQuantizer2":
        """A layer holding the tensors (the same objects), configuration and training flag of a live
        ``taming.modules.vqvae.quantize.VectorQuantizer2``, for ``fastvq.swap_quantizers``."""
        used, unknown_index = _remap_of(original)
        config = dict(remap=used, unknown_index=unknown_index, sane_index_shape=original.sane_index_shape,
                      legacy=original.legacy)
        layer = build_like(original, lambda: cls(original.n_e, original.e_dim, original.beta, **config))
        layer.remap = original.remap
        return layer

    def _loss_weights(self) -> tuple[float, float]:
        """``(commitment_weight, codebook_weight)`` of the op for this layer's loss."""
        return (1.0, self.beta) if self.legacy else (self.beta, 1.0)

    def forward(
        self, z: Tensor, temp: Optional[float] = None, rescale_logits: bool = False, return_logits: bool = False
    ) -> tuple[Tensor, Tensor, tuple[None, None, Tensor]]:
        if not (temp is None or temp == 1.0):
            raise ValueError(
                "VectorQuantizer2 takes temp only for interface compatibility with GumbelQuantize: "
                f"it must be None or 1.0, got {temp!r}"
            )
        if rescale_logits or return_logits:
            raise ValueError(
                "VectorQuantizer2 takes rescale_logits and return_logits only for interface compatibility with "
                f"GumbelQuantize: both must be False, got rescale_logits={rescale_logits!r}, "
                f"return_logits={return_logits!r}"
            )
        z = _check_fmap(z, self.e_dim, "e_dim")
        batch, _, height, width = z.shape
        flat = rearrange(z, "b c h w -> (b h w) c")
        commitment_weight, codebook_weight = self._loss_weights()
        quantized, indices, loss = vector_quantize(
            flat, self.embedding.weight, metric="l2", beta=commitment_weight, codebook_weight=codebook_weight
        )
        z_q = rearrange(quantized, "(b h w) c -> b c h w", b=batch, h=height, w=width).contiguous()
        if self.remap is not None:
            indices = self.remap_to_used(indices.reshape(batch, -1)).reshape(-1, 1)
        if self.sane_index_shape:
            indices = indices.reshape(batch, height, width)
        return z_q, loss, (None, None, indices)

    def get_codebook_entry(self, indices: Tensor, shape: Optional[tuple[int, int, int, int]]) -> Tensor:
        """Codes of flat ``indices`` (remapped ones when ``remap`` is set).

        Returns ``[N, e_dim]`` when ``shape`` is None, else the feature map ``[b, c, h, w]`` for
        ``shape = (b, h, w, c)``, as taming.

        Raises:
            TypeError: non-integer ``indices``. ValueError: ``indices`` that do not fill ``shape``.
        """
        _check_indices(indices)
        if shape is not None:
            if len(shape) != 4 or math.prod(shape) != indices.numel() * self.e_dim:
                raise ValueError(
                    f"shape must be (batch, height, width, {self.e_dim}) with batch*height*width = {indices.numel()} "
                    f"(the number of indices), got {tuple(shape)}"
                )
        indices = indices.reshape(-1)
        if self.remap is not None:
            indices = self.unmap_to_all(indices)
        z_q = F.embedding(indices.long(), self.embedding.weight)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q


class GumbelQuantize(_IndexRemap):
    """taming-transformers' ``GumbelQuantize`` (Jang et al. 2016; karpathy's deep-vector-quantization).

    A 1x1 convolution ``proj`` turns the ``num_hiddens`` channels into ``n_embed`` logits per
    position; a Gumbel-softmax sample over them mixes (or, hard, picks) codes of ``embed``.

    Args:
        num_hiddens: channels of the input feature map.
        embedding_dim: code dimension ``D``, the channels of the output.
        n_embed: number of codes ``K``.
        straight_through: in training, sample hard one-hot codes with the straight-through
            gradient (True) or use the soft mixture (False). In eval mode the sample is always
            hard, as in taming; it is still a Gumbel sample, not the argmax of the logits.
        kl_weight: weight of ``KL(q || uniform) = sum(q * log(q * n_embed + 1e-10))``, averaged
            over positions, with ``q = softmax(logits)``.
        temp_init: the default temperature ``self.temperature`` (> 0); set the attribute to anneal.
        use_vqinterface: return ``(z_q, loss, (None, None, indices))`` like ``VectorQuantizer2``
            (True) or ``(z_q, loss, indices)``.
        remap, unknown_index: as ``VectorQuantizer2``; the logits are restricted to the ``used``
            codes, so every returned index is known.

    ``forward(z, temp=None, return_logits=False)`` takes ``z [B, num_hiddens, H, W]`` and an
    optional temperature overriding ``self.temperature``, and returns ``(z_q, diff, (None, None,
    ind))`` (plus ``logits`` last when ``return_logits``): ``z_q [B, embedding_dim, H, W]``,
    ``diff`` the float32 KL term, ``ind`` int64 ``[B, H, W]`` and ``logits [B, n_embed, H, W]``
    (``[B, U, H, W]`` with ``remap``). The sampling draws its Gumbel noise exactly as
    ``F.gumbel_softmax`` does, so with the same generator state the samples match taming's.

    The ``[B, n_embed, H, W]`` logits, their softmax and the soft mixture are the model's own
    ``N x K`` tensors, inherent to the method. A hard sample gathers its codes instead of
    multiplying a one-hot matrix, and its straight-through term (the soft mixture, which carries
    the gradient to the logits) is only computed when autograd is recording. The softmax and the
    KL term are computed in float32, so float16 logits cannot turn ``0 * log(0)`` into NaN.

    Raises:
        ValueError: non-positive sizes or temperature, a non-finite ``kl_weight``, a bad
            ``remap``/``unknown_index``; in ``forward``, ``z`` not shaped ``[B, num_hiddens, H, W]``.
        TypeError: a non-tensor or non-float ``z``.
    """

    def __init__(
        self,
        num_hiddens: int,
        embedding_dim: int,
        n_embed: int,
        straight_through: bool = True,
        kl_weight: float = 5e-4,
        temp_init: float = 1.0,
        use_vqinterface: bool = True,
        remap: Optional[RemapSource] = None,
        unknown_index: Union[str, int] = "random",
    ):
        super().__init__()
        self.num_hiddens = _positive_int("num_hiddens", num_hiddens)
        self.embedding_dim = _positive_int("embedding_dim", embedding_dim)
        self.n_embed = _positive_int("n_embed", n_embed)
        self.straight_through = bool(straight_through)
        self.temperature = _finite_float("temp_init", temp_init, minimum=0.0, exclusive=True)
        self.kl_weight = _finite_float("kl_weight", kl_weight)
        self.use_vqinterface = bool(use_vqinterface)
        self.proj = nn.Conv2d(num_hiddens, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embedding_dim)
        self._setup_remap(remap, unknown_index)

    @property
    def num_codes(self) -> int:
        return self.n_embed

    @classmethod
    def from_original(cls, original: nn.Module) -> "GumbelQuantize":
        """A layer holding the tensors (the same objects), configuration and training flag of a live
        ``taming.modules.vqvae.quantize.GumbelQuantize``, for ``fastvq.swap_quantizers``."""
        used, unknown_index = _remap_of(original)
        config = dict(
            straight_through=original.straight_through, kl_weight=original.kl_weight,
            temp_init=original.temperature, use_vqinterface=original.use_vqinterface, remap=used,
            unknown_index=unknown_index,
        )
        layer = build_like(
            original, lambda: cls(original.proj.in_channels, original.embedding_dim, original.n_embed, **config)
        )
        layer.remap = original.remap
        return layer

    def forward(self, z: Tensor, temp: Optional[float] = None, return_logits: bool = False):
        z = _check_fmap(z, self.num_hiddens, "num_hiddens")
        hard = self.straight_through if self.training else True
        temp = self.temperature if temp is None else temp
        if not isinstance(temp, Tensor):
            temp = _finite_float("temp", temp, minimum=0.0, exclusive=True)

        logits = self.proj(z)
        codes = self.embed.weight
        if self.remap is not None:
            logits = logits.index_select(1, self.used)
            codes = codes.index_select(0, self.used)
        scores = logits.float()
        # The noise is drawn exactly as F.gumbel_softmax draws it, so seeded runs match taming.
        gumbels = -torch.empty_like(scores, memory_format=torch.legacy_contiguous_format).exponential_().log()
        y_soft = ((scores + gumbels) / temp).softmax(dim=1)
        choice = y_soft.argmax(dim=1)
        if hard:
            chosen = self.used[choice] if self.remap is not None else choice
            z_q = rearrange(F.embedding(chosen, self.embed.weight), "b h w d -> b d h w")
            if torch.is_grad_enabled():
                # Straight through: the value stays the gathered code, the gradient reaches the
                # logits through the soft sample (and the codebook only through the gather).
                soft = torch.einsum("bnhw,nd->bdhw", y_soft, codes.detach())
                z_q = z_q + (soft - soft.detach())
        else:
            z_q = torch.einsum("bnhw,nd->bdhw", y_soft, codes)

        qy = scores.softmax(dim=1)
        diff = self.kl_weight * torch.sum(qy * torch.log(qy * self.n_embed + 1e-10), dim=1).mean()

        ind = self.remap_to_used(self.used[choice]) if self.remap is not None else choice
        if self.use_vqinterface:
            if return_logits:
                return z_q, diff, (None, None, ind), logits
            return z_q, diff, (None, None, ind)
        return z_q, diff, ind

    def get_codebook_entry(self, indices: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
        """Flat ``indices [b*h*w]`` (remapped ones when ``remap`` is set) -> ``[b, embedding_dim, h, w]``
        for ``shape = (b, h, w, c)``, as taming.

        Raises:
            TypeError: non-integer ``indices``. ValueError: ``indices`` that do not fill ``shape``.
        """
        _check_indices(indices)
        if len(shape) != 4:
            raise ValueError(f"shape must be (batch, height, width, channels), got {tuple(shape)}")
        b, h, w, _ = shape
        if indices.dim() != 1 or b * h * w != indices.shape[0]:
            raise ValueError(
                f"indices must be flat with batch*height*width = {b * h * w} entries for shape {tuple(shape)}, "
                f"got shape {tuple(indices.shape)}"
            )
        indices = rearrange(indices, "(b h w) -> b h w", b=b, h=h, w=w)
        if self.remap is not None:
            indices = self.unmap_to_all(indices)
        return rearrange(F.embedding(indices.long(), self.embed.weight), "b h w d -> b d h w")
