"""The specification: every fastvq op written the naive way the VQ-VAE literature writes it.

These functions build the full ``N x K`` distance and one-hot matrices on purpose. They are the
oracle the tests and benchmarks compare the fused kernels against and are never called by the
fast path. ``upcast=True`` computes in float64 (the "true" answer); ``upcast=False`` computes in
the inputs' own dtype, which is what PyTorch users get today and what a low-precision kernel's
error is measured against.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ._philox import gumbel_noise

METRICS = ("l2", "cosine", "dot")


def distance_matrix_ref(
    z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", *, upcast: bool = True
) -> torch.Tensor:
    """All pairwise distances ``[N, K]``: squared L2, ``1 - cos`` (clamped at 0) or ``-z.e``.

    ``l2`` is written ``z^2 + e^2 - 2 z.e`` as the VQ-VAE code bases write it; with ``upcast`` it
    is evaluated in float64, where that form's cancellation is harmless at test sizes. Where a row
    or code holds an Inf or NaN that form gives ``inf - inf`` or ``0 * inf`` = NaN even when the
    distance is plainly infinite (``z = 0`` against an Inf code), so those pairs are computed from
    ``z - e`` as the kernels' returned distances are: Inf, or NaN for ``inf - inf`` and NaN inputs.
    """
    dtype = torch.float64 if upcast else torch.promote_types(z.dtype, codebook.dtype)
    z = z.to(dtype)
    codebook = codebook.to(dtype)
    if metric == "l2":
        z_sq = (z * z).sum(dim=1, keepdim=True)
        e_sq = (codebook * codebook).sum(dim=1)
        distances = (z_sq + e_sq - 2.0 * z @ codebook.T).clamp_min(0)
        rows = (~z.isfinite()).any(dim=1).nonzero().flatten()
        codes = (~codebook.isfinite()).any(dim=1).nonzero().flatten()
        distances[rows] = (z[rows, None] - codebook[None]).square().sum(dim=2)
        distances[:, codes] = (z[:, None] - codebook[None, codes]).square().sum(dim=2)
        return distances
    if metric == "cosine":
        # Rounding can put a parallel pair's 1 - cos a few ulps below 0; clamp_min keeps NaN.
        return (1.0 - F.normalize(z, dim=1) @ F.normalize(codebook, dim=1).T).clamp_min(0)
    if metric == "dot":
        return -(z @ codebook.T)
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def nearest_code_ref(
    z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", *, upcast: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``argmin`` over the full distance matrix, then a gather.

    Returns ``(indices int64 [N], distances float32 [N], codes [N, D])``. Ties go to the lowest
    index (``argmin`` semantics); NaN distances never win, and a row whose distances are all NaN
    gets index 0 and distance NaN, which is the contract the kernels keep.
    """
    dist = distance_matrix_ref(z, codebook, metric, upcast=upcast)
    all_nan = dist.isnan().all(dim=1)
    indices = dist.nan_to_num(nan=float("inf"), posinf=float("inf")).argmin(dim=1)
    indices = torch.where(all_nan, torch.zeros_like(indices), indices)
    best = dist.gather(1, indices[:, None]).squeeze(1)
    out_dtype = torch.promote_types(z.dtype, codebook.dtype)
    return indices, best.float(), codebook.to(out_dtype)[indices]


