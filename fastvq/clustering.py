"""k-means on fastvq's fused ops: each Lloyd iteration is one nearest-code search and one segment sum.

The assignment step is ``fastvq.functional.nearest_code`` (never an ``N x K`` matrix), the update
step is ``fastvq.functional.segment_reduce`` on the same rows (per-cluster counts and sums in one
pass, no copy of ``x``), and the seedings draw from the search's distances. Whatever
backend ``FASTVQ_BACKEND`` selects runs those ops, so this module has no kernels of its own.

B independent problems ``x [B, N, D]`` run together: each iteration is one
``fastvq.functional.nearest_code_batched`` call and one segment sum over all B problems (problem ``b``'s
clusters are the segments ``b K .. b K + K - 1``), never a Python loop over B.

The default seeding, k-means|| (Bahmani et al. 2012, as Spark MLlib and cuML run it), costs about half
a Lloyd iteration at any N: it works on a sample of the rows, oversamples candidates by their
distance to the candidates so far in a few rounds, each round one fused search of the sample
against the new candidates, weights each candidate by the sample rows nearest to it, and reduces the
candidates to K seeds by weighted greedy k-means++. The exact greedy k-means++ over all rows
(``init="k-means++"``, scikit-learn's) walks every row once per seed: K passes over the data.

Where there are more than ``max_points_per_centroid K`` rows (128 K by default), the seeding and every
iteration but the last run on that many rows drawn without replacement (as FAISS trains on 256 K), and the
last iteration runs on all rows, so the centroids are the means of all the rows assigned to them: at
N = 10^6, D = 64, K = 1024 a default run, seeding included, then costs as much as four Lloyd iterations over
all rows (measured, one thread), where iterating on all rows took sixteen and the seeding.

Under ``torch.distributed`` every rank holds a shard of the rows; the counts, sums and inertia are
summed over ranks, and every random draw is made over the global row numbering from one
generator that all ranks seed alike, so the ranks end with what one process computes on the
concatenated shards (to the rounding of the summation order).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import Callable, Iterator, NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_float
from ._distributed import all_gather_rows, all_reduce_sum_, broadcast_from_first, is_distributed
from .ops.search import nearest_code, nearest_code_batched
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
# k-means||: the sample it seeds from holds this many rows per cluster (at most all the rows); it runs
# this many oversampling rounds, each drawing this many candidates per cluster (Spark MLlib's 2 rounds
# of 2 K). Its cost, in units of one Lloyd iteration's N K D products: 2 rounds x 2 K candidates plus
# the weighting pass against the 4 K of them, over 64 K sample rows: 8 x 64 K^2 / (N K) = 512 K / N,
# about 0.5 at N = 10^6 and K = 1024 (below 2 wherever N >= 256 K), plus K small steps on the candidates.
PARALLEL_SAMPLE_PER_CLUSTER = 64
PARALLEL_ROUNDS = 2
PARALLEL_OVERSAMPLING = 2
# Lloyd's iterations before the last run on this many rows per cluster (``max_points_per_centroid``). Half
# FAISS's 256: measured at N = 10^6, D = 64, K = 1024 (benchmarks/bench_kmeans.py's data), the last iteration
# over all rows brings the final inertia within 0.5 % of 256's, and the sample's iterations cost half as much.
MAX_POINTS_PER_CENTROID = 128


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
    init: Union[str, Tensor] = "k-means||",
    metric: str = "l2",
    tol: Optional[float] = 1e-4,
    batch_size: Optional[int] = None,
    seed: Optional[int] = None,
    progress: bool = False,
    empty_clusters: str = "farthest",
    sync: Optional[bool] = None,
    device: Union[str, torch.device, None] = None,
    max_points_per_centroid: Optional[int] = MAX_POINTS_PER_CENTROID,
) -> KMeansResult:
    """Clusters the rows of ``x`` into ``num_clusters`` clusters by k-means (Lloyd's algorithm).

    Every iteration assigns each row to its nearest centroid with the fused nearest-code search
    and moves each centroid to the mean of its rows with the segment sum; no ``N x K`` matrix is
    built, and the memory added on top of ``x`` is ``O(N + K D)``: 12 bytes a row for the
    assignments and their distances (the ``"k-means++"`` seeding briefly needs 16 more: each row's
    distance to the nearest seed, a per-row norm, and their running float64 sum), plus the sample's
    ``max_points_per_centroid K`` rows (below) when it draws one.

    With more than ``max_points_per_centroid K`` rows (default ``128 K``) and ``iters >= 2``, the seeding
    and every iteration but the last run on ``max_points_per_centroid K`` rows drawn uniformly without
    replacement (FAISS's ``max_points_per_centroid``, 256 there), and the last iteration assigns all
    rows and moves each centroid to the mean of all the rows assigned to it: the result is fitted to the
    whole data at the cost of one pass over it. ``max_points_per_centroid=None`` runs every iteration on
    all rows.

    A 3-D ``x [B, N, D]`` holds B independent problems, clustered in one call: each iteration is one
    batched search (``fastvq.nearest_code_batched``) and one segment sum over all B problems, and
    problem ``b`` gets exactly what ``kmeans(x[b], seed=seed + b, ...)`` gives on the same backend.

    Args:
        x: ``[N, D]`` float32, float16, bfloat16 or float64: a tensor (any device, any strides) or a
            numpy array, including a memory-mapped one (``np.load(path, mmap_mode="r")``), which is
            read in place and never loaded whole. Under ``torch.distributed`` this process's shard.
            Or ``[B, N, D]``: B problems of N rows each (read whole onto ``device``; not with
            ``batch_size`` nor under ``torch.distributed`` sync).
        num_clusters: ``K >= 1``; at most the number of rows (of a problem) for the drawn inits.
        iters: the most iterations (each one assignment and one update), ``>= 1``.
        init: ``"k-means||"`` (default), scalable k-means++ (Bahmani et al. 2012, as Spark MLlib and
            cuML seed): on ``S = min(N, 64 K)`` rows drawn uniformly without replacement, one row drawn
            uniformly, then 2 rounds each drawing ``2 K`` rows with probability proportional to their
            distance to the candidates so far (the search's distance: squared L2 or ``1 - cos``; each
            round one fused search of the sample against that round's candidates); each candidate is
            weighted by the sample rows nearest to it, and weighted greedy k-means++ (the ``"k-means++"``
            rule below, the weights multiplying the distances) picks the K seeds among the candidates.
            Where the sample holds no more rows than the candidates would (``S <= 1 + 4 K``), the
            candidates are the sample's rows, weighted 1: greedy k-means++ on the sample. It costs
            about ``512 K / N`` Lloyd iterations (0.5 at ``N = 10^6``, ``K = 1024``) plus K small
            steps on the ``4 K`` candidates.
            ``"k-means++"``: the exact D² sampling with greedy local trials over all rows, as
            scikit-learn's ``_kmeans_plusplus`` (the default before k-means||, kept by this name):
            the first seed is a uniformly drawn row; each further seed is the best of ``2 + int(log K)``
            rows drawn with probability proportional to their distance to the nearest seed so far, the
            best being the one that lowers the sum of those distances most. It walks all N rows once
            per seed.
            ``"random"``: ``K`` distinct rows drawn uniformly. Or a ``[K, D]`` (batched: ``[B, K, D]``)
            float tensor of initial centroids, used as given (no random draw is made then, but for
            the rows of ``max_points_per_centroid``'s sample). The drawn seedings draw from the sample
            where there is one.
        metric: ``"l2"`` (squared Euclidean, the inertia is the sum of squared distances) or
            ``"cosine"`` (spherical k-means: the distance is ``1 - cos``, and a centroid is its
            rows' normalised sum; seeds drawn from the rows are normalised too).
        tol: stop after an iteration that lowers the inertia by no more than ``tol`` times itself
            (batched: each problem stops on its own, its centroids and assignments frozen from then
            on); ``None`` runs all ``iters`` iterations.
        batch_size: run mini-batch k-means instead (Sculley 2010, the update of scikit-learn's
            ``MiniBatchKMeans``): an iteration is ``ceil(N / batch_size)`` steps, each drawing
            ``batch_size`` rows uniformly with replacement, assigning them, and moving each centroid
            to the running mean of every row ever assigned to it. The init then runs on
            ``min(N, max(3 batch_size, 3 K))`` rows drawn the same way (scikit-learn's
            ``init_size``). For data too large for a pass per update. Not for a 3-D ``x``.
        seed: seeds the random draws (init, mini-batches); the same seed gives the same result on a
            given backend and device. ``None`` draws the seed from PyTorch's global generator (rank
            0's under ``torch.distributed``), so ``torch.manual_seed`` makes runs repeatable. Problem
            ``b`` of a 3-D ``x`` draws from a generator seeded with ``seed + b``.
        progress: show a progress bar with the inertia (on rank 0 only; batched: the sum over the
            problems still running).
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
        max_points_per_centroid: ``M >= 1`` or ``None``. Where (a problem of) ``x`` has more than
            ``S = M K`` rows (all ranks' rows under ``torch.distributed``) and ``iters >= 2``: ``S`` rows
            drawn uniformly without replacement (from the same generator as the seeding, before it; the
            same rows on every rank) are seeded from and clustered for up to ``iters - 1`` iterations
            (``tol`` judged on them), then one last iteration runs on all rows. Default 128 (FAISS
            defaults to 256 and never revisits the other rows; this last iteration recovers what the
            smaller sample loses). ``None``: every iteration on all rows. Not used with ``batch_size``,
            which draws its own batches.

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
        - ``inertia`` float64 ``[iterations run]`` on the CPU: iteration ``i``'s sum over the rows of
          their distance to the centroid they were assigned to, before that iteration's update (FAISS's
          ``Kmeans.obj``). The iterations on ``max_points_per_centroid``'s sample give the sample's sum
          scaled by ``N / S`` (an estimate of all rows'); the last one, over all rows, the true sum. With
          ``batch_size``: the sum over the iteration's batches, each taken before its step's update,
          scaled to ``N`` rows (an estimate).

        For a 3-D ``x``: ``centroids [B, K, D]``, ``assignments [B, N]``, and ``inertia [iterations
        run, B]``, NaN in the iterations after a problem stopped (``tol``), so that ``inertia[:, b]``
        without its NaN tail is problem ``b``'s own history.

    The search and the segment sum run on the backend ``FASTVQ_BACKEND`` selects; the segment sum
    always takes its deterministic path. Scores and sums accumulate in fp32; float16/bfloat16 data
    is searched against centroids rounded to its dtype (the k-means|| sample is searched in fp32).

    Raises:
        TypeError: ``x`` neither a tensor nor a numpy array, or not of a float dtype; a non-int
            ``num_clusters``, ``iters``, ``batch_size``, ``seed`` or ``max_points_per_centroid``; an ``init``
            of a wrong type.
        ValueError: ``x`` not 2-D or 3-D or with ``D == 0``, ``num_clusters < 1`` or more than the
            rows for a drawn init (all ranks' rows under ``torch.distributed``), no rows with a
            ``batch_size``, a 3-D ``x`` with ``batch_size`` or under ``torch.distributed`` sync, an
            ``init`` tensor not ``[K, D]`` (``[B, K, D]``) or not finite, ``iters < 1``, ``tol < 0``,
            ``max_points_per_centroid < 1``,
            an unknown ``metric``, ``init`` or ``empty_clusters``; and, after the first pass, ``x``
            holding NaN or infinite values (the inertia is not finite).
    """
    x, device = _as_tensor(x, device)
    check_kmeans_args(x, num_clusters, iters, init, metric, tol, batch_size, seed, empty_clusters)
    if max_points_per_centroid is not None:
        _check_int("max_points_per_centroid", max_points_per_centroid, 1)
    synced = (is_distributed() if sync is None else bool(sync)) and is_distributed()
    if x.dim() == 3:
        if synced:
            raise ValueError(f"a batch of k-means problems (x of shape {tuple(x.shape)}) runs in one process: "
                             "call kmeans with sync=False, or on one [N, D] problem")
        sample_size = _lloyd_sample_size(lambda: x.shape[1], num_clusters, iters, max_points_per_centroid)
        return _batched_kmeans(x, device, num_clusters, iters, init, metric, tol, seed, progress, empty_clusters,
                               sample_size)
    shards = _Shards(x, device, synced)
    if isinstance(init, str) and shards.total < num_clusters:
        where = " on all ranks together" if synced else f" (shape {tuple(x.shape)})"
        raise ValueError(f"init={init!r} draws {num_clusters} distinct rows, but x has {shards.total} rows{where}")
    if batch_size is not None and shards.total == 0:
        raise ValueError(f"batch_size draws rows, but x has none (shape {tuple(x.shape)})")
    sample_size = None
    if batch_size is None:
        sample_size = _lloyd_sample_size(lambda: shards.total, num_clusters, iters, max_points_per_centroid)
    generator = None
    if isinstance(init, str) or batch_size is not None or sample_size is not None:
        generator = torch.Generator().manual_seed(_shared_seed(seed, synced))
    # The rows the seeding and all iterations but the last see: a sample of all ranks' rows, the same on every
    # rank, clustered by every rank alike without collectives.
    fitted = shards
    if sample_size is not None:
        picks = _distinct_rows(shards.total, sample_size, generator).sort().values
        fitted = _Shards(shards.global_rows(picks, dtype=x.dtype), device, False)
    if isinstance(init, Tensor):
        centroids = init.detach().to(device=device, dtype=torch.float32, copy=True)
    elif batch_size is not None:
        init_rows = min(shards.total, max(3 * batch_size, 3 * num_clusters))
        sample = shards.global_rows(torch.randint(shards.total, (init_rows,), generator=generator))
        centroids = _seed(_Shards(sample, device, False), num_clusters, init, metric, generator)
    else:
        centroids = _seed(fitted, num_clusters, init, metric, generator)
    bar = _progress_bar(iters, progress and (not synced or torch.distributed.get_rank() == 0))
    try:
        if batch_size is not None:
            return _mini_batch(shards, centroids, iters, metric, tol, batch_size, generator, bar)
        if sample_size is None:
            return _lloyd(shards, centroids, iters, metric, tol, empty_clusters, bar)
        on_sample = _lloyd(fitted, centroids, iters - 1, metric, tol, empty_clusters, bar, shards.total / sample_size)
        last = _lloyd(shards, on_sample.centroids, 1, metric, None, empty_clusters, bar)
        history = torch.cat([on_sample.inertia, last.inertia])
        return KMeansResult(last.centroids, last.assignments, history)
    finally:
        if bar is not None:
            bar.close()


# --------------------------------------------------------------------------- k-means

KMEANS_METRICS = ("l2", "cosine")
KMEANS_INITS = ("k-means||", "k-means++", "random")
KMEANS_EMPTY_CLUSTERS = ("farthest", "keep")


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _lloyd_sample_size(
    num_rows: Callable[[], int], num_clusters: int, iters: int, max_points_per_centroid: Optional[int]
) -> Optional[int]:
    """How many rows the seeding and all Lloyd iterations but the last run on; ``None``: all of them.

    The number of rows is asked for only where a sample may be drawn: under ``torch.distributed`` it is a
    collective and a host synchronisation, which a call that never samples (the layers' k-means
    initialisation, compiled with ``fullgraph=True``) must not make."""
    if max_points_per_centroid is None or iters < 2:
        return None
    size = max_points_per_centroid * num_clusters
    return size if num_rows() > size else None


def _distinct_rows(num_rows: int, count: int, generator: torch.Generator) -> Tensor:
    """``count`` distinct row numbers (CPU int64) drawn uniformly without replacement, in the order drawn.

    Far fewer than the rows: the first ``count`` distinct values of uniform draws (a uniform subset), in
    memory of order ``count``, so that a memory-mapped ``x`` of billions of rows needs no permutation of them."""
    if 4 * count >= num_rows:
        return torch.randperm(num_rows, generator=generator)[:count]
    picked = torch.zeros(0, dtype=torch.int64)
    while picked.shape[0] < count:
        draws = torch.cat([picked, torch.randint(num_rows, (2 * (count - picked.shape[0]) + 16,), generator=generator)])
        values, inverse = torch.unique(draws, return_inverse=True)
        first_draw = torch.full_like(values, draws.shape[0]).scatter_reduce_(
            0, inverse, torch.arange(draws.shape[0]), "amin")
        picked = draws[first_draw.sort().values[:count]]
    return picked


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
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be 2-D [N, D] (or 3-D [B, N, D], B problems), got shape {tuple(x.shape)}")
    check_float("x", x)
    if x.shape[-1] < 1:
        raise ValueError(f"x must have D >= 1, got shape {tuple(x.shape)}")
    if x.dim() == 3 and x.shape[0] < 1:
        raise ValueError(f"x [B, N, D] must hold at least one problem (B >= 1), got shape {tuple(x.shape)}")
    _check_int("num_clusters", num_clusters, 1)
    _check_int("iters", iters, 1)
    if batch_size is not None:
        _check_int("batch_size", batch_size, 1)
        if x.dim() == 3:
            raise ValueError(f"batch_size (mini-batch k-means) takes one [N, D] problem, got x of shape "
                             f"{tuple(x.shape)}")
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
    shape = "[B, K, D]" if x.dim() == 3 else "[K, D]"
    if isinstance(init, str):
        if init not in KMEANS_INITS:
            raise ValueError(f"init must be one of {KMEANS_INITS} or a {shape} tensor, got {init!r}")
        return
    if not isinstance(init, torch.Tensor):
        raise TypeError(f"init must be one of {KMEANS_INITS} or a {shape} tensor, got {type(init).__name__}")
    check_float("init", init)
    expected = (*x.shape[:-2], num_clusters, x.shape[-1])
    if tuple(init.shape) != expected:
        raise ValueError(
            f"init must have shape {expected} for num_clusters={num_clusters} and x of shape "
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

    def global_rows(self, indices: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Rows at global row ``indices`` (CPU int64) in ``dtype``, the same on every rank: the rank
        holding a row contributes it, the others zeros, and a sum brings them together."""
        if not self.synced:
            return self.rows(indices).to(dtype)
        local = indices - self.offset
        mine = (local >= 0) & (local < self.num_rows)
        # summed in fp32 (fp64 for fp64 data), which every collective backend sums and which holds x's values
        wide = torch.promote_types(dtype, torch.float32)
        out = torch.zeros(indices.shape[0], self.dim, dtype=wide, device=self.device)
        if bool(mine.any()):
            out[mine.to(self.device)] = self.rows(local[mine]).to(wide)
        return self.sum_(out).to(dtype)

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
    elif init == "k-means++":
        seeds = _kmeans_plusplus(shards, num_clusters, metric, generator)
    else:
        # Every rank draws the same global rows, so every rank seeds alike from the same sample.
        sample = shards.global_rows(_sample_rows(shards.total, num_clusters, generator))
        seeds = _kmeans_parallel(sample[None], num_clusters, metric, [generator])[0]
    return _normalized(seeds) if metric == "cosine" else seeds


def _sample_rows(num_rows: int, num_clusters: int, generator: torch.Generator) -> Tensor:
    """k-means||'s sample: ``min(N, 64 K)`` row numbers (CPU int64), all rows in order when that is all of them."""
    size = PARALLEL_SAMPLE_PER_CLUSTER * num_clusters
    if num_rows <= size:
        return torch.arange(num_rows)
    return torch.randperm(num_rows, generator=generator)[:size]


def _batched_rows(rows: Tensor, picks: Tensor) -> Tensor:
    """``rows [B, M, D]`` at ``picks [B, T]`` (int64): ``[B, T, D]``."""
    return rows.gather(1, picks[:, :, None].expand(-1, -1, rows.shape[2]))


def _draw(cumulative: Tensor, targets: Tensor) -> Tensor:
    """For each ``targets [B, T]``, the first position whose running sum ``cumulative [B, M]`` reaches it."""
    return torch.searchsorted(cumulative, targets).clamp_max_(cumulative.shape[1] - 1)


def _kmeans_parallel(sample: Tensor, num_clusters: int, metric: str, generators: list) -> Tensor:
    """k-means|| on ``sample [B, S, D]`` (float32, B problems, ``generators[b]`` drawing problem ``b``'s
    numbers): float32 seeds ``[B, K, D]`` (see ``kmeans``'s ``init``). The sample is scored against the
    candidates by the fused batched search only: never a copy of the sample per candidate."""
    num_problems, num_rows, _ = sample.shape
    device = sample.device
    per_round = PARALLEL_OVERSAMPLING * num_clusters
    if num_rows <= 1 + PARALLEL_ROUNDS * per_round:
        weights = torch.ones(num_problems, num_rows, dtype=torch.float32, device=device)
        return _weighted_kmeans_plusplus(sample, weights, num_clusters, metric, generators)
    first = torch.stack([torch.randint(num_rows, (1,), generator=g) for g in generators]).to(device)
    picked = [first]
    closest = _batched_search(sample, _batched_rows(sample, first), metric)[1]
    for _ in range(PARALLEL_ROUNDS):
        # Bahmani et al. draw each row with probability min(1, l d / sum d); a fixed l draws per round with
        # probability d / sum d (a row already picked has d = 0) keeps every problem's candidates one shape.
        uniforms = torch.stack([torch.rand(per_round, generator=g, dtype=torch.float64) for g in generators])
        cumulative = torch.cumsum(closest, dim=1, dtype=torch.float64)
        drawn = _draw(cumulative, uniforms.to(device) * cumulative[:, -1:])
        picked.append(drawn)
        torch.minimum(closest, _batched_search(sample, _batched_rows(sample, drawn), metric)[1], out=closest)
    candidates = _batched_rows(sample, torch.cat(picked, dim=1))
    # Each candidate weighs as many sample rows as are nearest to it; of equal candidates (a row drawn twice)
    # the first takes them all, so the others weigh 0 and are never drawn.
    nearest = _batched_search(sample, candidates, metric)[0]
    weights = torch.zeros(num_problems, candidates.shape[1], dtype=torch.float32, device=device)
    weights.scatter_add_(1, nearest, torch.ones_like(nearest, dtype=torch.float32))
    return _weighted_kmeans_plusplus(candidates, weights, num_clusters, metric, generators)


def _batched_search(rows: Tensor, codes: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    return nearest_code_batched(rows, codes, metric=metric)


def _weighted_kmeans_plusplus(
    candidates: Tensor, weights: Tensor, num_clusters: int, metric: str, generators: list
) -> Tensor:
    """Greedy k-means++ (scikit-learn's rule) on weighted points ``candidates [B, C, D]``, ``weights [B, C]``:
    the first seed drawn with probability proportional to the weights, each further one the best of
    ``2 + int(log K)`` drawn in proportion to weight times distance to the nearest seed so far, the best
    lowering the weighted sum of those distances most. float32 ``[B, K, D]``.

    All of a problem's uniform numbers are drawn at once, so the K steps run no generator; the trials'
    distances to every candidate come from one small batched product per step (around the candidates'
    mean for l2, so that data far from the origin does not cancel)."""
    num_problems = candidates.shape[0]
    device = candidates.device
    num_trials = 2 + int(math.log(num_clusters))
    uniforms = torch.stack([torch.rand(num_clusters, num_trials, generator=g, dtype=torch.float64)
                            for g in generators]).to(device)
    weighted_sum = torch.cumsum(weights, dim=1, dtype=torch.float64)
    first = _draw(weighted_sum, uniforms[:, 0, :1] * weighted_sum[:, -1:])
    seeds = torch.empty(num_problems, num_clusters, candidates.shape[2], dtype=torch.float32, device=device)
    seeds[:, :1] = _batched_rows(candidates, first)
    closest = _batched_search(candidates, seeds[:, :1], metric)[1]
    if metric == "l2":
        points = candidates - candidates.mean(dim=1, keepdim=True)
        squares = points.square().sum(dim=2)
    else:
        squares = None
        points = F.normalize(candidates, dim=2, eps=ROW_NORM_EPS)
    problems = torch.arange(num_problems, device=device)
    with _one_thread(device):
        for center in range(1, num_clusters):
            _add_seed(seeds, center, candidates, weights, points, squares, closest, uniforms, problems)
    return seeds


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Runs the block on one CPU thread: each k-means++ step works on a few thousand candidates, too few to
    share, and waking the intra-op pool for each of the step's dozen small ops costs more than the ops (on a
    loaded machine, measured 35 times more: 38 s against 1.1 s for K = 1024 steps on two cores)."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _add_seed(
    seeds: Tensor,
    center: int,
    candidates: Tensor,
    weights: Tensor,
    points: Tensor,
    squares: Optional[Tensor],
    closest: Tensor,
    uniforms: Tensor,
    problems: Tensor,
) -> None:
    """One greedy k-means++ step on every problem: ``seeds[:, center]`` and ``closest`` updated in place."""
    cumulative = torch.cumsum(closest * weights, dim=1, dtype=torch.float64)
    trials = _draw(cumulative, uniforms[:, center] * cumulative[:, -1:])
    products = torch.bmm(points, _batched_rows(points, trials).transpose(1, 2))
    if squares is not None:
        distances = products.mul_(-2.0).add_(squares[:, :, None]).add_(squares.gather(1, trials)[:, None, :])
        distances.clamp_min_(0.0)
    else:
        distances = products.neg_().add_(1.0)
    distances = torch.minimum(distances, closest[:, :, None])
    best = torch.sum(distances * weights[:, :, None], dim=1, dtype=torch.float64).argmin(dim=1)
    seeds[:, center] = candidates[problems, trials[problems, best]]
    closest.copy_(distances[problems, :, best])


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
    shards: _Shards,
    centroids: Tensor,
    iters: int,
    metric: str,
    tol: Optional[float],
    empty_clusters: str,
    bar,
    inertia_scale: float = 1.0,
) -> KMeansResult:
    """Lloyd's iterations on ``shards``; the inertia reported and returned is multiplied by ``inertia_scale``
    (``N / S`` on a sample of S of the N rows: an estimate of all rows')."""
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
            _report(bar, values[-1] * inertia_scale)
            if _converged(values, tol):
                break
    history = torch.stack(inertia).cpu() * inertia_scale
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


# --------------------------------------------------------------------------- B problems at once


def _batched_kmeans(
    x: Tensor,
    device: torch.device,
    num_clusters: int,
    iters: int,
    init: Union[str, Tensor],
    metric: str,
    tol: Optional[float],
    seed: Optional[int],
    progress: bool,
    empty_clusters: str,
    sample_size: Optional[int],
) -> KMeansResult:
    """``kmeans`` on ``x [B, N, D]``: B problems, each drawing from its own generator (``seed + b``), each
    seeded and iterated on ``sample_size`` of its rows before the last iteration where that is not ``None``."""
    num_problems, num_rows, dim = x.shape
    if isinstance(init, str) and num_rows < num_clusters:
        raise ValueError(f"init={init!r} draws {num_clusters} distinct rows of each problem, but x has "
                         f"{num_rows} rows per problem (shape {tuple(x.shape)})")
    x = x.to(device)
    generators = []
    if isinstance(init, str) or sample_size is not None:
        base = _shared_seed(seed, False)
        generators = [torch.Generator().manual_seed(base + b) for b in range(num_problems)]
    fitted = x
    if sample_size is not None:
        picks = torch.stack([_distinct_rows(num_rows, sample_size, g).sort().values for g in generators])
        fitted = _batched_rows(x, picks.to(device))
    if isinstance(init, Tensor):
        centroids = init.detach().to(device=device, dtype=torch.float32, copy=True)
    else:
        centroids = _batched_seed(fitted, num_clusters, init, metric, generators)
    bar = _progress_bar(iters, progress)
    try:
        if sample_size is None:
            return _batched_lloyd(x, centroids, iters, metric, tol, empty_clusters, bar)
        on_sample = _batched_lloyd(fitted, centroids, iters - 1, metric, tol, empty_clusters, bar,
                                   num_rows / sample_size)
        last = _batched_lloyd(x, on_sample.centroids, 1, metric, None, empty_clusters, bar)
        # Each problem's last iteration follows its own iterations on the sample (which stop at different
        # iterations under tol), so that its column without the NaN tail is its history, as for one problem.
        history = torch.cat([on_sample.inertia, torch.full((1, num_problems), math.nan, dtype=torch.float64)])
        ran = (~on_sample.inertia.isnan()).sum(dim=0)
        history[ran, torch.arange(num_problems)] = last.inertia[0]
        return KMeansResult(last.centroids, last.assignments, history)
    finally:
        if bar is not None:
            bar.close()


def _batched_seed(x: Tensor, num_clusters: int, init: str, metric: str, generators: list) -> Tensor:
    """float32 ``[B, K, D]`` seeds, problem ``b``'s drawn as ``_seed`` draws them with ``generators[b]``."""
    num_problems, num_rows, _ = x.shape
    if init == "k-means++":
        # The exact greedy seeding walks all rows once per seed in any case: one problem after another.
        seeds = torch.stack([_kmeans_plusplus(_Shards(x[b], x.device, False), num_clusters, metric, generator)
                             for b, generator in enumerate(generators)])
    else:
        if init == "random":
            picks = [torch.randperm(num_rows, generator=g)[:num_clusters] for g in generators]
        else:
            picks = [_sample_rows(num_rows, num_clusters, g) for g in generators]
        rows = _batched_rows(x, torch.stack(picks).to(x.device)).float()
        seeds = rows if init == "random" else _kmeans_parallel(rows, num_clusters, metric, generators)
    return F.normalize(seeds, dim=2, eps=CENTROID_NORM_EPS) if metric == "cosine" else seeds


def _batched_lloyd(
    x: Tensor,
    centroids: Tensor,
    iters: int,
    metric: str,
    tol: Optional[float],
    empty_clusters: str,
    bar,
    inertia_scale: float = 1.0,
) -> KMeansResult:
    """Lloyd's iterations on B problems at once: one batched search and one segment sum per iteration; the
    inertia reported and returned is multiplied by ``inertia_scale`` (as ``_lloyd``'s).

    A problem that met ``tol`` stops: its centroids and assignments stay those of its last iteration
    (it is still searched with the others, whose shapes it shares) and its inertia reads NaN from then on."""
    num_problems, num_rows, dim = x.shape
    num_clusters = centroids.shape[1]
    device = x.device
    # One segment sum over all B problems: the rows as one [B N, D] matrix, problem b's clusters the
    # segments b K .. b K + K - 1, so that its counts and sums are rows b K .. b K + K - 1 of the result.
    flat_rows = x.reshape(num_problems * num_rows, dim)
    segment_offsets = torch.arange(num_problems, device=device)[:, None] * num_clusters
    # Which problems still iterate: known on the host (tol is checked there), sent to the device only once one
    # has stopped, so that an iteration of B running problems does no masking.
    running = torch.ones(num_problems, dtype=torch.bool)
    assignments = torch.zeros(num_problems, num_rows, dtype=torch.int64, device=device)
    histories: list[list[float]] = [[] for _ in range(num_problems)]
    inertia: list[Tensor] = []
    for _ in range(iters):
        indices, distances = nearest_code_batched(x, _search_codebook(centroids, x.dtype), metric=metric)
        counts, sums = segment_reduce(flat_rows, (indices + segment_offsets).flatten(), num_problems * num_clusters,
                                      deterministic=True)
        counts, sums = counts.view(num_problems, num_clusters), sums.view(num_problems, num_clusters, dim)
        totals = distances.sum(dim=1, dtype=torch.float64).cpu()
        inertia.append(torch.where(running, totals, math.nan))
        _check_finite(float(totals.sum()), x)
        if empty_clusters == "farthest":
            for b in torch.nonzero(running & (counts == 0).any(dim=1).cpu()).flatten().tolist():
                _reseed_empty(_Shards(x[b], device, False), counts[b], sums[b], indices[b], distances[b])
        new_centroids = sums.div_(counts.clamp_min(1.0)[:, :, None])
        if metric == "cosine":
            new_centroids = F.normalize(new_centroids, dim=2, eps=CENTROID_NORM_EPS)
        if bool(running.all()):
            centroids = torch.where((counts > 0)[:, :, None], new_centroids, centroids)
            assignments = indices
        else:
            mask = running.to(device)
            centroids = torch.where((mask[:, None] & (counts > 0))[:, :, None], new_centroids, centroids)
            assignments = torch.where(mask[:, None], indices, assignments)
        if tol is not None:
            for b in torch.nonzero(running).flatten().tolist():
                histories[b].append(float(totals[b]))
                if _converged(histories[b], tol):
                    running[b] = False
        _report(bar, float(totals[running].sum()) * inertia_scale)
        if not bool(running.any()):
            break
    return KMeansResult(centroids, assignments, torch.stack(inertia).cpu() * inertia_scale)


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
