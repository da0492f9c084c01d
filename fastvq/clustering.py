"""k-means on fastvq's fused ops: each Lloyd iteration is one nearest-code search and one segment sum.

The assignment step is ``fastvq.functional.nearest_code`` (never an ``N x K`` matrix), the update
step is ``fastvq.functional.segment_reduce`` on the same rows (per-cluster counts and sums in one
pass, no copy of ``x``), and k-means++ draws its seeds from the search's distances. Whatever
backend ``FASTVQ_BACKEND`` selects runs those ops, so this module has no kernels of its own.

Under ``torch.distributed`` every rank holds a shard of the rows; the counts, sums and inertia are
summed over ranks, and every random draw is made over the global row numbering from one
generator that all ranks seed alike, so the ranks end with what one process computes on the
concatenated shards (to the rounding of the summation order).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Iterator, NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_float
from ._distributed import all_gather_rows, all_reduce_sum_, broadcast_from_first, is_distributed
from .ops.search import nearest_code
from .ops.segment_reduce import segment_reduce

__all__ = ["kmeans", "KMeansResult"]

# Centroids of the cosine metric are unit vectors: vector-quantize-pytorch's l2norm floor, so the
# layers' k-means initialisation gives the codes it gives there.
CENTROID_NORM_EPS = 1e-6
# The search's floor for a row's norm under the cosine metric (fastvq.backends.common.NORM_EPS).
ROW_NORM_EPS = 1e-12
# Rows per block of the k-means++ trial distances: a block and its products stay in cache.
TRIAL_BLOCK_BYTES = 4 * 1024 * 1024
# Rows copied to the compute device at a time when x lives elsewhere (a numpy memmap, host memory).
STREAM_BLOCK_BYTES = 64 * 1024 * 1024


class KMeansResult(NamedTuple):
    """What :func:`kmeans` returns.

    - ``centroids``: float32 ``[K, D]`` on the compute device.
    - ``assignments``: int64 ``[N]`` on the compute device, the cluster of each row of this
      process's ``x``.
    - ``inertia``: float64 ``[iterations run]`` on the CPU, the objective of every iteration.
    """

    centroids: Tensor
    assignments: Tensor
    inertia: Tensor


def kmeans(
    x: Union[Tensor, np.ndarray],
    num_clusters: int,
    *,
    iters: int = 25,
    init: Union[str, Tensor] = "k-means++",
    metric: str = "l2",
    tol: Optional[float] = 1e-4,
    batch_size: Optional[int] = None,
    seed: Optional[int] = None,
    progress: bool = False,
    empty_clusters: str = "farthest",
    sync: Optional[bool] = None,
    device: Union[str, torch.device, None] = None,
) -> KMeansResult:
    """Clusters the rows of ``x`` into ``num_clusters`` clusters by k-means (Lloyd's algorithm).

    Every iteration assigns each row to its nearest centroid with the fused nearest-code search
    and moves each centroid to the mean of its rows with the segment sum; no ``N x K`` matrix is
    built, and the memory added on top of ``x`` is ``O(N + K D)``: 12 bytes a row for the
    assignments and their distances (k-means++ seeding briefly needs 16 more: each row's distance
    to the nearest seed, a per-row norm, and their running float64 sum).

    Args:
        x: ``[N, D]`` float32, float16, bfloat16 or float64: a tensor (any device, any strides) or a
            numpy array, including a memory-mapped one (``np.load(path, mmap_mode="r")``), which is
            read in place and never loaded whole. Under ``torch.distributed`` this process's shard.
        num_clusters: ``K >= 1``; at most the number of rows for the ``"random"`` and
            ``"k-means++"`` inits.
        iters: the most iterations (each one assignment and one update), ``>= 1``.
        init: ``"k-means++"`` (default): D² sampling with greedy local trials, as scikit-learn's
            ``_kmeans_plusplus``: the first seed is a uniformly drawn row; each further seed is
            the best of ``2 + int(log K)`` rows drawn with probability proportional to their
            distance to the nearest seed so far (the search's distance: squared L2, or ``1 - cos``),
            the best being the one that lowers the sum of those distances most.
            ``"random"``: ``K`` distinct rows drawn uniformly. Or a ``[K, D]`` float tensor of
            initial centroids, used as given (no random draw is made then).
        metric: ``"l2"`` (squared Euclidean, the inertia is the sum of squared distances) or
            ``"cosine"`` (spherical k-means: the distance is ``1 - cos``, and a centroid is its
            rows' normalised sum; seeds drawn from the rows are normalised too).
        tol: stop after an iteration that lowers the inertia by no more than ``tol`` times itself;
            ``None`` runs all ``iters`` iterations.
        batch_size: run mini-batch k-means instead (Sculley 2010, the update of scikit-learn's
            ``MiniBatchKMeans``): an iteration is ``ceil(N / batch_size)`` steps, each drawing
            ``batch_size`` rows uniformly with replacement, assigning them, and moving each centroid
            to the running mean of every row ever assigned to it. The init then runs on
            ``min(N, max(3 batch_size, 3 K))`` rows drawn the same way (scikit-learn's
            ``init_size``). For data too large for a pass per update.
        seed: seeds the random draws (init, mini-batches); the same seed gives the same result on a
            given backend and device. ``None`` draws the seed from PyTorch's global generator (rank
            0's under ``torch.distributed``), so ``torch.manual_seed`` makes runs repeatable.
        progress: show a progress bar with the inertia (on rank 0 only).
        empty_clusters: what a cluster that lost all its rows gets: ``"farthest"`` (default) moves
            to the rows farthest from their centroids, one each, each taken out of its cluster
            (never leaving that one empty: rows at distance 0 are never moved), as scikit-learn
            does; ``"keep"`` keeps its centroid (vector-quantize-pytorch's k-means). Mini-batch
            steps move only the centroids that got rows.
        sync: sum the statistics over the ranks of the default process group; ``None`` syncs when
            one with several ranks is initialised. Every rank must then call ``kmeans`` with the
            same arguments (``init`` tensors alike on every rank).
        device: where the search runs; default ``x``'s device (the CPU for numpy arrays). Rows of
            ``x`` held elsewhere are copied over in blocks of 64 MiB as each pass reads them.

    Returns:
        :class:`KMeansResult` ``(centroids, assignments, inertia)``:

        - ``centroids`` float32 ``[K, D]``: each the mean (cosine: the normalised sum) of the rows
          the last iteration assigned to it; a cluster left empty keeps its previous centroid.
        - ``assignments`` int64 ``[N]``: each row's cluster in the last iteration, so that
          ``centroids[k]`` is the mean of the rows with ``assignments == k`` (after a re-seeding,
          the moved rows carry their new cluster). A row's nearest *returned* centroid,
          ``fastvq.nearest_code(x, centroids)``, differs only where the last update moved a
          boundary across it. With ``batch_size``, no iteration sees every row, so the assignments
          are the nearest returned centroids, from one final pass over ``x``.
        - ``inertia`` float64 ``[iterations run]``: iteration ``i``'s sum over the rows of their
          distance to the centroid they were assigned to, before that iteration's update (FAISS's
          ``Kmeans.obj``). With ``batch_size``: the sum over the iteration's batches, each taken
          before its step's update, scaled to ``N`` rows (an estimate).

    The search and the segment sum run on the backend ``FASTVQ_BACKEND`` selects; the segment sum
    always takes its deterministic path. Scores and sums accumulate in fp32; float16/bfloat16 data
    is searched against centroids rounded to its dtype.

    Raises:
        TypeError: ``x`` neither a tensor nor a numpy array, or not of a float dtype; a non-int
            ``num_clusters``, ``iters``, ``batch_size`` or ``seed``; an ``init`` of a wrong type.
        ValueError: ``x`` not 2-D or with ``D == 0``, ``num_clusters < 1`` or more than the rows
            for a drawn init (all ranks' rows under ``torch.distributed``), no rows with a
            ``batch_size``, an
            ``init`` tensor not ``[K, D]`` or not finite, ``iters < 1``, ``tol < 0``, an unknown
            ``metric``, ``init`` or ``empty_clusters``; and, after the first pass, ``x`` holding
            NaN or infinite values (the inertia is not finite).
    """
    x, device = _as_tensor(x, device)
    check_kmeans_args(x, num_clusters, iters, init, metric, tol, batch_size, seed, empty_clusters)
    synced = (is_distributed() if sync is None else bool(sync)) and is_distributed()
    shards = _Shards(x, device, synced)
    if isinstance(init, str) and shards.total < num_clusters:
        where = " on all ranks together" if synced else f" (shape {tuple(x.shape)})"
        raise ValueError(f"init={init!r} draws {num_clusters} distinct rows, but x has {shards.total} rows{where}")
    if batch_size is not None and shards.total == 0:
        raise ValueError(f"batch_size draws rows, but x has none (shape {tuple(x.shape)})")
    generator = None
    if isinstance(init, str) or batch_size is not None:
        generator = torch.Generator().manual_seed(_shared_seed(seed, synced))
    if isinstance(init, Tensor):
        centroids = init.detach().to(device=device, dtype=torch.float32, copy=True)
    elif batch_size is not None:
        init_rows = min(shards.total, max(3 * batch_size, 3 * num_clusters))
        sample = shards.global_rows(torch.randint(shards.total, (init_rows,), generator=generator))
        centroids = _seed(_Shards(sample, device, False), num_clusters, init, metric, generator)
    else:
        centroids = _seed(shards, num_clusters, init, metric, generator)
    bar = _progress_bar(iters, progress and (not synced or torch.distributed.get_rank() == 0))
    try:
        if batch_size is None:
            return _lloyd(shards, centroids, iters, metric, tol, empty_clusters, bar)
        return _mini_batch(shards, centroids, iters, metric, tol, batch_size, generator, bar)
    finally:
        if bar is not None:
            bar.close()


# --------------------------------------------------------------------------- k-means

KMEANS_METRICS = ("l2", "cosine")
KMEANS_INITS = ("k-means++", "random")
KMEANS_EMPTY_CLUSTERS = ("farthest", "keep")


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_kmeans_args(
    x: torch.Tensor,
    num_clusters: object,
    iters: object,
    init: object,
    metric: object,
    tol: object,
    batch_size: object,
    seed: object,
    empty_clusters: object,
) -> None:
    """Checks the arguments of ``fastvq.kmeans`` (``x`` already a tensor view of the data). The
    finiteness of ``init`` (a host synchronisation) is not checked under ``torch.compile``."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [N, D], got shape {tuple(x.shape)}")
    check_float("x", x)
    if x.shape[1] < 1:
        raise ValueError(f"x must have D >= 1, got shape {tuple(x.shape)}")
    _check_int("num_clusters", num_clusters, 1)
    _check_int("iters", iters, 1)
    if batch_size is not None:
        _check_int("batch_size", batch_size, 1)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if metric not in KMEANS_METRICS:
        raise ValueError(f"metric must be one of {KMEANS_METRICS}, got {metric!r}")
    if empty_clusters not in KMEANS_EMPTY_CLUSTERS:
        raise ValueError(f"empty_clusters must be one of {KMEANS_EMPTY_CLUSTERS}, got {empty_clusters!r}")
    if tol is not None and (
        not isinstance(tol, (int, float)) or isinstance(tol, bool) or not 0.0 <= float(tol) < float("inf")
    ):
        raise ValueError(f"tol must be a finite float >= 0 or None, got {tol!r}")
    if isinstance(init, str):
        if init not in KMEANS_INITS:
            raise ValueError(f"init must be one of {KMEANS_INITS} or a [K, D] tensor, got {init!r}")
        return
    if not isinstance(init, torch.Tensor):
        raise TypeError(f"init must be one of {KMEANS_INITS} or a [K, D] tensor, got {type(init).__name__}")
    check_float("init", init)
    if tuple(init.shape) != (num_clusters, x.shape[1]):
        raise ValueError(
            f"init must have shape ({num_clusters}, {x.shape[1]}) for num_clusters={num_clusters} and x of shape "
            f"{tuple(x.shape)}, got {tuple(init.shape)}"
        )
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(init).all()):
        raise ValueError(f"init must hold finite values, got NaN or Inf in the tensor of shape {tuple(init.shape)}")


# --------------------------------------------------------------------------- the data


def _as_tensor(x: object, device: Union[str, torch.device, None]) -> tuple[Tensor, torch.device]:
    """``x`` as a tensor sharing its memory (numpy arrays and memmaps are wrapped, not copied)."""
    if isinstance(x, np.ndarray):
        if x.dtype not in (np.float16, np.float32, np.float64):
            raise TypeError(f"x must hold float16, float32 or float64 values, got a numpy array of dtype {x.dtype}")
        with warnings.catch_warnings():
            # A read-only memmap: kmeans only ever reads x.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            x = torch.from_numpy(x)
    elif not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor or a numpy array, got {type(x).__name__}")
    device = torch.device(device) if device is not None else x.device
    if x.is_meta or device.type == "meta":
        raise ValueError(f"x must hold data on a real device, got a tensor of shape {tuple(x.shape)} on {x.device}"
                         f"{'' if device == x.device else f' for device {device}'} (meta tensors have no values)")
    # k-means is not differentiable: data that requires grad (a Parameter, encoder features) is read as values.
    return x.detach(), device


class _Shards:
    """The rows this process holds, where they sit among all ranks' rows, and the collectives."""

    def __init__(self, x: Tensor, device: torch.device, synced: bool):
        self.x = x
        self.device = device
        self.synced = synced
        self.num_rows, self.dim = x.shape

    @functools.cached_property
    def sizes(self) -> Tensor:
        """Every rank's number of rows (CPU int64 ``[world]``); asked for only by the draws and the
        re-seeding, so a run with neither (the layers' k-means) never synchronises with the host."""
        if not self.synced:
            return torch.tensor([self.num_rows])
        sizes = torch.zeros(torch.distributed.get_world_size(), dtype=torch.int64, device=self.device)
        sizes[torch.distributed.get_rank()] = self.num_rows
        return all_reduce_sum_(sizes).cpu()

    @functools.cached_property
    def offset(self) -> int:
        """The global row number of this shard's first row."""
        return int(self.sizes[: torch.distributed.get_rank()].sum()) if self.synced else 0

    @functools.cached_property
    def total(self) -> int:
        return int(self.sizes.sum())

    def blocks(self, block_bytes: Optional[int] = None) -> Iterator[tuple[int, Tensor]]:
        """``(start, rows on the compute device)``: the whole shard in one piece when it is already
        there (the fused ops bound their own memory), else blocks of about ``block_bytes``."""
        if block_bytes is None:
            if self.x.device == self.device:
                yield 0, self.x
                return
            block_bytes = STREAM_BLOCK_BYTES
        step = max(1, block_bytes // max(1, self.dim * self.x.element_size()))
        for start in range(0, self.num_rows, step):
            yield start, self.x[start : start + step].to(self.device)

    def rows(self, local: Tensor) -> Tensor:
        """The rows at ``local`` indices of this shard, on the compute device, in x's dtype."""
        return self.x[local.to(self.x.device)].to(self.device)

    def global_rows(self, indices: Tensor) -> Tensor:
        """float32 rows at global row ``indices`` (CPU int64), the same on every rank: the rank
        holding a row contributes it, the others zeros, and a sum brings them together."""
        if not self.synced:
            return self.rows(indices).float()
        local = indices - self.offset
        mine = (local >= 0) & (local < self.num_rows)
        out = torch.zeros(indices.shape[0], self.dim, dtype=torch.float32, device=self.device)
        if bool(mine.any()):
            out[mine.to(self.device)] = self.rows(local[mine]).float()
        return self.sum_(out)

    def sum_(self, tensor: Tensor) -> Tensor:
        return all_reduce_sum_(tensor) if self.synced else tensor


def _shared_seed(seed: Optional[int], synced: bool) -> int:
    if seed is not None:
        return seed
    drawn = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    return int(broadcast_from_first(drawn)) if synced else int(drawn)


def _search_codebook(centroids: Tensor, dtype: torch.dtype) -> Tensor:
    """16-bit data is searched in its own dtype (tensor cores on GPU), everything else in fp32 or fp64."""
    return centroids.to(dtype) if dtype in (torch.float16, torch.bfloat16) else centroids


def _search(rows: Tensor, codebook: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    return nearest_code(rows, codebook, metric=metric)


def _normalized(rows: Tensor) -> Tensor:
    return F.normalize(rows, dim=1, eps=CENTROID_NORM_EPS)


def _check_finite(inertia: float, x: Tensor) -> None:
    """Raises when the inertia is not finite, blaming NaN or infinite values only where ``x`` holds some (read
    on this error path only)."""
    if math.isfinite(inertia):
        return
    if bool(torch.isfinite(x).all()):
        raise ValueError(
            f"the k-means inertia is {inertia} although x is finite: its squared distances overflow float32 "
            f"(largest |x| = {float(x.abs().max()):g}; the search needs norms below about 1.8e19): rescale x"
        )
    raise ValueError(
        f"the k-means inertia is {inertia}: x holds NaN or infinite values (the search gives such rows a "
        "distance that is not finite)"
    )


# --------------------------------------------------------------------------- seeding


def _seed(shards: _Shards, num_clusters: int, init: str, metric: str, generator: torch.Generator) -> Tensor:
    if init == "random":
        seeds = shards.global_rows(torch.randperm(shards.total, generator=generator)[:num_clusters])
    else:
        seeds = _kmeans_plusplus(shards, num_clusters, metric, generator)
    return _normalized(seeds) if metric == "cosine" else seeds


def _kmeans_plusplus(shards: _Shards, num_clusters: int, metric: str, generator: torch.Generator) -> Tensor:
    """scikit-learn's ``_kmeans_plusplus`` (greedy k-means++) on the fused search's distances."""
    num_trials = 2 + int(math.log(num_clusters))
    seeds = torch.empty(num_clusters, shards.dim, dtype=torch.float32, device=shards.device)
    seeds[0] = shards.global_rows(torch.randint(shards.total, (1,), generator=generator))[0]
    closest = _distances_to(shards, seeds[:1], metric)
    trials = _TrialDistances(shards, metric)
    for center in range(1, num_clusters):
        potential = shards.sum_(closest.sum(dtype=torch.float64))
        targets = torch.rand(num_trials, generator=generator, dtype=torch.float64) * potential.cpu()
        candidates = shards.global_rows(_weighted_draw(shards, closest, targets))
        best = int(torch.argmin(trials.potentials(closest, candidates)))
        seeds[center] = candidates[best]
        torch.minimum(closest, _distances_to(shards, candidates[best : best + 1], metric), out=closest)
    return seeds


def _distances_to(shards: _Shards, seed: Tensor, metric: str) -> Tensor:
    """float32 ``[N]``: each row's distance to ``seed [1, D]``, from the fused search."""
    codebook = _search_codebook(seed, shards.x.dtype)
    if shards.x.device == shards.device:
        return _search(shards.x, codebook, metric)[1]
    return torch.cat([_search(block, codebook, metric)[1] for _, block in shards.blocks()])


def _weighted_draw(shards: _Shards, weights: Tensor, targets: Tensor) -> Tensor:
    """Global row numbers (CPU int64) drawn with probability ``weights``: for each target, the first
    row whose running sum of weights, in row order across the ranks, reaches it (``np.searchsorted``)."""
    device = shards.device
    cumulative = torch.cumsum(weights, 0, dtype=torch.float64)
    targets = targets.to(device)
    if not shards.synced:
        return torch.searchsorted(cumulative, targets).clamp_max_(shards.total - 1).cpu()
    world, rank = shards.sizes.shape[0], torch.distributed.get_rank()
    totals = torch.zeros(world, dtype=torch.float64, device=device)
    if shards.num_rows:
        totals[rank] = cumulative[-1]
    ends = torch.cumsum(shards.sum_(totals), 0)
    # A rank without rows owns no target; past the last end (by rounding), the last rank with rows does.
    holders = torch.nonzero(shards.sizes > 0).flatten().to(device)
    owner = holders[torch.searchsorted(ends[holders], targets).clamp_max_(holders.shape[0] - 1)]
    mine = owner == rank
    picked = torch.zeros(targets.shape[0], dtype=torch.int64, device=device)
    if shards.num_rows:
        start = ends[rank] - totals[rank]
        local = torch.searchsorted(cumulative + start, targets).clamp_max_(shards.num_rows - 1)
        picked = torch.where(mine, local + shards.offset, picked)
    return shards.sum_(picked).cpu()


class _TrialDistances:
    """The potential ``sum_i min(closest_i, d(x_i, c))`` of candidate seeds ``c``, block by block.

    A candidate's distances come from one small matrix product per block of rows: for ``l2``
    ``|x - s|^2 + |c - s|^2 - 2 (x - s).(c - s)`` around the data mean ``s`` (which keeps data far
    from the origin from cancelling), for ``cosine`` ``1 - x.c / |x|`` (``c`` is normalised). Only
    the trials' comparison uses these; the distances the seeds are drawn from are the search's.
    """

    def __init__(self, shards: _Shards, metric: str):
        self.shards = shards
        self.metric = metric
        if metric == "l2":
            total = torch.zeros(shards.dim, dtype=torch.float64, device=shards.device)
            for _, block in shards.blocks(TRIAL_BLOCK_BYTES):
                total += block.sum(dim=0, dtype=torch.float64)
            self.shift = (shards.sum_(total) / shards.total).float()
            terms = [(block.float() - self.shift).square_().sum(dim=1) for _, block in shards.blocks(TRIAL_BLOCK_BYTES)]
        else:
            terms = [block.float().norm(dim=1).clamp_min_(ROW_NORM_EPS).reciprocal_()
                     for _, block in shards.blocks(TRIAL_BLOCK_BYTES)]
        # |x - s|^2 (l2) or 1 / |x| (cosine) per row
        self.row_terms = torch.cat(terms) if terms else torch.zeros(0, device=shards.device)

    def potentials(self, closest: Tensor, candidates: Tensor) -> Tensor:
        """float64 ``[T]``, summed over ranks."""
        if self.metric == "l2":
            codes = candidates - self.shift
            code_terms = codes.square().sum(dim=1)
        else:
            codes = F.normalize(candidates, dim=1, eps=ROW_NORM_EPS)
        potentials = torch.zeros(candidates.shape[0], dtype=torch.float64, device=self.shards.device)
        for start, block in self.shards.blocks(TRIAL_BLOCK_BYTES):
            stop = start + block.shape[0]
            if self.metric == "l2":
                distances = torch.addmm(
                    self.row_terms[start:stop, None] + code_terms, block.float() - self.shift, codes.T, alpha=-2.0
                ).clamp_min_(0.0)
            else:
                distances = 1.0 - (block.float() @ codes.T) * self.row_terms[start:stop, None]
            potentials += torch.minimum(distances, closest[start:stop, None]).sum(dim=0, dtype=torch.float64)
        return self.shards.sum_(potentials).cpu()


# --------------------------------------------------------------------------- Lloyd


def _progress_bar(iters: int, show: bool):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=iters, desc="k-means", unit="iter")


def _report(bar, iteration_inertia: float) -> None:
    if bar is not None:
        bar.update(1)
        bar.set_postfix(inertia=f"{iteration_inertia:.6g}")


def _converged(inertia: list[float], tol: Optional[float]) -> bool:
    return tol is not None and len(inertia) > 1 and inertia[-2] - inertia[-1] <= tol * inertia[-1]


def _lloyd(
    shards: _Shards, centroids: Tensor, iters: int, metric: str, tol: Optional[float], empty_clusters: str, bar
) -> KMeansResult:
    # The inertia is read on the host only when something needs it each iteration (tol, the bar,
    # the re-seeding asks whether a cluster is empty): without them the loop never synchronises,
    # and it runs inside a torch.compile graph (the layers' k-means initialisation does).
    watch = tol is not None or bar is not None
    inertia: list[Tensor] = []
    values: list[float] = []
    for _ in range(iters):
        assignments, distances, counts, sums, total = _assign_and_sum(shards, centroids, metric)
        inertia.append(total)
        if watch:
            values.append(float(total))
            _check_finite(values[-1], shards.x)
        if empty_clusters == "farthest" and bool((counts == 0).any()):
            _reseed_empty(shards, counts, sums, assignments, distances)
        new_centroids = sums / counts.clamp_min(1.0)[:, None]
        if metric == "cosine":
            new_centroids = _normalized(new_centroids)
        centroids = torch.where((counts == 0)[:, None], centroids, new_centroids)
        if watch:
            _report(bar, values[-1])
            if _converged(values, tol):
                break
    history = torch.stack(inertia).cpu()
    if not watch and not torch.compiler.is_compiling():
        _check_finite(float(history.sum()), shards.x)
    return KMeansResult(centroids, assignments, history)


def _assign_and_sum(
    shards: _Shards, centroids: Tensor, metric: str, *, reduce: bool = True
) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Tensor]:
    """One pass over the rows: ``(assignments [N], distances [N], counts [K], sums [K, D], inertia)``,
    the statistics and the inertia summed over ranks (``reduce=False``: no counts and sums)."""
    num_clusters = centroids.shape[0]
    codebook = _search_codebook(centroids, shards.x.dtype)
    counts = sums = None
    inertia = torch.zeros((), dtype=torch.float64, device=shards.device)
    pieces = []
    for _, block in shards.blocks():
        indices, distances = _search(block, codebook, metric)
        if reduce:
            block_counts, block_sums = segment_reduce(block, indices, num_clusters, deterministic=True)
            counts = block_counts if counts is None else counts.add_(block_counts)
            sums = block_sums if sums is None else sums.add_(block_sums)
        inertia += distances.sum(dtype=torch.float64)
        pieces.append((indices, distances))
    if len(pieces) == 1:
        assignments, distances = pieces[0]
    else:
        assignments = torch.cat([indices for indices, _ in pieces])
        distances = torch.cat([distances for _, distances in pieces])
    if reduce:
        shards.sum_(counts)
        shards.sum_(sums)
    return assignments, distances, counts, sums, shards.sum_(inertia)


def _reseed_empty(shards: _Shards, counts: Tensor, sums: Tensor, assignments: Tensor, distances: Tensor) -> None:
    """Moves each empty cluster onto one of the rows farthest from their centroids (the farthest
    first, ties to the lower global row), taking that row out of its cluster; in place.

    A row at distance 0 is never moved, nor a row whose cluster it would leave empty: a cluster
    that finds no row to take stays empty this iteration and keeps its centroid."""
    device = shards.device
    empty = torch.nonzero(counts == 0).flatten()
    wanted = empty.shape[0]
    local = _farthest(distances, min(wanted, shards.num_rows))
    candidate_distances = distances[local].double()
    row_numbers = local + shards.offset
    if shards.synced:
        # Every rank proposes its own farthest rows, padded to `wanted`; all ranks pick the same ones.
        padding = wanted - local.shape[0]
        candidate_distances = all_gather_rows(torch.cat([
            candidate_distances, torch.full((padding,), -math.inf, dtype=torch.float64, device=device)])).flatten()
        row_numbers = all_gather_rows(torch.cat([
            row_numbers, torch.full((padding,), -1, dtype=torch.int64, device=device)])).flatten()
        order = _farthest_order(candidate_distances, row_numbers)[:wanted]
        order = order[row_numbers[order] >= 0]
        candidate_distances, row_numbers = candidate_distances[order], row_numbers[order]
        local = row_numbers - shards.offset
    old_clusters = _clusters_of(shards, local, assignments)
    # The j-th candidate (in order) of a cluster may leave it only if the cluster keeps a row.
    by_cluster = torch.argsort(old_clusters, stable=True)
    sorted_clusters = old_clusters[by_cluster]
    position = torch.empty_like(by_cluster)
    position[by_cluster] = torch.arange(by_cluster.shape[0], device=device) - torch.searchsorted(
        sorted_clusters, sorted_clusters)
    movable = torch.nonzero((candidate_distances > 0) & (position < counts[old_clusters].long() - 1)).flatten()
    movable = movable[:wanted]
    targets = empty[: movable.shape[0]]
    rows = shards.global_rows(row_numbers[movable].cpu())
    out_counts, out_sums = segment_reduce(rows, old_clusters[movable], counts.shape[0], deterministic=True)
    counts.sub_(out_counts)
    sums.sub_(out_sums)
    counts[targets] = 1.0
    sums[targets] = rows
    moved = local[movable]
    mine = (moved >= 0) & (moved < shards.num_rows)
    assignments[moved[mine]] = targets[mine]


def _farthest(distances: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` largest ``distances``, largest first, ties to the lower index."""
    if count == 0:
        return torch.zeros(0, dtype=torch.int64, device=distances.device)
    threshold = torch.topk(distances, count).values[-1]
    above = torch.nonzero(distances > threshold).flatten()
    tied = torch.nonzero(distances == threshold).flatten()[: count - above.shape[0]]
    chosen = torch.cat([above, tied])
    return chosen[_farthest_order(distances[chosen].double(), chosen)]


def _farthest_order(values: Tensor, rows: Tensor) -> Tensor:
    """The order of (value descending, row ascending)."""
    by_row = torch.argsort(rows, stable=True)
    return by_row[torch.argsort(values[by_row], descending=True, stable=True)]


def _clusters_of(shards: _Shards, local: Tensor, assignments: Tensor) -> Tensor:
    """The clusters (summed over ranks) of rows given by their indices in this shard (or outside it)."""
    mine = (local >= 0) & (local < shards.num_rows)
    clusters = torch.zeros(local.shape[0], dtype=torch.int64, device=shards.device)
    clusters[mine] = assignments[local[mine]]
    return shards.sum_(clusters)


# --------------------------------------------------------------------------- mini-batch


def _mini_batch(
    shards: _Shards,
    centroids: Tensor,
    iters: int,
    metric: str,
    tol: Optional[float],
    batch_size: int,
    generator: torch.Generator,
    bar,
) -> KMeansResult:
    num_clusters = centroids.shape[0]
    steps = -(-shards.total // batch_size)
    weights = torch.zeros(num_clusters, dtype=torch.float64, device=shards.device)
    inertia: list[float] = []
    for _ in range(iters):
        total = torch.zeros((), dtype=torch.float64, device=shards.device)
        for _ in range(steps):
            local = torch.randint(shards.total, (batch_size,), generator=generator) - shards.offset
            rows = shards.rows(local[(local >= 0) & (local < shards.num_rows)])
            indices, distances = _search(rows, _search_codebook(centroids, rows.dtype), metric)
            counts, sums = segment_reduce(rows, indices, num_clusters, deterministic=True)
            total += shards.sum_(distances.sum(dtype=torch.float64))
            shards.sum_(counts)
            shards.sum_(sums)
            new_weights = weights + counts.double()
            moved = (centroids.double() * weights[:, None] + sums.double()) / new_weights.clamp_min(1.0)[:, None]
            moved = _normalized(moved.float()) if metric == "cosine" else moved.float()
            centroids = torch.where((counts > 0)[:, None], moved, centroids)
            weights = new_weights
        inertia.append(float(total) * shards.total / (steps * batch_size))
        _check_finite(inertia[-1], shards.x)
        _report(bar, inertia[-1])
        if _converged(inertia, tol):
            break
    assignments = _assign_and_sum(shards, centroids, metric, reduce=False)[0]
    return KMeansResult(centroids, assignments, torch.tensor(inertia, dtype=torch.float64))
