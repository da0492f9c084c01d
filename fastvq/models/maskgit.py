"""MaskGIT (Chang et al. 2022, "MaskGIT: Masked Generative Image Transformer"): a bidirectional
transformer over a VQ model's code map, trained to predict masked codes, sampled by iterative
parallel decoding.

Training hides a share ``gamma(r)`` of the codes of each map, with ``r`` uniform in ``[0, 1)`` and
the cosine schedule ``gamma(r) = cos(pi r / 2)``, and scores the cross-entropy of the hidden codes
only. Sampling starts from a fully masked map; at step ``t`` of ``T`` it draws every masked code at
once, keeps the most confident draws and hides the rest again, so that ``gamma((t + 1) / T)`` of
the map stays masked; a code once kept never changes. ``T`` forward passes (8 in the paper for a
16 x 16 map) replace the ``H * W`` of a raster-order prior.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_float, check_positive_int
from .gpt_prior import GPTPrior, _Transformer, check_prior_arguments, filter_logits

__all__ = ["MaskGITPrior", "cosine_mask_schedule"]

# MaskGIT's default randomness of the re-masking choice (annealed to 0 over the steps).
CHOICE_TEMPERATURE = 4.5


def cosine_mask_schedule(ratio: Tensor | float) -> Tensor | float:
    """MaskGIT's mask schedule ``gamma(r) = cos(pi r / 2)``: the share of codes still masked at
    progress ``r`` in ``[0, 1]`` (1 at the start, 0 at the end)."""
    if isinstance(ratio, Tensor):
        return torch.cos(ratio * (math.pi / 2))
    return math.cos(ratio * math.pi / 2)


class MaskGITPrior(nn.Module):
    """A bidirectional transformer over the codes of a VQ model, trained by masked-code prediction.

    Args:
        num_codes: ``K``, codes per position (per depth).
        seq_len: positions ``L`` (``H * W`` of the code map).
        depth: codes per position (``RQVAE``'s depth); the ``L * depth`` codes are the tokens, each
            with its own position embedding, and any of them may be masked.
        dim, num_layers, heads, dropout: the transformer's width, blocks, attention heads and
            dropout (during training).
        num_classes: condition on a class label ``cond`` int64 ``[B]`` (one prefix token).
        cond_num_codes, cond_len: condition on ``cond_len`` codes in ``[0, cond_num_codes)`` given
            as ``cond`` int64 ``[B, ...]`` (VQ-VAE-2's top codes for the bottom map): prefix tokens
            that every code attends to and that are never masked.

    ``forward(codes, mask, cond=None)`` takes codes ``[B, H, W]`` or ``[B, L]`` (``[B, H, W, depth]``
    or ``[B, L, depth]`` when ``depth > 1``) and a bool ``mask`` of the same shape (True: hidden
    from the model, replaced by the mask token) and returns logits ``[B, L, K]`` (``[B, L, depth,
    K]``) for every code. ``loss`` is the training objective, ``sample`` the iterative decoding.

    Raises:
        ValueError: bad sizes, both kinds of conditioning, or codes / mask / ``cond`` of the wrong shape.
    """

    def __init__(
        self,
        num_codes: int,
        seq_len: int,
        *,
        depth: int = 1,
        dim: int = 256,
        num_layers: int = 4,
        heads: int = 4,
        dropout: float = 0.0,
        num_classes: Optional[int] = None,
        cond_num_codes: Optional[int] = None,
        cond_len: Optional[int] = None,
    ):
        super().__init__()
        check_prior_arguments(num_codes=num_codes, seq_len=seq_len, depth=depth, dim=dim, num_layers=num_layers,
                              heads=heads, dropout=dropout, num_classes=num_classes, cond_num_codes=cond_num_codes,
                              cond_len=cond_len)
        self.num_codes = num_codes
        self.seq_len = seq_len
        self.depth = depth
        self.num_tokens = seq_len * depth
        self.num_classes = num_classes
        self.cond_num_codes = cond_num_codes
        self.cond_len = cond_len or 0
        self.prefix_len = self.cond_len if cond_num_codes else (1 if num_classes else 0)
        # K codes per depth, then the one mask token.
        self.mask_token = num_codes * depth
        self.code_embedding = nn.Embedding(num_codes * depth + 1, dim)
        self.class_embedding = nn.Embedding(num_classes, dim) if num_classes else None
        self.cond_embedding = nn.Embedding(cond_num_codes, dim) if cond_num_codes else None
        self.position = nn.Parameter(torch.zeros(1, self.prefix_len + self.num_tokens, dim))
        self.transformer = _Transformer(dim, num_layers, heads, dropout, causal=False)
        self.head = nn.Linear(dim, num_codes)
        self.apply(GPTPrior._init_weights)
        nn.init.normal_(self.position, std=0.02)

    # -- inputs

    def _flatten_codes(self, codes: object, name: str = "codes") -> Tensor:
        """Codes (or a mask of their shape) -> ``[B, L * depth]``, depth fastest."""
        allowed = (torch.bool,) if name == "mask" else (torch.int64, torch.int32)
        if not isinstance(codes, Tensor) or codes.dtype not in allowed:
            found = f"{codes.dtype} tensor" if isinstance(codes, Tensor) else type(codes).__name__
            raise ValueError(f"{name} must be a{' bool' if name == 'mask' else 'n int64'} tensor, got {found}")
        layout = "[B, H, W] or [B, L]" if self.depth == 1 else f"[B, H, W, {self.depth}] or [B, L, {self.depth}]"
        if self.depth == 1:
            ok = codes.dim() in (2, 3)
        else:
            ok = codes.dim() in (3, 4) and codes.shape[-1] == self.depth
        if not ok or math.prod(codes.shape[1:]) != self.num_tokens:
            raise ValueError(f"{name} must be {layout} with {self.seq_len} positions, got shape {tuple(codes.shape)}")
        flat = codes.reshape(codes.shape[0], self.num_tokens)
        return flat if name == "mask" else flat.long()

    def _prefix(self, cond: Optional[Tensor], batch: int) -> Optional[Tensor]:
        """The condition tokens ``[B, prefix_len, dim]`` (without positions), or None."""
        if self.num_classes is None and self.cond_num_codes is None:
            if cond is not None:
                raise ValueError("MaskGITPrior was built without conditioning, but cond was given")
            return None
        if not isinstance(cond, Tensor) or cond.dtype not in (torch.int64, torch.int32) or cond.shape[0] != batch:
            shape = tuple(cond.shape) if isinstance(cond, Tensor) else cond
            what = (f"class labels [{batch}]" if self.num_classes
                    else f"[{batch}, ...] codes with {self.cond_len} per row")
            raise ValueError(f"cond must be int64 {what}, got {shape}")
        if self.num_classes is not None:
            if cond.dim() != 1:
                raise ValueError(f"cond must be int64 class labels [{batch}], got shape {tuple(cond.shape)}")
            return self.class_embedding(cond.long())[:, None]
        flat = cond.reshape(batch, -1)
        if flat.shape[1] != self.cond_len:
            raise ValueError(f"cond must hold {self.cond_len} codes per row, got shape {tuple(cond.shape)}")
        return self.cond_embedding(flat.long())

    def _logits(self, flat: Tensor, mask: Tensor, cond: Optional[Tensor]) -> Tensor:
        """Flat codes and mask ``[B, L * depth]`` -> logits ``[B, L * depth, K]``."""
        levels = torch.arange(self.num_tokens, device=flat.device) % self.depth
        tokens = torch.where(mask, self.mask_token, flat + levels * self.num_codes)
        x = self.code_embedding(tokens)
        prefix = self._prefix(cond, flat.shape[0])
        if prefix is not None:
            x = torch.cat([prefix, x], dim=1)
        return self.head(self.transformer(x + self.position)[:, self.prefix_len :])

    def _shape_logits(self, logits: Tensor) -> Tensor:
        if self.depth == 1:
            return logits
        return logits.reshape(logits.shape[0], self.seq_len, self.depth, self.num_codes)

    # -- training

    def forward(self, codes: Tensor, mask: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        flat = self._flatten_codes(codes)
        hidden = self._flatten_codes(mask, "mask")
        if hidden.shape[0] != flat.shape[0]:
            raise ValueError(f"mask must have the shape of codes {tuple(codes.shape)}, got {tuple(mask.shape)}")
        return self._shape_logits(self._logits(flat, hidden, cond))

    def random_mask(self, batch: int, device: torch.device, generator: Optional[torch.Generator] = None) -> Tensor:
        """MaskGIT's training mask, bool ``[batch, L * depth]``: per row, ``ceil(gamma(r) * N)`` of
        the ``N = L * depth`` codes (at least one) chosen uniformly, with ``r`` uniform in ``[0, 1)``."""
        ratio = torch.rand(batch, 1, device=device, generator=generator)
        count = torch.ceil(cosine_mask_schedule(ratio) * self.num_tokens).clamp(1, self.num_tokens)
        scores = torch.rand(batch, self.num_tokens, device=device, generator=generator)
        # The `count` lowest scores of a row are masked: a uniformly random subset of that size.
        ranks = scores.argsort(dim=1).argsort(dim=1)
        return ranks < count

    def loss(
        self, codes: Tensor, cond: Optional[Tensor] = None, *, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """Mean cross-entropy (nats) of the masked codes under a fresh ``random_mask``, float32.

        The masks come from ``generator`` (the global generator when None): pass a freshly seeded
        one to score held-out codes under the same masks every time.
        """
        flat = self._flatten_codes(codes)
        mask = self.random_mask(flat.shape[0], flat.device, generator)
        logits = self._logits(flat, mask, cond)
        return F.cross_entropy(logits[mask].float(), flat[mask])

    # -- sampling

    @torch.no_grad()
    def sample(
        self,
        n: int,
        shape: Optional[Sequence[int]] = None,
        cond: Optional[Tensor] = None,
        *,
        steps: int = 8,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        choice_temperature: float = CHOICE_TEMPERATURE,
        generator: Optional[torch.Generator] = None,
        codes: Optional[Tensor] = None,
        known: Optional[Tensor] = None,
    ) -> Tensor:
        """Draws ``n`` code maps by MaskGIT's iterative parallel decoding.

        Args:
            n: number of samples, ``>= 0``.
            shape: ``(H, W)`` with ``H * W == seq_len`` to get maps ``[n, H, W]`` (``[n, H, W,
                depth]``); ``None`` gives ``[n, seq_len]`` (``[n, seq_len, depth]``).
            cond: class labels ``[n]`` or condition codes ``[n, ...]``, as in ``forward``.
            steps: decoding steps ``T >= 1``; each runs the transformer once on the whole map.
                After step ``t`` (from 1), ``floor(gamma(t / T) * N0)`` of the ``N0`` codes that
                were unknown at the start stay masked (at least one, while more than one is
                unknown; none after the last step), ``gamma`` the cosine schedule.
            temperature: the masked codes are drawn from ``softmax(logits / temperature)``; 0 takes
                the most likely code.
            top_k, top_p: draw among the ``top_k`` most likely codes / the nucleus of mass ``top_p``.
            choice_temperature: the codes to re-mask are the least confident draws after adding
                Gumbel noise of this scale times ``1 - t / T`` to their log-probabilities (4.5 in
                MaskGIT); 0 re-masks exactly the least confident.
            generator: a ``torch.Generator`` on the model's device, for reproducible draws.
            codes, known: inpainting: codes ``[n, ...]`` as in ``forward`` and a bool mask of the
                same shape; the codes where ``known`` is True are kept as given, the others drawn.

        Returns:
            int64 codes on the model's device.
        """
        check_positive_int("n", n, minimum=0)
        check_positive_int("steps", steps)
        if shape is not None:
            shape = tuple(shape)
            if len(shape) != 2 or math.prod(shape) != self.seq_len:
                raise ValueError(f"shape must be (H, W) with H * W = {self.seq_len}, got {shape!r}")
        check_float("temperature", temperature, minimum=0.0)
        check_float("choice_temperature", choice_temperature, minimum=0.0)
        if top_k is not None and (
            not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= self.num_codes
        ):
            raise ValueError(f"top_k must be None or an int in [1, {self.num_codes}], got {top_k!r}")
        if top_p is not None and (check_float("top_p", top_p) <= 0 or top_p > 1):
            raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
        device = self.head.weight.device
        if (codes is None) != (known is None):
            raise ValueError("codes and known go together (inpainting)")
        if codes is None:
            flat = torch.zeros(n, self.num_tokens, dtype=torch.int64, device=device)
            unknown = torch.ones(n, self.num_tokens, dtype=torch.bool, device=device)
        else:
            flat = self._flatten_codes(codes).to(device)
            unknown = ~self._flatten_codes(known, "mask").to(device)
            if flat.shape[0] != n or unknown.shape[0] != n:
                raise ValueError(f"codes and known must hold n = {n} maps, "
                                 f"got {tuple(codes.shape)} and {tuple(known.shape)}")
            if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_codes):
                raise ValueError(f"codes must lie in [0, {self.num_codes}), "
                                 f"got values in [{int(flat.min())}, {int(flat.max())}]")
            flat = torch.where(unknown, 0, flat)
        if n > 0:
            initially_unknown = unknown.sum(dim=1, keepdim=True)
            for step in range(steps):
                log_probs = self._draw_log_probs(self._logits(flat, unknown, cond), temperature, top_k, top_p)
                if temperature == 0:
                    drawn = log_probs.argmax(dim=-1)
                else:
                    drawn = torch.multinomial(log_probs.exp().reshape(-1, self.num_codes), 1, generator=generator)
                    drawn = drawn.reshape(n, self.num_tokens)
                drawn = torch.where(unknown, drawn, flat)
                ratio = (step + 1) / steps
                if step + 1 == steps:
                    flat = drawn
                    unknown = torch.zeros_like(unknown)
                    break
                remaining = unknown.sum(dim=1, keepdim=True)
                still = torch.floor(initially_unknown * cosine_mask_schedule(ratio)).long()
                still = torch.minimum(still.clamp_min(1), (remaining - 1).clamp_min(0))
                confidence = log_probs.gather(-1, drawn[..., None])[..., 0]
                if choice_temperature > 0:
                    uniform = torch.rand(confidence.shape, device=device, generator=generator)
                    gumbel = -torch.log((-torch.log(uniform.clamp_min(1e-20))).clamp_min(1e-20))
                    confidence = confidence + choice_temperature * (1.0 - ratio) * gumbel
                # Known codes are never re-masked: they rank after every drawn one.
                confidence = torch.where(unknown, confidence, torch.inf)
                ranks = confidence.argsort(dim=1, stable=True).argsort(dim=1)
                unknown = ranks < still
                flat = torch.where(unknown, 0, drawn)
        out = flat if self.depth == 1 else flat.reshape(n, self.seq_len, self.depth)
        if shape is not None:
            out = out.reshape(n, *shape, *out.shape[2:])
        return out

    @staticmethod
    def _draw_log_probs(logits: Tensor, temperature: float, top_k, top_p) -> Tensor:
        logits = logits.float()
        if temperature > 0:
            logits = logits / temperature
        return filter_logits(logits, top_k, top_p).log_softmax(dim=-1)
