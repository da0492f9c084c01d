"""The soft-assignment ops' prepared codebook (keys, values, per-code terms), the chain rule from the
prepared tensors back to the caller's, and the fused soft codes + entropies composed from a backend's two
ops; shared by every backend (the PyTorch path, the Triton launcher, the C++ binding)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .common import NORM_EPS, compute_dtype

SOFT_METRICS = ("l2", "cosine", "dot", "euclidean")
# vector-quantize-pytorch's cdist clamps the squared distance here before its square root; the
# "euclidean" logits do the same, so a row sitting on a code has a finite gradient (zero).
EUCLIDEAN_EPS = 1e-8


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
        # No copy of the codebook is made where none is needed: the keys are the codebook itself for
        # dot (in the work dtype, every code finite), the values are the given tensor; a large
        # codebook (IBQ's 2^18 codes: 256 MiB) must not be held several times over.
        keys = codebook.to(self.work_dtype)
        finite = _finite_rows(keys)
        self.all_finite = bool(finite.all())
        self.key_norms: Optional[torch.Tensor] = None
        self.center: Optional[torch.Tensor] = None
        if metric in ("l2", "euclidean"):
            finite_keys = keys if self.all_finite else torch.where(finite[:, None], keys, 0)
            self.center = finite_keys.sum(dim=0) / finite.sum().clamp_min(1)
            keys = keys - self.center
        elif metric == "cosine":
            self.key_norms = keys.norm(dim=1, keepdim=True)
            keys = keys / self.key_norms.clamp_min(NORM_EPS)
        if not self.all_finite:
            keys = torch.where(finite[:, None], keys, 0)
        if metric in ("l2", "euclidean"):
            code_term = _row_squares(keys)
        else:
            code_term = torch.zeros(keys.shape[0], dtype=self.work_dtype, device=keys.device)
        self.keys = keys
        self.code_term = code_term if self.all_finite else torch.where(finite, code_term, float("inf"))
        self._finite = finite
        self._value_source = codebook if values is None else values
        self._values: Optional[torch.Tensor] = None

    @property
    def values(self) -> torch.Tensor:
        """The values ``[K, Dv]`` in the work dtype, an excluded code's row zeroed; made on first use
        (the entropies never use them) and a copy only where the dtype or an excluded code needs one."""
        if self._values is None:
            source = self._value_source.to(self.work_dtype)
            self._values = source if self.all_finite else torch.where(self._finite[:, None], source, 0)
        return self._values

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
        ``code_sums = w.sum(0)``: ``w^T @ zq``, or ``2 (w^T @ zq - kq * colsum)`` for l2 and euclidean,
        computed in place in ``weighted_rows`` (a codebook-sized buffer the caller no longer needs)."""
        if code_sums is None:
            return weighted_rows
        return weighted_rows.sub_(self.keys * code_sums[:, None]).mul_(2.0)

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


    def chained_grads(
        self,
        z: torch.Tensor,
        codebook: torch.Tensor,
        zq: torch.Tensor,
        weighted_keys: torch.Tensor,
        row_sums: Optional[torch.Tensor],
        weighted_rows: torch.Tensor,
        code_sums: Optional[torch.Tensor],
        compute_z_grad: bool,
        compute_codebook_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(grad_z, grad_codebook)`` from a backward's sums of the per-logit weight ``w`` (``w @ kq``,
        ``w`` per row, ``w^T @ zq``, ``w`` per code; see :meth:`prepared_row_grad`): every backend's last
        step. The row and code sums only enter for l2 and euclidean; a gradient not asked for is returned
        as given (empty)."""
        if self.metric not in ("l2", "euclidean"):
            row_sums = code_sums = None
        grad_z, grad_codebook = weighted_keys, weighted_rows
        if compute_z_grad:
            grad_z = self.row_grad(z, self.prepared_row_grad(zq, weighted_keys, row_sums))
        if compute_codebook_grad:
            grad_codebook = self.key_grad(codebook, self.prepared_key_grad(weighted_rows, code_sums))
        return grad_z, grad_codebook


def split_value_grad(
    values: Optional[torch.Tensor], grad_codebook: torch.Tensor, grad_values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_codebook, grad_values)`` as the soft-quantize backward returns them: without separate
    ``values`` the codebook is also the values, so it takes their gradient and ``grad_values`` is empty."""
    if values is None:
        return grad_codebook.add_(grad_values), grad_values[:0]
    return grad_codebook, grad_values


