"""A decoder-only transformer prior over the raster sequence of a VQ model's codes.

``GPTPrior`` is the stage-2 model of VQGAN / ViT-VQGAN (a GPT over the codes in raster order) and,
with ``depth > 1``, of RQ-VAE (the RQ-Transformer of Lee et al. 2022): a spatial transformer
reads, at every position, the sum of the embeddings of the previous position's ``depth`` codes,
and a small depth transformer predicts the ``depth`` codes of the position one after another.
Sampling keeps a key/value cache in both, so each new code costs one token's work per layer.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_float, check_positive_int

__all__ = ["GPTPrior", "filter_logits"]


def check_prior_arguments(*, dim: int, heads: int, dropout: float, num_classes: Optional[int],
                          cond_num_codes: Optional[int], cond_len: Optional[int], **sizes: int) -> None:
    """The constructor checks the code priors (GPT, MaskGIT) share: every size in ``sizes`` (and
    ``dim``, ``heads``) a positive int, ``dim`` a multiple of ``heads``, ``dropout`` in ``[0, 1)``,
    one kind of conditioning at most, ``cond_num_codes`` and ``cond_len`` together.

    Raises:
        ValueError / TypeError: naming the argument, as ``check_positive_int`` and ``check_float`` do.
    """
    for name, value in (*sizes.items(), ("dim", dim), ("heads", heads)):
        check_positive_int(name, value)
    if dim % heads:
        raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
    check_float("dropout", dropout, minimum=0.0, below=1.0)
    if num_classes is not None and cond_num_codes is not None:
        raise ValueError("condition on a class (num_classes) or on codes (cond_num_codes), not both")
    if num_classes is not None:
        check_positive_int("num_classes", num_classes)
    if (cond_num_codes is None) != (cond_len is None):
        raise ValueError("cond_num_codes and cond_len go together")
    if cond_num_codes is not None:
        check_positive_int("cond_num_codes", cond_num_codes)
        check_positive_int("cond_len", cond_len)


def filter_logits(logits: Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> Tensor:
    """``logits [..., K]`` with everything outside the ``top_k`` largest and outside the smallest
    set whose probability reaches ``top_p`` (nucleus) set to ``-inf``; the most likely code always
    stays. Ties at the ``top_k`` threshold are kept."""
    if top_k is not None and top_k < logits.shape[-1]:
        threshold = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # A code goes when the codes more likely than it already reach top_p.
        remove_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, causal: bool = True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout
        self.causal = causal

    def forward(self, x: Tensor, cache: Optional[list] = None) -> Tensor:
        """Causal (or, built with ``causal=False``, bidirectional) attention over ``x [B, T, dim]``.
        With ``cache`` (a list, empty at first; causal only), the keys and values of earlier calls
        are prepended and this call's appended: ``x`` then holds the tokens that follow the cached ones."""
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        past = 0
        if cache is not None:
            if cache:
                past_k, past_v = cache
                past = past_k.shape[2]
                k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            cache[:] = [k, v]
        dropout = self.dropout if self.training else 0.0
        if past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and length > 1, dropout_p=dropout)
        elif length == 1:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:
            # New tokens see every cached one and the new ones up to themselves.
            allowed = torch.ones(length, past + length, dtype=torch.bool, device=x.device).tril(diagonal=past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, causal: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = _SelfAttention(dim, heads, dropout, causal)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, cache: Optional[list] = None) -> Tensor:
        x = x + self.dropout(self.attention(self.norm1(x), cache))
        return x + self.mlp(self.norm2(x))


class _Transformer(nn.Module):
    def __init__(self, dim: int, num_layers: int, heads: int, dropout: float, causal: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout, causal) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, caches: Optional[list] = None) -> Tensor:
        for index, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[index])
        return self.norm(x)

    def new_caches(self) -> list:
        return [[] for _ in self.blocks]


