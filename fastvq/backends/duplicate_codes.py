"""The exact-duplicate codes of a codebook, found once per call, so that every search reports the
lowest index of a group of equal codes whatever its kernel's rounding chose (the op layer applies it)."""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from . import common


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
    rows_per_chunk = max(1, common.CHUNK_BYTES // max(1, 4 * codebook.shape[1] * codebook.element_size()))
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
