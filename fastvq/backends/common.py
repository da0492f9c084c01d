"""What more than one backend uses: the compute dtype, the search's prepared codebook, the memory
bound of the chunked loops, the exact-duplicate codes of a codebook, and the PixelCNN convolution
masks as tap counts.

Nothing here imports a backend, so every backend, ``fastvq._checks`` and ``fastvq._ops`` may import it.

Masks
-----

Every mask fastvq supports keeps a prefix of the kernel's taps in raster order (row by row, left to
right) and zeroes the rest, so a mask is fully described by how many taps it keeps:

- ``"A"`` (PixelCNN's first layer): the rows above the centre and the taps left of the centre;
  the centre itself is excluded, so an output never sees its own input position.
- ``"B"`` (every later layer): the same plus the centre tap.
- ``"V"`` (Gated PixelCNN's vertical stack, van den Oord et al. 2016): every row above the centre
  and the whole centre row. Its output at row ``i`` sees rows ``<= i``; the stack reaches the
  horizontal stack only through a one-row down shift, so there it contributes rows ``< i``.

The horizontal stack of Gated PixelCNN is ``"A"`` or ``"B"`` on a ``1 x k`` kernel. The kernels
loop over ``num_taps`` taps and never touch the rest, which is why the masks are prefixes.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional, Sequence

import torch

# The chunked loops (the PyTorch path, the op layer's loss sums) keep each temporary slab under this.
CHUNK_BYTES = 32 * 1024 * 1024
NORM_EPS = 1e-12  # F.normalize's eps: a zero vector has cosine 0 to every code
MASK_TYPES = ("A", "B", "V")


def triton_interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors through its numpy interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores accumulate in fp32 for every input dtype, and in fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class SearchCodebook:
    """The codebook prepared once per call for scoring (the PyTorch path and the Triton launcher).

    ``l2`` scores are ``|e - c|^2 - 2 (z - c).(e - c)`` with ``c`` the codebook mean: the shift
    leaves every distance unchanged but removes the cancellation that ``z^2 + e^2 - 2 z.e``
    suffers for data far from the origin. ``cosine`` scores are ``-z.e/|e|`` (the positive
    ``1/|z|`` does not change a row's argmin); ``dot`` scores are ``-z.e``.
    """

    def __init__(self, codebook: torch.Tensor, metric: str, dtype: torch.dtype):
        self.metric = metric
        work = codebook.to(compute_dtype(dtype))
        self.center: Optional[torch.Tensor] = None
        self.code_bias: Optional[torch.Tensor] = None
        if metric == "l2":
            # The centre is the mean of the finite codes only: a single NaN or Inf code must not
            # poison the shift of every other code, which would turn every score into NaN.
            finite = work.isfinite().all(dim=1, keepdim=True)
            self.center = torch.where(finite, work, 0).sum(dim=0) / finite.sum().clamp_min(1)
            work = work - self.center
            self.code_bias = (work * work).sum(dim=1)
        elif metric == "cosine":
            work = work / work.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
        self.codes = work

    def scores(self, z_rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        codes = self.codes[start:stop]
        if self.metric == "l2":
            scores = torch.addmm(self.code_bias[start:stop], z_rows, codes.T, alpha=-2.0)
        else:
            scores = z_rows @ codes.T
            scores.neg_()
        # nan -> +inf so a NaN distance never wins; +/-inf stay what they are.
        return scores.nan_to_num_(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))


class DuplicateCodes:
    """The groups of exactly equal codes of a codebook, found once per call, so that every search
    can report the lowest index of a group whatever its kernel's rounding chose.

    Two equal codes have equal true distances, but a matrix-multiply kernel rounds two identical
    columns differently depending on where they fall in its tiles, so the argmin over its scores
    may land on any member of a group (measured: 1 % of fp32 trials and 12-17 % of fp64 trials on
    the BLAS paths). The contract says ties go to the lowest index; rather than asking every
    kernel to re-rank near-ties, the op layer maps each chosen index to its group's lowest index.

    How the groups are found, in ``O(K D + K log K)`` against the search's ``O(N K D)``:

    1. ``-0.0`` is made ``+0.0`` (they compare equal and give equal distances), then each code's
       bytes are read as signed integer words ``w`` (32-bit, or 16-bit for half types and huge
       ``D``; ``W`` per code).
    2. Hashes ``w @ M``, ``M`` a fixed random integer matrix ``[W, 2..8]`` whose entries are small
       enough that every partial sum is an integer below ``2^53``: the fp64 product is then exact
       in any summation order, so equal codes get equal hashes wherever they sit (the float
       scores could not promise that: that is the bug). The columns hold about 56 bits together.
    3. A stable lexicographic sort by the hashes puts each group's members next to each other in
       index order; neighbours are then compared value by value, so a hash collision can never
       merge two different codes (NaN never equals NaN: a code holding one is never a
       duplicate). A different code with the same hashes sorted *between* the members of a group
       (odds below ``K^2 / 2^56``) would split it: the members after the intruder then keep the
       kernel's choice, which is still a code at the minimal distance.

    ``leaders[k]`` is the lowest index of code ``k``'s group. On CPU a codebook with no duplicate
    is told apart cheaply and :func:`find_duplicate_codes` returns ``None``; on other devices that
    test would need a host synchronisation, so the (all-device) remap always runs there.
    """

    def __init__(self, leaders: torch.Tensor):
        self.leaders = leaders

    def lowest(self, indices: torch.Tensor) -> torch.Tensor:
        """Each index replaced by the lowest index of its code's duplicate group (same shape)."""
        return self.leaders[indices]

    def lowest_members(self, indices: torch.Tensor) -> torch.Tensor:
        """A top-k search's ``indices [N, k]`` with the ``m`` codes a row lists from one duplicate
        group replaced by that group's ``m`` lowest indices, in the same slots and in index order
        (the codes are equal, so their distances are too). ``O(N k log k + K log K)``."""
        num_codes = self.leaders.shape[0]
        # Every code's group members in index order, each group starting at its leader.
        members = (self.leaders * num_codes + torch.arange(num_codes, device=self.leaders.device)).argsort()
        first = torch.empty_like(members).scatter_(0, members, torch.arange(num_codes, device=members.device))
        leaders = self.leaders[indices]
        order = (leaders * num_codes + indices).argsort(dim=1)
        sorted_leaders = leaders.gather(1, order)
        slots = torch.arange(indices.shape[1], device=indices.device).expand_as(indices)
        starts = torch.ones_like(sorted_leaders, dtype=torch.bool)
        starts[:, 1:] = sorted_leaders[:, 1:] != sorted_leaders[:, :-1]
        run_start = torch.where(starts, slots, 0).cummax(dim=1).values
        replaced = members[first[sorted_leaders] + slots - run_start]
        return torch.empty_like(indices).scatter_(1, order, replaced)


# Rows of fp64 words hashed at a time: small enough to stay in the L2 cache between their
# conversion and their product.
_HASH_CHUNK_BYTES = 1 << 20
# Wanted bits of hash per code in all (over several columns): pairs of different codes then
# collide with odds below 2^-56 each.
_HASH_BITS = 56


def _hash_words(rows: torch.Tensor, single: bool) -> tuple[torch.Tensor, int]:
    """``rows`` (contiguous) read as signed integer words: 32-bit ones where the product of
    :func:`_code_hashes` stays exact with multipliers of at least 8 bits, else (and for a
    ``single`` hash, which wants wide multipliers) 16-bit ones."""
    if not single and rows.element_size() >= 4:
        if 52 - 31 - math.ceil(math.log2(rows.shape[1] * rows.element_size() // 4 + 1)) >= 8:
            return rows.view(torch.int32), 31
    return rows.view(torch.int16), 15


@functools.lru_cache(maxsize=16)
def _hash_multipliers(words: int, word_bits: int, single: bool, device: torch.device) -> torch.Tensor:
    """``[words, columns]`` random integers small enough that ``words`` products of a word and a
    multiplier sum below ``2^52``: the fp64 product is exact whatever its summation order."""
    bits = 52 - word_bits - math.ceil(math.log2(words + 1))
    columns = 1 if single else min(8, max(2, math.ceil(_HASH_BITS / bits)))
    generator = torch.Generator().manual_seed(0x5EED)
    return torch.randint(0, 2**bits, (words, columns), generator=generator, dtype=torch.int64).double().to(device)


def _code_hashes(codebook: torch.Tensor, single: bool = False) -> torch.Tensor:
    """``[K, columns]`` exact integer hashes (as fp64) of the codes' values, ``-0.0`` as ``+0.0``:
    about 56 bits over 2 to 8 columns, or one column of 30-odd bits when ``single``."""
    num_codes, dim = codebook.shape
    rows_per_chunk = max(1, _HASH_CHUNK_BYTES // max(1, 8 * dim))
    parts = []
    for start in range(0, num_codes, rows_per_chunk):
        rows = torch.add(codebook[start : start + rows_per_chunk], 0.0).contiguous()  # -0.0 + 0.0 == +0.0
        words, word_bits = _hash_words(rows, single)
        multipliers = _hash_multipliers(words.shape[1], word_bits, single, codebook.device)
        if single:
            parts.append((words.double() @ multipliers[:, 0])[:, None])
        else:  # [columns, W] @ [W, rows] runs a better kernel than the skinny [rows, W] @ [W, columns]
            parts.append((multipliers.T @ words.double().T).T)
    return torch.cat(parts)


def _hash_order(hashes: torch.Tensor) -> torch.Tensor:
    """The codes sorted by their hashes, lexicographically; equal hashes stay in index order."""
    order = torch.arange(hashes.shape[0], device=hashes.device)
    for column in reversed(range(hashes.shape[1])):  # stable sorts, the last key first
        order = order[torch.argsort(hashes[order, column], stable=True)]
    return order


def _group_leaders(codebook: torch.Tensor) -> torch.Tensor:
    """``leaders [K]``: for each code, the lowest index of the codes exactly equal to it."""
    num_codes = codebook.shape[0]
    hashes = _code_hashes(codebook)
    order = _hash_order(hashes)
    sorted_hashes = hashes[order]
    same = (sorted_hashes[1:] == sorted_hashes[:-1]).all(dim=1)
    rows_per_chunk = max(1, CHUNK_BYTES // max(1, 4 * codebook.shape[1] * codebook.element_size()))
    for start in range(0, num_codes - 1, rows_per_chunk):
        stop = min(start + rows_per_chunk, num_codes - 1)
        same[start:stop] &= (codebook[order[start + 1 : stop + 1]] == codebook[order[start:stop]]).all(dim=1)
    positions = torch.arange(num_codes, device=codebook.device)
    # Each sorted position's group starts at the last position before it that is not "same as
    # the previous one"; stability made that start the group's lowest index.
    starts = torch.where(torch.cat([same.new_zeros(1), same]), 0, positions)
    starts = torch.cummax(starts, dim=0).values
    leaders = torch.empty_like(order)
    leaders[order] = order[starts]
    return leaders


# Entries of each code the CPU pre-filter hashes: half from its start, half from its end.
_PROBE_ENTRIES = 16


def _probe_candidates(codebook: torch.Tensor) -> torch.Tensor:
    """The indices of the codes that may have an exact duplicate: those whose hash over their
    first and last few entries (a cache line or two of each code) equals another code's. Every
    duplicate is among them (equal codes have equal entries, so equal hashes); a random codebook
    gives none, for ``O(K log K)`` work."""
    dim = codebook.shape[1]
    half = _PROBE_ENTRIES // 2
    probe = codebook if dim <= _PROBE_ENTRIES else torch.cat([codebook[:, :half], codebook[:, -half:]], dim=1)
    hashes = _code_hashes(probe, single=True)[:, 0]
    sorted_hashes, order = hashes.sort()
    same = sorted_hashes[1:] == sorted_hashes[:-1]
    tied = torch.zeros(codebook.shape[0], dtype=torch.bool)
    tied[1:] |= same
    tied[:-1] |= same
    return order[tied].sort().values


def find_duplicate_codes(codebook: torch.Tensor) -> Optional[DuplicateCodes]:
    """The exact-duplicate groups of ``codebook [K, D]`` (see :class:`DuplicateCodes`), or ``None``
    when there is nothing to remap: a single code, or (on CPU) no two codes equal.

    On CPU a pre-filter hashes a few entries of every code first and runs the full hash and
    comparison only on the codes it cannot tell apart, so a codebook without duplicates costs
    ``O(K)``, not ``O(K D)``; on other devices the full pass always runs, with no host sync.

    Apply it to an argmin search's indices with ``groups.lowest(indices)``; a top-k search must
    also order a group's members by index within each row. Gumbel-max sampling should not use
    it: a sampled index names a code, not a tie.
    """
    num_codes = codebook.shape[0]
    if num_codes < 2:
        return None
    codebook = codebook.detach()
    if codebook.device.type != "cpu":
        return DuplicateCodes(_group_leaders(codebook))
    candidates = _probe_candidates(codebook)
    if candidates.numel() < 2:
        return None
    candidate_leaders = candidates[_group_leaders(codebook[candidates])]
    if torch.equal(candidate_leaders, candidates):
        return None
    leaders = torch.arange(num_codes)
    leaders[candidates] = candidate_leaders
    return DuplicateCodes(leaders)


def check_mask_type(mask_type: object) -> str:
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
    return mask_type  # type: ignore[return-value]


def check_kernel_size(kernel_height: int, kernel_width: int, name: str = "weight") -> None:
    if kernel_height % 2 == 0 or kernel_width % 2 == 0:
        raise ValueError(
            f"{name} must have an odd kernel height and width (a PixelCNN mask is defined around the "
            f"centre tap), got kernel size ({kernel_height}, {kernel_width})"
        )


def num_taps(mask_type: str, kernel_height: int, kernel_width: int) -> int:
    """How many taps, counted in raster order from the top-left, the mask keeps."""
    centre_row, centre_col = kernel_height // 2, kernel_width // 2
    if mask_type == "V":
        return (centre_row + 1) * kernel_width
    return centre_row * kernel_width + centre_col + (1 if mask_type == "B" else 0)


def conv_mask(
    mask_type: str, kernel_height: int, kernel_width: int, *, device: Optional[torch.device] = None
) -> torch.Tensor:
    """The mask as a bool ``[kernel_height, kernel_width]`` tensor, ``True`` where a tap is kept."""
    check_mask_type(mask_type)
    check_kernel_size(kernel_height, kernel_width, "kernel_size")
    kept = torch.arange(kernel_height * kernel_width, device=device) < num_taps(mask_type, kernel_height, kernel_width)
    return kept.reshape(kernel_height, kernel_width)


def output_size(
    height: int, width: int, kernel_height: int, kernel_width: int, padding: Sequence[int]
) -> tuple[int, int]:
    return height + 2 * padding[0] - kernel_height + 1, width + 2 * padding[1] - kernel_width + 1


def promoted_dtype(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.dtype:
    dtype = torch.promote_types(x.dtype, weight.dtype)
    return dtype if bias is None else torch.promote_types(dtype, bias.dtype)


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """Outputs follow a channels-last input (as ``conv2d`` does); anything else gets NCHW."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# --------------------------------------------------------------------------- soft assignments

SOFT_METRICS = ("l2", "cosine", "dot", "euclidean")
# vector-quantize-pytorch's cdist clamps the squared distance here before its square root; the
# "euclidean" logits do the same, so a row sitting on a code has a finite gradient (zero).
EUCLIDEAN_EPS = 1e-8

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


class SoftCodebook:
    """Keys, values and per-code terms prepared once per call for the soft-assignment ops, and the
    chain rule from the prepared tensors back to the caller's (PyTorch path and Triton launcher).

    Every metric's logit is a function of the dot product ``a = zq . kq`` of a prepared row and a
    prepared key, a per-code term ``c`` and a per-row term ``r``, divided by the temperature:

    - ``dot``: ``(a - c) / T`` with the keys as given;
    - ``cosine``: ``(a - c) / T`` with rows and keys divided by their norms (floored at ``NORM_EPS``);
    - ``l2``: ``-(r + c - 2 a) / T = -|z - e|^2 / T`` with rows and keys centred on the mean of the
      finite codes (which leaves every distance unchanged and removes the cancellation far from
      the origin), ``r = |zq|^2``, ``c = |kq|^2``;
    - ``euclidean``: ``-sqrt(max(r + c - 2 a, EUCLIDEAN_EPS)) / T = -|z - e| / T``, the plain
      distance vector-quantize-pytorch's ``-cdist`` logits use.

    A code whose key has a NaN or infinite entry is excluded: its key is zeroed and ``c = +inf``, so
    its logit is ``-inf`` (probability 0, never the hard choice), and its value row is zeroed so it
    adds nothing to the soft codes. ``c`` is 0 for every other dot/cosine code.
    """

    def __init__(self, codebook: torch.Tensor, values: Optional[torch.Tensor], metric: str, dtype: torch.dtype):
        self.metric = metric
        self.work_dtype = compute_dtype(dtype)
        keys = codebook.to(self.work_dtype)
        finite = keys.isfinite().all(dim=1)
        self.key_norms: Optional[torch.Tensor] = None
        self.center: Optional[torch.Tensor] = None
        if metric in ("l2", "euclidean"):
            self.center = torch.where(finite[:, None], keys, 0).sum(dim=0) / finite.sum().clamp_min(1)
            keys = keys - self.center
        elif metric == "cosine":
            self.key_norms = keys.norm(dim=1, keepdim=True)
            keys = keys / self.key_norms.clamp_min(NORM_EPS)
        keys = torch.where(finite[:, None], keys, 0)
        if metric in ("l2", "euclidean"):
            code_term = (keys * keys).sum(dim=1)
        else:
            code_term = torch.zeros(keys.shape[0], dtype=self.work_dtype, device=keys.device)
        self.keys = keys
        self.code_term = torch.where(finite, code_term, float("inf"))
        source = codebook if values is None else values
        self.values = torch.where(finite[:, None], source.to(self.work_dtype), 0)

    def rows(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(zq, r)``: the prepared rows in the work dtype and their per-row term (``|zq|^2`` for
        l2 and euclidean, zeros otherwise)."""
        zq = z.to(self.work_dtype)
        if self.center is not None:
            zq = zq - self.center
            return zq, (zq * zq).sum(dim=1)
        if self.metric == "cosine":
            zq = zq / zq.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
        return zq, torch.zeros(zq.shape[0], dtype=self.work_dtype, device=zq.device)

    def prepared_row_grad(
        self, zq: torch.Tensor, weighted_keys: torch.Tensor, row_sums: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """The gradient to the prepared rows ``zq`` from the backward's row sums.

        With ``w[n, k]`` the backward's per-logit weight (``dL/dlogit / T`` for dot, cosine and l2;
        ``dL/dlogit / (2 T |z - e|)`` for euclidean, 0 where the distance was clamped), the row pass
        returns ``weighted_keys = w @ kq`` and ``row_sums = w.sum(1)``. For dot and cosine the
        gradient is ``w @ kq``; for l2 and euclidean, whose logits depend on ``|zq - kq|^2``, it is
        ``2 (w @ kq - zq * rowsum)`` (``row_sums`` is ``None`` for dot and cosine, which need none).
        """
        if row_sums is None:
            return weighted_keys
        return 2.0 * (weighted_keys - zq * row_sums[:, None])

    def prepared_key_grad(self, weighted_rows: torch.Tensor, code_sums: Optional[torch.Tensor]) -> torch.Tensor:
        """The gradient to the prepared keys from the code pass's ``weighted_rows = w^T @ zq`` and
        ``code_sums = w.sum(0)``: ``w^T @ zq``, or ``2 (w^T @ zq - kq * colsum)`` for l2 and euclidean."""
        if code_sums is None:
            return weighted_rows
        return 2.0 * (weighted_rows - self.keys * code_sums[:, None])

    def row_grad(self, z: torch.Tensor, grad_zq: torch.Tensor) -> torch.Tensor:
        """Chains the gradient of the prepared rows back to ``z`` (the centre is held constant:
        the logits do not depend on it)."""
        if self.metric != "cosine":
            return grad_zq
        return _normalize_backward(z.to(self.work_dtype), grad_zq)

    def key_grad(self, codebook: torch.Tensor, grad_keys: torch.Tensor) -> torch.Tensor:
        """Chains the gradient of the prepared keys back to the codebook."""
        if self.metric != "cosine":
            return grad_keys
        return _normalize_backward(codebook.to(self.work_dtype), grad_keys)


def split_value_grad(
    values: Optional[torch.Tensor], grad_codebook: torch.Tensor, grad_values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_codebook, grad_values)`` as the soft-quantize backward returns them: without separate
    ``values`` the codebook is also the values, so it takes their gradient and ``grad_values`` is empty."""
    if values is None:
        return grad_codebook + grad_values, grad_values[:0]
    return grad_codebook, grad_values


def _normalize_backward(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of ``x / max(|x|, NORM_EPS)`` row-wise: ``(g - u (u . g)) / |x|`` with ``u`` the
    normalised row, and ``g / NORM_EPS`` for a row shorter than the floor."""
    norms = x.norm(dim=1, keepdim=True)
    floored = norms.clamp_min(NORM_EPS)
    unit = x / floored
    projected = grad - unit * (unit * grad).sum(dim=1, keepdim=True)
    return torch.where(norms > NORM_EPS, projected, grad) / floored
def code_entropy_split(num_bits: int) -> tuple[int, int]:
    """How the code entropy splits ``d`` bits: ``(h, d - h)``, the high half the larger when ``d`` is odd."""
    high = (num_bits + 1) // 2
    return high, num_bits - high


def order_candidates(indices: torch.Tensor, distances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` candidates ``[N, k]`` in the top-k search's order: ascending true distance,
    equal distances by ascending index, a NaN distance last. O(N k log k), after a search that
    chose the set on its (cancellation-free but rounded) scores."""
    by_index = indices.argsort(dim=1)
    indices, distances = indices.gather(1, by_index), distances.gather(1, by_index)
    by_distance = distances.nan_to_num(nan=float("inf")).argsort(dim=1, stable=True)
    return indices.gather(1, by_distance), distances.gather(1, by_distance)