def rotate_to_ref(z: torch.Tensor, codes: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The rotation trick (Fifty et al. 2024, section 4.2) written with autograd.

    Rotates ``z`` onto ``codes`` with the Householder-style map ``I - 2 w w^T + 2 q u^T``
    (``u = z/|z|``, ``q = e/|e|``, ``w = (u + q)/|u + q|``) and rescales by ``|e|/|z|``; every
    factor but ``z`` itself is detached, so the forward value is ``e`` and the gradient to ``z``
    is the transposed rotation of the output gradient.
    """
    z_norm = z.norm(dim=-1, keepdim=True)
    e_norm = codes.norm(dim=-1, keepdim=True)
    u = (z / z_norm.clamp_min(eps)).detach()
    q = (codes / e_norm.clamp_min(eps)).detach()
    w = F.normalize(u + q, dim=-1, eps=eps).detach()
    rotated = z - 2.0 * (z * w).sum(-1, keepdim=True) * w + 2.0 * (z * u).sum(-1, keepdim=True) * q
    return rotated * (e_norm / z_norm.clamp_min(eps)).detach()


def vector_quantize_ref(
    z: torch.Tensor,
    codebook: torch.Tensor,
    beta: float = 0.25,
    metric: str = "l2",
    *,
    codebook_weight: float = 1.0,
    rotation_trick: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VQ-VAE's quantizer (van den Oord et al. 2017) with autograd, as the papers write it.

    ``quantized = z + (e - z).detach()`` (straight-through estimator), or ``rotate_to_ref(z, e)``
    with ``rotation_trick``, and
    ``loss = codebook_weight * mean((sg[z] - e)^2) + beta * mean((z - sg[e])^2)``.
    Returns ``(quantized, indices, loss)``; ``loss`` is float32 (the op's dtype), computed in the
    promoted dtype widened to at least float32, so fp64 inputs get a float64 oracle (and float64
    gradients) rounded once at the end.
    """
    with torch.no_grad():
        indices, _, _ = nearest_code_ref(z, codebook, metric)
    dtype = torch.promote_types(z.dtype, codebook.dtype)
    loss_dtype = torch.promote_types(dtype, torch.float32)
    z = z.to(dtype)
    codes = codebook.to(dtype)[indices]
    codebook_loss = F.mse_loss(codes.to(loss_dtype), z.detach().to(loss_dtype))
    commitment_loss = F.mse_loss(z.to(loss_dtype), codes.detach().to(loss_dtype))
    if rotation_trick:
        quantized = rotate_to_ref(z, codes.detach())
    else:
        quantized = z + (codes - z).detach()
    return quantized, indices, (codebook_weight * codebook_loss + beta * commitment_loss).float()


def segment_reduce_ref(
    z: torch.Tensor, indices: torch.Tensor, num_codes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code counts ``[K]`` (through a one-hot matrix) and sums ``[K, D]``, float32.

    The sums are added row by row in float64 (``index_add_``), not as ``one_hot.T @ z``: there
    ``0 * nan`` would turn every code's sum NaN from one NaN row, where the contract (and every
    backend) lets a NaN or Inf row change only its own code's sum.
    """
    one_hot = F.one_hot(indices, num_codes).to(torch.float64)
    sums = torch.zeros((num_codes, z.shape[1]), dtype=torch.float64, device=z.device)
    return one_hot.sum(dim=0).float(), sums.index_add_(0, indices, z.to(torch.float64)).float()


def ema_update_ref_(
    codebook: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_avg: torch.Tensor,
    z: torch.Tensor,
    indices: torch.Tensor,
    decay: float = 0.99,
    eps: float = 1e-5,
    step: Optional[torch.Tensor] = None,
) -> None:
    """EMA codebook update with Laplace smoothing, in place, as VQ-VAE's appendix writes it.

    ``cluster_size <- lerp(cluster_size, one_hot.sum(0), 1 - decay)``,
    ``embed_avg <- lerp(embed_avg, one_hot.T @ z, 1 - decay)``, then with ``n = sum(N_k)`` the
    smoothed counts ``(N_k + eps) / (n + K eps) * n`` and ``codebook = embed_avg / smoothed``.

    With ``step`` (a counter tensor, incremented here) the zero-debiased variant is used: the
    moving averages start at zero and are divided by ``1 - decay^step`` before smoothing.
    """
    num_codes = codebook.shape[0]
    counts, sums = segment_reduce_ref(z, indices, num_codes)
    cluster_size.lerp_(counts.to(cluster_size.dtype), 1.0 - decay)
    embed_avg.lerp_(sums.to(embed_avg.dtype), 1.0 - decay)
    sizes, avgs = cluster_size.double(), embed_avg.double()
    if step is not None:
        step.add_(1)
        correction = 1.0 - decay ** step.double()
        sizes, avgs = sizes / correction, avgs / correction
    total = sizes.sum()
    if total <= 0:  # no mass yet: 0/0 codes would corrupt the codebook, so it is left alone
        return
    smoothed = (sizes + eps) / (total + num_codes * eps) * total
    codebook.copy_((avgs / smoothed[:, None]).to(codebook.dtype))


# --------------------------------------------------------------------------- k-means


def kmeans_plusplus_ref(
    x: torch.Tensor, num_clusters: int, generator: torch.Generator, metric: str = "l2"
) -> torch.Tensor:
    """scikit-learn's ``_kmeans_plusplus`` (greedy k-means++), float32 seeds ``[K, D]``.

    The first seed is a uniform row; each further one is the best, by the potential
    ``sum(min(closest, d(x, candidate)))``, of ``2 + int(log K)`` rows drawn by
    ``searchsorted(cumsum(closest), uniform * potential)``, with ``d`` the full ``[T, N]`` distance
    matrix in float64. The draws come from ``generator`` in the order ``fastvq.kmeans`` makes them.
    Cosine seeds are normalised.
    """
    num_rows = x.shape[0]
    trials = 2 + int(math.log(num_clusters))
    rows = x.to(torch.float64)
    chosen = [int(torch.randint(num_rows, (1,), generator=generator))]
    closest = distance_matrix_ref(rows[chosen], rows, metric)[0]
    for _ in range(1, num_clusters):
        targets = torch.rand(trials, generator=generator, dtype=torch.float64) * closest.sum()
        candidates = torch.searchsorted(torch.cumsum(closest, 0), targets).clamp_max(num_rows - 1)
        candidate_closest = torch.minimum(closest, distance_matrix_ref(rows[candidates], rows, metric))
        best = int(candidate_closest.sum(dim=1).argmin())
        closest = candidate_closest[best]
        chosen.append(int(candidates[best]))
    seeds = x[chosen].float()
    return F.normalize(seeds, dim=1, eps=1e-6) if metric == "cosine" else seeds


def kmeans_ref(
    x: torch.Tensor,
    init: torch.Tensor,
    iters: int,
    metric: str = "l2",
    *,
    tol: Optional[float] = None,
    empty_clusters: str = "farthest",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd's k-means the textbook way: argmin over the full ``[N, K]`` distance matrix (float64),
    means through a one-hot matrix. Returns ``(centroids float32 [K, D], assignments int64 [N],
    inertia float64 [iterations run])`` with ``fastvq.kmeans``'s meaning.

    An empty cluster (``empty_clusters="farthest"``) takes, in cluster order, the next of the rows
    farthest from their centroids (largest distance first, ties to the lower row) among as many
    such rows as there are empty clusters, skipping a row at distance 0 or one whose cluster it
    would leave empty; ``"keep"`` keeps its centroid. Cosine centroids are normalised sums.
    """
    centroids = init.to(torch.float64)
    rows = x.to(torch.float64)
    num_clusters = centroids.shape[0]
    inertia: list[float] = []
    for _ in range(iters):
        distances = distance_matrix_ref(rows, centroids, metric)
        assignments = distances.argmin(dim=1)
        best = distances.gather(1, assignments[:, None]).squeeze(1)
        inertia.append(float(best.sum()))
        one_hot = F.one_hot(assignments, num_clusters).to(torch.float64)
        counts, sums = one_hot.sum(dim=0), one_hot.T @ rows
        empty = [k for k in range(num_clusters) if counts[k] == 0]
        if empty and empty_clusters == "farthest":
            farthest = sorted(range(rows.shape[0]), key=lambda row: (-float(best[row]), row))[: len(empty)]
            leaving: dict[int, int] = {}
            targets = iter(empty)
            for row in farthest:
                old = int(assignments[row])
                earlier = leaving.get(old, 0)
                leaving[old] = earlier + 1
                if best[row] <= 0 or earlier >= counts[old] - 1:
                    continue
                target = next(targets)
                counts[old] -= 1
                sums[old] -= rows[row]
                counts[target], sums[target] = 1, rows[row]
                assignments[row] = target
        new = sums / counts.clamp_min(1)[:, None]
        if metric == "cosine":
            new = F.normalize(new, dim=1, eps=1e-6)
        centroids = torch.where((counts == 0)[:, None], centroids, new)
        if tol is not None and len(inertia) > 1 and inertia[-2] - inertia[-1] <= tol * inertia[-1]:
            break
    return centroids.float(), assignments, torch.tensor(inertia, dtype=torch.float64)


# --------------------------------------------------------------------------- masked convolution


def pixelcnn_mask_ref(mask_type: str, kernel_size: int | tuple[int, int]) -> torch.Tensor:
    """PixelCNN's mask, float ``[kH, kW]``, built the way the PixelCNN code bases build it.

    Type ``"A"`` zeroes the centre tap, everything right of it and every row below it; type ``"B"``
    keeps the centre. ``"V"``, Gated PixelCNN's vertical stack, keeps every row up to and including
    the centre row and zeroes the rows below it.
    """
    height, width = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    mask = torch.ones(height, width)
    if mask_type == "V":
        mask[height // 2 + 1 :, :] = 0
        return mask
    if mask_type not in ("A", "B"):
        raise ValueError(f"mask_type must be 'A', 'B' or 'V', got {mask_type!r}")
    mask[height // 2, width // 2 + (mask_type == "B") :] = 0
    mask[height // 2 + 1 :, :] = 0
    return mask


def masked_conv2d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    mask_type: str = "B",
    padding: Optional[int | tuple[int, int]] = None,
    *,
    upcast: bool = True,
) -> torch.Tensor:
    """``conv2d(x, weight * mask)``: the masked convolution every PixelCNN writes, stride 1.

    ``padding=None`` pads ``(kH // 2, kW // 2)`` ("same"). With ``upcast`` it runs in float64;
    otherwise in the promoted dtype of the inputs. Masked taps still cost a multiply-add here, and a
    NaN or Inf in a masked tap of ``weight`` poisons the output (``0 * inf = nan``).
    """
    height, width = weight.shape[-2:]
    if padding is None:
        padding = (height // 2, width // 2)
    dtype = torch.float64 if upcast else torch.promote_types(x.dtype, weight.dtype)
    mask = pixelcnn_mask_ref(mask_type, (height, width)).to(device=weight.device, dtype=dtype)
    return F.conv2d(
        x.to(dtype), weight.to(dtype) * mask, None if bias is None else bias.to(dtype), padding=padding
    )


# --------------------------------------------------------------------------- soft assignments


def soft_logits_ref(
    z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", temperature: float = 1.0, *, upcast: bool = True
) -> torch.Tensor:
    """The full ``[N, K]`` logits of the soft-assignment ops: ``-|z - e|^2``, ``-|z - e|`` (its square
    floored at 1e-8, as vector-quantize-pytorch's ``cdist``), ``cos(z, e)`` or ``z.e``, over the
    temperature. A code with a NaN or infinite entry gets logit ``-inf`` (the ops exclude it); a NaN
    row keeps NaN logits."""
    dtype = torch.float64 if upcast else torch.promote_types(z.dtype, codebook.dtype)
    finite = codebook.isfinite().all(dim=1)
    z, codebook = z.to(dtype), torch.where(finite[:, None], codebook, 0).to(dtype)
    if metric == "l2":
        similarity = -distance_matrix_ref(z, codebook, "l2", upcast=upcast)
    elif metric == "euclidean":
        similarity = -distance_matrix_ref(z, codebook, "l2", upcast=upcast).clamp_min(1e-8).sqrt()
    elif metric == "cosine":
        similarity = F.normalize(z, dim=1) @ F.normalize(codebook, dim=1).T
    elif metric == "dot":
        similarity = z @ codebook.T
    else:
        raise ValueError(f"metric must be one of ('l2', 'cosine', 'dot', 'euclidean'), got {metric!r}")
    return (similarity / temperature).masked_fill(~finite, float("-inf"))


def soft_quantize_ref(
    z: torch.Tensor,
    codebook: torch.Tensor,
    metric: str = "l2",
    temperature: float = 1.0,
    *,
    seed: Optional[int] = None,
    values: Optional[torch.Tensor] = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(softmax(logits) @ values, argmax(logits + gumbel), logsumexp(logits))`` over the full matrix,
    with autograd. ``seed`` draws the ops' Gumbel noise (``fastvq._philox.gumbel_noise``) for
    the whole ``N x K`` matrix at once; values default to the codebook, and an excluded code's value
    row is zeroed as the ops zero it. A NaN logit never wins the argmax (an all-NaN row gets 0)."""
    logits = soft_logits_ref(z, codebook, metric, temperature, upcast=upcast)
    values = codebook if values is None else values
    finite = codebook.isfinite().all(dim=1)
    values = torch.where(finite[:, None], values, 0).to(logits.dtype)
    soft = torch.softmax(logits, dim=1) @ values
    scores = logits.detach().nan_to_num(nan=float("-inf"))
    if seed is not None:
        rows = torch.arange(z.shape[0], dtype=torch.int64, device=z.device)
        scores = scores + gumbel_noise(seed, rows, 0, codebook.shape[0]).to(scores.dtype)
    return soft, scores.argmax(dim=1), torch.logsumexp(logits, dim=1)


def soft_entropy_ref(
    z: torch.Tensor, codebook: torch.Tensor, metric: str = "dot", temperature: float = 1.0, *, upcast: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_entropy [N], mean_probs [K])`` of ``p = softmax(logits)`` through the full matrix."""
    logits = soft_logits_ref(z, codebook, metric, temperature, upcast=upcast)
    probs = torch.softmax(logits, dim=1)
    log_probs = torch.log_softmax(logits, dim=1)
    # 0 * log 0 = 0: an excluded code's -inf log-probability contributes nothing.
    row_entropy = -torch.where(probs > 0, probs * log_probs, 0).sum(dim=1)
    return row_entropy, probs.mean(dim=0)


def ibq_ref(
    z: torch.Tensor,
    codebook: torch.Tensor,
    beta: float = 0.25,
    *,
    entropy_temperature: float = 0.01,
    sample_minimization_weight: float = 1.0,
    batch_maximization_weight: float = 1.0,
    l2_normalize: bool = False,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Index backpropagation quantization (Shi et al. 2024, IBQ) for rows ``z [N, D]``, as SEED-Voken's
    ``IndexPropagationQuantize`` computes it, through the logits, the soft and the hard one-hot.

    ``p = softmax(z C^T)``, ``h = one_hot(argmax p)``, ``quantized = (h - sg(p) + p) C`` (the hard
    code forward, the gradient through the soft assignment, to ``z`` and, through the logits and the
    hard code, to ``C``), and ``quant_loss = mean((quantized - z)^2) + mean((sg(h C) - z)^2) + beta
    mean((h C - sg(z))^2)``. The entropy terms are MAGVIT's ``compute_entropy_loss`` on
    ``softmax(z C^T / entropy_temperature)``: the mean per-sample entropy, the entropy of the batch
    mean (``-sum a log(a + eps)``) and ``sample_minimization_weight * sample -
    batch_maximization_weight * batch``. ``l2_normalize`` first normalises ``z`` and the codes.

    Returns ``(quantized, indices, quant_loss, (sample_entropy, avg_entropy, entropy_loss))``.
    """
    if l2_normalize:
        z, codebook = F.normalize(z, dim=1), F.normalize(codebook, dim=1)
    logits = z @ codebook.T
    soft_one_hot = torch.softmax(logits, dim=1)
    indices = soft_one_hot.argmax(dim=1)
    hard_one_hot = F.one_hot(indices, codebook.shape[0]).to(soft_one_hot.dtype)
    quantized = (hard_one_hot - soft_one_hot.detach() + soft_one_hot) @ codebook
    hard_codes = hard_one_hot @ codebook
    quant_loss = (
        F.mse_loss(quantized, z) + F.mse_loss(hard_codes.detach(), z) + beta * F.mse_loss(hard_codes, z.detach())
    )
    probs = torch.softmax(logits / entropy_temperature, dim=1)
    log_probs = torch.log_softmax(logits / entropy_temperature, dim=1)
    avg_probs = probs.mean(dim=0)
    avg_entropy = -(avg_probs * torch.log(avg_probs + eps)).sum()
    sample_entropy = -(probs * log_probs).sum(dim=1).mean()
    entropy_loss = sample_minimization_weight * sample_entropy - batch_maximization_weight * avg_entropy
    return quantized, indices, quant_loss, (sample_entropy, avg_entropy, entropy_loss)


# --------------------------------------------------------------------------- code entropy (LFQ)


def code_bits_ref(num_bits: int, *, device=None) -> torch.Tensor:
    """``[2^d, d]`` float: the bits of every code, the first bit the most significant (LFQ's order)."""
    codes = torch.arange(2**num_bits, device=device)
    mask = 2 ** torch.arange(num_bits - 1, -1, -1, device=device)
    return ((codes[:, None] & mask) != 0).to(torch.float64)


def clamped_entropy_ref(probs: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """vector-quantize-pytorch's entropy ``-sum(p * log(max(p, eps)))`` over the last axis."""
    return -(probs * probs.clamp_min(eps).log()).sum(dim=-1)


def code_entropy_ref(
    bit_logits: torch.Tensor, eps: float = 1e-5, *, upcast: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """LFQ's entropy terms written the way vector-quantize-pytorch writes them, over all 2^d codes.

    Code ``c`` of ``bit_logits [N, G, d]`` has logit ``sum_b bit_b(c) * l_b`` and probability
    ``softmax`` of those logits over the ``2^d`` codes (equal to the product of the per-bit
    ``sigmoid(+-l_b)``). Returns ``(sample_entropy [N, G], avg_probs [G, 2^d])``: each row's
    :func:`clamped_entropy_ref` and the batch-mean distribution. Builds the ``N x G x 2^d`` matrix.
    """
    dtype = torch.float64 if upcast else bit_logits.dtype
    bits = code_bits_ref(bit_logits.shape[-1], device=bit_logits.device).to(dtype)
    probs = (bit_logits.to(dtype) @ bits.T).softmax(dim=-1)
    return clamped_entropy_ref(probs, eps), probs.mean(dim=0)


def nearest_code_batched_ref(
    z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", *, upcast: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """B independent searches: :func:`nearest_code_ref` of ``z[b] [N, D]`` against ``codebook[b] [K, D]``
    for every ``b``, stacked: ``(indices int64 [B, N], distances float32 [B, N])``."""
    results = [nearest_code_ref(rows, codes, metric, upcast=upcast)[:2] for rows, codes in zip(z, codebook)]
    if not results:
        return z.new_zeros(z.shape[:2], dtype=torch.int64), z.new_zeros(z.shape[:2], dtype=torch.float32)
    return torch.stack([indices for indices, _ in results]), torch.stack([distances for _, distances in results])
RESIDUAL_STRAIGHT_THROUGH = ("final", "per_level", "detached_residual")


def residual_quantize_ref(
    z: torch.Tensor,
    codebooks: torch.Tensor,
    *,
    n_q: Optional[int | torch.Tensor] = None,
    straight_through: str = "final",
    upcast: bool = True,
) -> tuple[torch.Tensor, ...]:
    """Greedy residual quantization (SoundStream's Algorithm 1) with autograd, level by level, the way
    the codec libraries write it: the full ``N x K`` distance matrix per level, argmin, gather, subtract.

    Level ``l`` quantizes the residual ``r_l`` (``r_0 = z``) to its nearest code ``q_l`` of
    ``codebooks[l]``; ``r_{l+1} = r_l - q_l``. Row ``i`` uses its first ``n_q`` levels (``n_q`` an int,
    a tensor ``[N]`` clamped to ``[0, L]``, or ``None`` for all ``L``); later levels get index -1 and
    add nothing. The straight-through variants are written as the libraries write them:

    - ``"final"`` (audiocraft, Moshi): ``r_{l+1} = r_l - sg[q_l]``, ``quantized = z + sg[sum q - z]``;
    - ``"per_level"`` (EnCodec, DAC): each level's output ``r_l + sg[q_l - r_l]``, subtracted undetached;
    - ``"detached_residual"`` (WavTokenizer): the same level output, subtracted detached.

    ``commitment[l] = sum ||r_l - sg[q_l]||^2`` (gradient to ``z`` through ``r_l`` only),
    ``codebook_loss[l] = sum ||sg[r_l] - q_l||^2`` (gradient to ``codebooks`` only), both over the
    rows using level ``l``. Returns ``(indices int64 [N, L], quantized [N, D], commitment [L],
    codebook_loss [L], counts [L, K], sums [L, K, D])``, the last two the per-level statistics of the
    residual each level saw (no gradient); computed in float64 with ``upcast``, else in the promoted dtype
    (the losses and statistics at least in float32).
    """
    if straight_through not in RESIDUAL_STRAIGHT_THROUGH:
        raise ValueError(f"straight_through must be one of {RESIDUAL_STRAIGHT_THROUGH}, got {straight_through!r}")
    num_rows, dim = z.shape
    num_levels, num_codes, _ = codebooks.shape
    promoted = torch.promote_types(z.dtype, codebooks.dtype)
    dtype = torch.float64 if upcast else promoted
    loss_dtype = torch.promote_types(dtype, torch.float32)
    z = z.to(dtype)
    codebooks = codebooks.to(dtype)
    if n_q is None:
        n_q = num_levels
    row_levels = (n_q.to(z.device).clamp(0, num_levels) if isinstance(n_q, torch.Tensor)
                  else torch.full((num_rows,), min(int(n_q), num_levels), device=z.device))
    residual = z
    quantized = torch.zeros_like(z)
    indices = torch.full((num_rows, num_levels), -1, dtype=torch.int64, device=z.device)
    commitment, codebook_loss = [], []
    counts = torch.zeros((num_levels, num_codes), dtype=loss_dtype, device=z.device)
    sums = torch.zeros((num_levels, num_codes, dim), dtype=loss_dtype, device=z.device)
    for level in range(num_levels):
        active = level < row_levels
        with torch.no_grad():
            chosen, _, _ = nearest_code_ref(residual.detach(), codebooks[level], upcast=upcast)
        chosen = torch.where(active, chosen, -1)
        indices[:, level] = chosen
        mask = active[:, None].to(dtype)
        code = codebooks[level][chosen.clamp_min(0)]  # differentiable to the codebook: the codebook loss only
        level_code = code.detach() * mask
        if straight_through == "final":
            level_output = level_code
            next_residual = residual - level_code
        else:
            level_output = (residual + (level_code - residual).detach()) * mask
            next_residual = residual - (level_output if straight_through == "per_level" else level_output.detach())
        commitment.append((((residual - level_code) ** 2) * mask).to(loss_dtype).sum())
        codebook_loss.append((((residual.detach() - code) ** 2) * mask).to(loss_dtype).sum())
        rows = active.nonzero().squeeze(1)
        counts[level].index_add_(0, chosen[rows], torch.ones(rows.shape, dtype=loss_dtype, device=z.device))
        sums[level].index_add_(0, chosen[rows], residual.detach()[rows].to(loss_dtype))
        quantized = quantized + level_output
        residual = next_residual
    if straight_through == "final":
        quantized = z + (quantized - z).detach()
    return (indices, quantized.to(promoted), torch.stack(commitment), torch.stack(codebook_loss), counts, sums)
SINKHORN_METRICS = ("l2", "euclidean", "cosine", "dot")
SINKHORN_NORMALIZATIONS = (None, "minmax", "standardize")
SINKHORN_ORDERS = ("rows_first", "columns_first")


def sinkhorn_cost_ref(
    z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", normalize: Optional[str] = None, *, upcast: bool = True
) -> torch.Tensor:
    """The ``N x K`` cost Sinkhorn assignment works on: the metric's distance (``euclidean`` is the square
    root of ``l2``, as ``torch.cdist`` computes it), then normalised over the whole matrix (NaN entries
    left out of the statistics):

    - ``"minmax"`` (LC-Rec's ``center_distance_for_constraint``): ``(C - m) / (max C - m + 1e-5)`` with
      ``m = (max C + min C) / 2``, so the cost lies in ``[-1, 1]``;
    - ``"standardize"`` (OptVQ's ``normalize(mode="all")``): ``A = (C - mean C) / (std C + 1e-6)`` with the
      unbiased standard deviation, then ``A - min A``.
    """
    if metric == "euclidean":
        cost = distance_matrix_ref(z, codebook, "l2", upcast=upcast).sqrt()
    else:
        cost = distance_matrix_ref(z, codebook, metric, upcast=upcast)
    finite = cost[~cost.isnan()]
    if normalize is None or finite.numel() == 0:
        return cost
    if normalize == "minmax":
        middle = (finite.max() + finite.min()) / 2
        amplitude = finite.max() - middle + 1e-5
        return (cost - middle) / amplitude
    if normalize == "standardize":
        spread = finite.std() + 1e-6
        return (cost - finite.mean()) / spread - (finite.min() - finite.mean()) / spread
    raise ValueError(f"normalize must be one of {SINKHORN_NORMALIZATIONS}, got {normalize!r}")


def _no_nan(values: torch.Tensor) -> torch.Tensor:
    """NaN entries as ``-inf``: they carry no mass in a log-sum-exp and never win an argmax."""
    return torch.where(values.isnan(), -math.inf, values)


def _potential_ref(log_mass: float, lse: torch.Tensor) -> torch.Tensor:
    """``log_mass - lse``, and ``-inf`` where nothing is reachable (a row or code whose every cost is NaN)."""
    return torch.where(lse == -math.inf, -math.inf, log_mass - lse)


def sinkhorn_assign_ref(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    epsilon: float,
    iters: int,
    metric: str = "l2",
    normalize: Optional[str] = None,
    order: str = "rows_first",
    sum_eps: float = 0.0,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Balanced assignment by the textbook log-domain Sinkhorn iteration on the full ``N x K`` plan.

    With logits ``L = -C / epsilon`` (``C`` from :func:`sinkhorn_cost_ref`), uniform marginals ``a = 1/N``
    and ``b = 1/K``, and the potentials started at zero, each iteration is a row update
    ``f_i = log a - logsumexp_k(L_ik + g_k)`` then a column update ``g_k = log b - logsumexp_i(L_ik + f_i)``
    (``order="columns_first"``: the column update first, as OptVQ's ``sinkhorn`` does). The plan is
    ``exp(f_i + L_ik + g_k)``; a row's assignment is its argmax, i.e. ``argmax_k (L_ik + g_k)`` (ties to the
    lowest index; NaN entries carry no mass and never win; a row of NaN gets index 0). A row or code with
    no finite entry gets potential ``-inf``. ``sum_eps > 0`` is OptVQ's exp-domain iteration as it is written,
    in log space: the plan ``exp(L) / (sum exp(L) + sum_eps)`` at the start, then each row and column divided
    by its sum plus ``sum_eps`` and scaled to its marginal.

    Returns ``(indices int64 [N], f [N], g [K])``, the potentials in float64 with ``upcast`` (else float32).
    """
    cost = sinkhorn_cost_ref(z, codebook, metric, normalize, upcast=upcast)
    work = torch.float64 if upcast else torch.float32
    logits = _no_nan((-cost / epsilon).to(work))
    num_rows, num_codes = logits.shape
    f = torch.zeros(num_rows, dtype=work, device=logits.device)
    g = torch.zeros(num_codes, dtype=work, device=logits.device)
    log_a, log_b = -math.log(max(num_rows, 1)), -math.log(num_codes)
    if sum_eps > 0:
        # The plan exp(f + L + g) starts as exp(L) / (sum exp(L) + sum_eps): a constant f.
        f = f - torch.logaddexp(torch.logsumexp(logits.flatten(), 0), torch.tensor(math.log(sum_eps), dtype=work))

    def update(previous, lse, log_mass):
        if sum_eps > 0:  # divide the current sums by (sum + sum_eps), then scale to the marginal
            return previous - torch.logaddexp(previous + lse, torch.full_like(lse, math.log(sum_eps))) + log_mass
        return _potential_ref(log_mass, lse)

    for _ in range(iters):
        if order == "rows_first":
            f = update(f, torch.logsumexp(_no_nan(logits + g[None, :]), dim=1), log_a)
            g = update(g, torch.logsumexp(_no_nan(logits + f[:, None]), dim=0), log_b)
        else:
            g = update(g, torch.logsumexp(_no_nan(logits + f[:, None]), dim=0), log_b)
            f = update(f, torch.logsumexp(_no_nan(logits + g[None, :]), dim=1), log_a)
    # argmax takes the first maximum, so a row of -inf gets index 0.
    scores = _no_nan(logits + g[None, :])
    indices = scores.argmax(dim=1) if num_codes and num_rows else torch.zeros(num_rows, dtype=torch.int64)
    return indices.to(torch.int64), f, g


def soft_quantize_entropy_ref(
    z: torch.Tensor,
    codebook: torch.Tensor,
    metric: str = "dot",
    temperature: float = 1.0,
    entropy_temperature: float = 1.0,
    *,
    values: Optional[torch.Tensor] = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(soft, indices, row_entropy, mean_probs)``: ``soft_quantize_ref``'s soft codes and hard choice at
    ``temperature`` and ``soft_entropy_ref``'s entropies at ``entropy_temperature``, of the same logits."""
    soft, indices, _ = soft_quantize_ref(z, codebook, metric, temperature, values=values, upcast=upcast)
    row_entropy, mean_probs = soft_entropy_ref(z, codebook, metric, entropy_temperature, upcast=upcast)
    return soft, indices, row_entropy, mean_probs