# Codes per block of the per-code reductions below: their temporaries stay a few MiB, not codebook-sized.
_CODES_PER_BLOCK = 4096


def _finite_rows(keys: torch.Tensor) -> torch.Tensor:
    """``keys.isfinite().all(dim=1)``, a block of codes at a time."""
    if keys.shape[0] == 0:
        return torch.ones(0, dtype=torch.bool, device=keys.device)
    return torch.cat([block.isfinite().all(dim=1) for block in keys.split(_CODES_PER_BLOCK)])


def _row_squares(keys: torch.Tensor) -> torch.Tensor:
    """``(keys * keys).sum(dim=1)``, a block of codes at a time (the same sums: each row is reduced alone)."""
    if keys.shape[0] == 0:
        return keys.new_zeros(0)
    return torch.cat([(block * block).sum(dim=1) for block in keys.split(_CODES_PER_BLOCK)])


def _normalize_backward(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of ``x / max(|x|, NORM_EPS)`` row-wise: ``(g - u (u . g)) / |x|`` with ``u`` the
    normalised row, and ``g / NORM_EPS`` for a row shorter than the floor."""
    norms = x.norm(dim=1, keepdim=True)
    floored = norms.clamp_min(NORM_EPS)
    unit = x / floored
    projected = grad - unit * (unit * grad).sum(dim=1, keepdim=True)
    return torch.where(norms > NORM_EPS, projected, grad) / floored


def composed_soft_quantize_entropy(
    soft_quantize: Callable, soft_entropy: Callable, z: torch.Tensor, codebook: torch.Tensor,
    values: Optional[torch.Tensor], metric: str, temperature: float, entropy_temperature: float,
) -> tuple[torch.Tensor, ...]:
    """The fused op's forward, ``(soft, indices, lse, row_entropy, mean_probs, entropy_lse)``, from a
    backend's ``soft_quantize`` and ``soft_entropy``: each streams the codebook itself (the backends
    that do not fuse the two softmaxes of one logit tile)."""
    soft, indices, lse = soft_quantize(z, codebook, values, metric, temperature, None, True)
    row_entropy, mean_probs, entropy_lse = soft_entropy(z, codebook, metric, entropy_temperature)
    return soft, indices, lse, row_entropy, mean_probs, entropy_lse


def composed_soft_quantize_entropy_backward(
    soft_quantize_backward: Callable, soft_entropy_backward: Callable, grad_soft: torch.Tensor,
    grad_row_entropy: torch.Tensor, grad_mean_probs: torch.Tensor, z: torch.Tensor, codebook: torch.Tensor,
    values: Optional[torch.Tensor], soft: torch.Tensor, lse: torch.Tensor, row_entropy: torch.Tensor,
    entropy_lse: torch.Tensor, metric: str, temperature: float, entropy_temperature: float, compute_z_grad: bool,
    compute_codebook_grad: bool, compute_values_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused op's backward from a backend's two backwards: their gradients added (the log-sum-exps
    are not outputs of the fused op, so their gradients are zero)."""
    grad_z, grad_codebook, grad_values = soft_quantize_backward(
        grad_soft, torch.zeros_like(lse), z, codebook, values, soft, lse, metric, temperature, compute_z_grad,
        compute_codebook_grad, compute_values_grad,
    )
    if not (compute_z_grad or compute_codebook_grad):
        return grad_z, grad_codebook, grad_values
    entropy_z, entropy_codebook = soft_entropy_backward(
        grad_row_entropy, grad_mean_probs, torch.zeros_like(entropy_lse), z, codebook, row_entropy, entropy_lse,
        metric, entropy_temperature, compute_z_grad, compute_codebook_grad,
    )
    if compute_z_grad:
        grad_z = grad_z + entropy_z.to(grad_z.dtype)
    if compute_codebook_grad:
        grad_codebook = grad_codebook + entropy_codebook.to(grad_codebook.dtype)
    return grad_z, grad_codebook, grad_values
