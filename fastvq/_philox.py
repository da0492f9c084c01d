"""The counter-based Gumbel noise every soft-assignment path draws: Philox-4x32 in PyTorch, bit for bit
the function Triton's ``tl.philox`` computes, so the PyTorch path, the Triton kernels and the reference
see the same noise for the same seed. It lives outside ``fastvq.backends`` because the reference uses
it too, and the oracle must not share code with what it judges."""

from __future__ import annotations

import torch

_PHILOX_MASK = 0xFFFFFFFF
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10


def philox_uint32x4(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor):
    """Philox-4x32 (Salmon et al. 2011, ``PHILOX_ROUNDS`` rounds) on int64 tensors holding uint32 values.

    The same function as Triton's ``tl.philox(seed, c0, c1, c2, c3)``: key ``(seed mod 2^32,
    seed >> 32)``, counter ``(c0, c1, c2, c3)``. A 32 x 32-bit product fits in 64 bits; int64
    multiplication wraps modulo 2^64, so its low 64 bits, and with them the high and low words the
    rounds need, are exact even when the int64 result reads negative.
    """
    key0, key1 = seed & _PHILOX_MASK, (seed >> 32) & _PHILOX_MASK
    for _ in range(PHILOX_ROUNDS):
        # In place where possible: on the PyTorch path this runs on every slab of logits.
        product_a = c0 * _PHILOX_ROUND_A
        product_b = c2 * _PHILOX_ROUND_B
        new_c0 = (product_b >> 32).bitwise_and_(_PHILOX_MASK).bitwise_xor_(c1).bitwise_xor_(key0)
        new_c2 = (product_a >> 32).bitwise_and_(_PHILOX_MASK).bitwise_xor_(c3).bitwise_xor_(key1)
        c0, c1, c2, c3 = new_c0, product_b.bitwise_and_(_PHILOX_MASK), new_c2, product_a.bitwise_and_(_PHILOX_MASK)
        key0 = (key0 + _PHILOX_KEY_A) & _PHILOX_MASK
        key1 = (key1 + _PHILOX_KEY_B) & _PHILOX_MASK
    return c0, c1, c2, c3


def uniform_from_uint32(bits: torch.Tensor) -> torch.Tensor:
    """The top 23 bits of a uint32 as the float32 ``(2 j + 1) / 2^24`` in ``(0, 1)``: exact in float32,
    never 0 or 1, so both logarithms of the Gumbel noise stay finite."""
    return ((bits >> 9) * 2 + 1).to(torch.float32) * (2.0**-24)


def gumbel_noise(seed: int, rows: torch.Tensor, code_start: int, code_stop: int) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log(u))`` float32 ``[len(rows), code_stop - code_start]`` for
    the given int64 row numbers and the codes ``[code_start, code_stop)``.

    The noise of (row ``n``, code ``k``) is a pure function of ``(seed, n, k)``: output ``k mod 4``
    of Philox-4x32 at counter ``(k >> 2, n mod 2^32, n >> 32, 0)``. The Triton kernel draws the
    same bits tile by tile, so every backend, chunking and tiling sees the same noise.
    """
    first_group, last_group = code_start >> 2, (code_stop - 1) >> 2
    groups = torch.arange(first_group, last_group + 1, dtype=torch.int64, device=rows.device)
    shape = (rows.shape[0], groups.shape[0])
    counters = (
        groups[None, :].expand(shape),
        (rows & _PHILOX_MASK)[:, None].expand(shape),
        (rows >> 32)[:, None].expand(shape),
        torch.zeros((), dtype=torch.int64, device=rows.device).expand(shape),
    )
    bits = torch.stack(philox_uint32x4(seed, *counters), dim=2).reshape(rows.shape[0], -1)
    offset = code_start - 4 * first_group
    uniform = uniform_from_uint32(bits[:, offset : offset + code_stop - code_start])
    return uniform.log_().neg_().log_().neg_()