class GPTPrior(nn.Module):
    """A GPT over the codes of a VQ model, in raster order (RQ-Transformer when ``depth > 1``).

    Args:
        num_codes: ``K``, codes per position (per depth).
        seq_len: positions ``L`` (``H * W`` of the code map).
        depth: codes per position (``RQVAE``'s depth); 1 for one code per position.
        dim, num_layers, heads: width, blocks and attention heads of the spatial transformer.
        depth_layers: blocks of the depth transformer (``depth > 1`` only).
        dropout: dropout in attention and MLPs during training.
        num_classes: condition on a class label ``cond`` int64 ``[B]``.
        cond_num_codes, cond_len: condition on a sequence of ``cond_len`` codes in
            ``[0, cond_num_codes)`` (e.g. VQ-VAE-2's top codes when modelling the bottom ones),
            given as ``cond`` int64 ``[B, ...]`` with ``cond_len`` elements per row.

    The sequence is a prefix (the condition tokens, if any, and a learned start token) followed by
    the codes; the output at each position predicts the next code. ``forward(codes, cond=None)``
    takes codes ``[B, H, W]`` or ``[B, L]`` (``[B, H, W, depth]`` or ``[B, L, depth]`` when
    ``depth > 1``) and returns logits ``[B, L, K]`` (``[B, L, depth, K]``); ``loss`` is the mean
    cross-entropy in nats. ``sample`` draws codes with a key/value cache.

    Raises:
        ValueError: bad sizes, both kinds of conditioning, or codes / ``cond`` of the wrong shape.
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
        depth_layers: int = 2,
        dropout: float = 0.0,
        num_classes: Optional[int] = None,
        cond_num_codes: Optional[int] = None,
        cond_len: Optional[int] = None,
    ):
        super().__init__()
        check_prior_arguments(num_codes=num_codes, seq_len=seq_len, depth=depth, dim=dim, num_layers=num_layers,
                              heads=heads, dropout=dropout, num_classes=num_classes, cond_num_codes=cond_num_codes,
                              cond_len=cond_len, depth_layers=depth_layers)
        self.num_codes = num_codes
        self.seq_len = seq_len
        self.depth = depth
        self.num_classes = num_classes
        self.cond_num_codes = cond_num_codes
        self.cond_len = cond_len or 0
        self.prefix_len = self.cond_len + 1
        # One table of K codes per depth: RQ-VAE's depths may have separate codebooks.
        self.code_embedding = nn.Embedding(num_codes * depth, dim)
        self.start = nn.Parameter(torch.zeros(1, 1, dim))
        self.class_embedding = nn.Embedding(num_classes, dim) if num_classes else None
        self.cond_embedding = nn.Embedding(cond_num_codes, dim) if cond_num_codes else None
        self.position = nn.Parameter(torch.zeros(1, self.prefix_len + seq_len - 1, dim))
        self.transformer = _Transformer(dim, num_layers, heads, dropout)
        if depth > 1:
            self.depth_position = nn.Parameter(torch.zeros(1, depth, dim))
            self.depth_transformer = _Transformer(dim, depth_layers, heads, dropout)
        self.head = nn.Linear(dim, num_codes, bias=False)
        self.apply(self._init_weights)
        for parameter in (self.start, self.position) + ((self.depth_position,) if depth > 1 else ()):
            nn.init.normal_(parameter, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    # -- inputs

    def _flatten_codes(self, codes: object) -> Tensor:
        """Codes -> int64 ``[B, L, depth]``."""
        if not isinstance(codes, Tensor) or codes.dtype not in (torch.int64, torch.int32):
            found = f"{codes.dtype} tensor" if isinstance(codes, Tensor) else type(codes).__name__
            raise ValueError(f"codes must be an int64 tensor, got {found}")
        layout = "[B, H, W] or [B, L]" if self.depth == 1 else f"[B, H, W, {self.depth}] or [B, L, {self.depth}]"
        if self.depth == 1:
            flat = codes.reshape(codes.shape[0], -1, 1) if codes.dim() in (2, 3) else None
        else:
            ends_in_depth = codes.dim() in (3, 4) and codes.shape[-1] == self.depth
            flat = codes.reshape(codes.shape[0], -1, self.depth) if ends_in_depth else None
        if flat is None or flat.shape[1] != self.seq_len:
            raise ValueError(f"codes must be {layout} with {self.seq_len} positions, got shape {tuple(codes.shape)}")
        return flat.long()

    def _prefix(self, cond: Optional[Tensor], batch: int) -> Tensor:
        """The condition tokens and the start token, ``[B, prefix_len, dim]`` (without positions)."""
        start = self.start.expand(batch, 1, -1)
        if self.num_classes is None and self.cond_num_codes is None:
            if cond is not None:
                raise ValueError("GPTPrior was built without conditioning, but cond was given")
            return start
        if not isinstance(cond, Tensor) or cond.dtype not in (torch.int64, torch.int32) or cond.shape[0] != batch:
            shape = tuple(cond.shape) if isinstance(cond, Tensor) else cond
            what = (f"class labels [{batch}]" if self.num_classes
                    else f"[{batch}, ...] codes with {self.cond_len} per row")
            raise ValueError(f"cond must be int64 {what}, got {shape}")
        if self.num_classes is not None:
            if cond.dim() != 1:
                raise ValueError(f"cond must be int64 class labels [{batch}], got shape {tuple(cond.shape)}")
            return start + self.class_embedding(cond.long())[:, None]
        flat = cond.reshape(batch, -1)
        if flat.shape[1] != self.cond_len:
            raise ValueError(f"cond must hold {self.cond_len} codes per row, got shape {tuple(cond.shape)}")
        return torch.cat([self.cond_embedding(flat.long()), start], dim=1)

    def _embed_positions(self, codes: Tensor) -> Tensor:
        """Codes ``[B, T, depth]`` -> the sum of their depth embeddings ``[B, T, dim]``."""
        offsets = torch.arange(self.depth, device=codes.device) * self.num_codes
        return self.code_embedding(codes + offsets).sum(dim=2)

    def _depth_inputs(self, hidden: Tensor, codes: Tensor) -> Tensor:
        """Spatial outputs ``[N, dim]`` and the codes of their positions ``[N, depth]`` -> the depth
        transformer's inputs ``[N, depth, dim]``: the spatial output, then the running sums of the
        code embeddings (RQ-Transformer)."""
        offsets = torch.arange(self.depth, device=codes.device) * self.num_codes
        embedded = self.code_embedding(codes[:, :-1] + offsets[:-1]).cumsum(dim=1)
        return torch.cat([hidden[:, None], embedded], dim=1) + self.depth_position

    # -- training

    def forward(self, codes: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        flat = self._flatten_codes(codes)
        batch = flat.shape[0]
        tokens = torch.cat([self._prefix(cond, batch), self._embed_positions(flat[:, :-1])], dim=1)
        hidden = self.transformer(tokens + self.position)[:, self.prefix_len - 1 :]
        if self.depth == 1:
            return self.head(hidden)
        inputs = self._depth_inputs(hidden.reshape(-1, hidden.shape[-1]), flat.reshape(-1, self.depth))
        logits = self.head(self.depth_transformer(inputs))
        return logits.reshape(batch, self.seq_len, self.depth, self.num_codes)

    def loss(self, codes: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """Mean cross-entropy (nats per code) of ``codes`` under the model, float32."""
        logits = self(codes, cond)
        targets = self._flatten_codes(codes)
        return F.cross_entropy(logits.reshape(-1, self.num_codes).float(), targets.reshape(-1))

    # -- sampling

    def _draw(self, logits: Tensor, temperature: float, top_k, top_p, generator) -> Tensor:
        logits = logits.float()
        if temperature == 0:
            return logits.argmax(dim=-1)
        probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    @torch.no_grad()
    def sample(
        self,
        n: int,
        shape: Optional[Sequence[int]] = None,
        cond: Optional[Tensor] = None,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Draws ``n`` code sequences position by position with a key/value cache.

        Args:
            n: number of samples, ``>= 0``.
            shape: ``(H, W)`` with ``H * W == seq_len`` to get code maps ``[n, H, W]``
                (``[n, H, W, depth]``); ``None`` gives ``[n, seq_len]`` (``[n, seq_len, depth]``).
            cond: class labels ``[n]`` or condition codes ``[n, ...]``, as in ``forward``.
            temperature: logits are divided by it; 0 takes the most likely code.
            top_k: draw among the ``top_k`` most likely codes only.
            top_p: draw from the smallest set of codes whose probability reaches ``top_p`` (nucleus).
            generator: a ``torch.Generator`` on the model's device, for reproducible draws.

        Returns:
            int64 codes on the model's device.
        """
        check_positive_int("n", n, minimum=0)
        if shape is not None:
            shape = tuple(shape)
            if len(shape) != 2 or math.prod(shape) != self.seq_len:
                raise ValueError(f"shape must be (H, W) with H * W = {self.seq_len}, got {shape!r}")
        check_float("temperature", temperature, minimum=0.0)
        if top_k is not None and (
            not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= self.num_codes
        ):
            raise ValueError(f"top_k must be None or an int in [1, {self.num_codes}], got {top_k!r}")
        if top_p is not None and (check_float("top_p", top_p) <= 0 or top_p > 1):
            raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
        device = self.head.weight.device
        codes = torch.zeros(n, self.seq_len, self.depth, dtype=torch.int64, device=device)
        if n > 0:
            caches = self.transformer.new_caches()
            tokens = self._prefix(cond, n) + self.position[:, : self.prefix_len]
            for position in range(self.seq_len):
                hidden = self.transformer(tokens, caches)[:, -1]
                if self.depth == 1:
                    codes[:, position, 0] = self._draw(self.head(hidden), temperature, top_k, top_p, generator)
                else:
                    self._sample_depth(hidden, codes[:, position], temperature, top_k, top_p, generator)
                if position + 1 < self.seq_len:
                    index = self.prefix_len + position
                    tokens = (self._embed_positions(codes[:, position : position + 1])
                              + self.position[:, index : index + 1])
        if self.depth == 1:
            codes = codes[..., 0]
        if shape is not None:
            codes = codes.reshape(n, *shape, *codes.shape[2:])
        return codes

    def _sample_depth(self, hidden: Tensor, out: Tensor, temperature, top_k, top_p, generator) -> None:
        """Fills ``out [n, depth]`` with the codes of one position, given its spatial output ``hidden [n, dim]``."""
        caches = self.depth_transformer.new_caches()
        token = (hidden + self.depth_position[0, 0])[:, None]
        running = torch.zeros_like(hidden)
        for level in range(self.depth):
            logits = self.head(self.depth_transformer(token, caches)[:, -1])
            out[:, level] = self._draw(logits, temperature, top_k, top_p, generator)
            if level + 1 < self.depth:
                running = running + self.code_embedding(out[:, level] + level * self.num_codes)
                token = (running + self.depth_position[0, level + 1])[:, None]
