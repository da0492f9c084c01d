"""PixelCNN priors over VQ code maps: ``PixelCNN`` and ``GatedPixelCNN``, with two samplers.

Both models take a code map ``[B, H, W]`` (int64 in ``[0, num_codes)``), embed it, run masked
convolutions and return logits ``[B, num_codes, H, W]`` whose value at ``(i, j)`` depends only on
the codes before ``(i, j)`` in raster order. Either model can be conditioned on a class label
(``num_classes``) or on a spatial code map such as VQ-VAE-2's top-level codes (``cond_num_codes``;
the map is embedded and resized to ``H x W`` by nearest-neighbour interpolation).

``sample`` draws code maps position by position. ``method="naive"`` reruns the whole network on
the whole map for every position. ``method="fast"`` (the default) keeps every layer's activations
in a cache and, per position, computes only what the new code can change. What depends on finished
rows only (PixelCNN's kernel rows above the centre, Gated PixelCNN's whole vertical stack and its
link into the horizontal one, the biases and the conditioning) is computed once per row for the
whole row; a step then computes each layer's one new output position from its kept taps in the
current row, as a matmul with the packed unmasked weights on cached buffers (no masked convolution
op per position: its checks and dispatch cost more than one position's arithmetic). Both
samplers consume the generator identically (one uniform number per sample and position) and draw
by inverse CDF, so they return the same maps: the cached logits equal the full ones up to float
rounding, and wherever that rounding could change a draw (the uniform number within a bound of a
category boundary that the rounding could cross, or a near-tie at the top-k threshold or the argmax)
the fast sampler recomputes that position with a full forward pass, exactly as the naive one does.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.masked_conv import GatedMaskedConv2d, MaskedConv2d
from ._common import check_positive_int

__all__ = ["PixelCNN", "GatedPixelCNN"]

SAMPLE_METHODS = ("fast", "naive")
# The cached and the full logits differ by float rounding only: measured at most 3.5 (PixelCNN) and
# 1.4 (Gated) units of the dtype's epsilon times (1 + max |logit|) for 12-layer, 64-channel models
# at 32 x 32. A draw is re-checked with a full pass when that difference, bounded ten times more
# generously, could move it across a boundary.
_ROUNDING_ULPS = 32


def _check_odd(name: str, value: object) -> int:
    check_positive_int(name, value)
    if value % 2 == 0:  # type: ignore[operator]
        raise ValueError(f"{name} must be odd, got {value!r}")
    return value  # type: ignore[return-value]


def _draw(
    logits: Tensor, uniform: Tensor, temperature: float, top_k: Optional[int], ulps: float
) -> tuple[Tensor, Tensor]:
    """Draws one code per row of ``logits [n, K]`` from ``uniform [n]`` (float64 in ``[0, 1)``).

    Returns ``(codes int64 [n], ambiguous bool [n])``: ``ambiguous`` marks rows whose draw could
    change if each logit moved by up to ``s = ulps * eps(dtype) * (1 + max |logit|)``. A gap between
    two logits moves by at most ``2 s``. A normalised CDF entry ``c = A / (A + B)`` (``A``, ``B`` the
    probability mass up to and after it) moves by at most ``c (1 - c) (exp(2 s / temperature) - 1)``,
    since ``A`` and ``B`` each move by a factor within ``exp(+-s / temperature)``: at most about a
    quarter of ``2 s / temperature`` (at ``c = 1/2``) and far less at the tails, where most
    boundaries of a peaked distribution lie. The float64 CDFs themselves differ by at most ``K``
    roundings, which the band also covers.
    """
    slack = ulps * torch.finfo(logits.dtype).eps * (1 + logits.abs().amax(dim=1).double())
    logits = logits.double()
    num_codes = logits.shape[1]
    ambiguous = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    if top_k is not None and top_k < num_codes:
        top = logits.topk(top_k + 1, dim=1).values
        threshold, runner_up = top[:, top_k - 1], top[:, top_k]
        ambiguous |= threshold - runner_up <= 2 * slack
        logits = logits.masked_fill(logits < threshold[:, None], float("-inf"))
    if temperature == 0:
        if num_codes > 1:
            best, second = logits.topk(2, dim=1).values.unbind(1)
            ambiguous |= best - second <= 2 * slack
        return logits.argmax(dim=1), ambiguous
    cdf = torch.softmax(logits / temperature, dim=1).cumsum(dim=1)
    total = cdf[:, -1]
    target = uniform * total
    codes = (cdf <= target[:, None]).sum(dim=1).clamp_max(num_codes - 1)
    upper = cdf.gather(1, codes[:, None]).squeeze(1)
    lower = torch.where(codes > 0, cdf.gather(1, (codes - 1).clamp_min(0)[:, None]).squeeze(1), 0.0)
    spread = torch.expm1(2 * slack / temperature)
    cdf_rounding = 4 * num_codes * torch.finfo(torch.float64).eps * total

    def band(entry: Tensor) -> Tensor:  # how far a CDF entry can move, in the units of ``cdf``
        return entry * (total - entry) / total * spread + cdf_rounding

    ambiguous |= (upper - target <= band(upper)) | ((codes > 0) & (target - lower <= band(lower)))
    return codes, ambiguous


class _CodePrior(nn.Module):
    """What both priors share: the code and condition embeddings, input checks and the samplers."""

    def __init__(
        self,
        num_codes: int,
        channels: int,
        num_classes: Optional[int],
        cond_num_codes: Optional[int],
        cond_channels: Optional[int],
    ):
        super().__init__()
        check_positive_int("num_codes", num_codes)
        check_positive_int("channels", channels)
        if num_classes is not None and cond_num_codes is not None:
            raise ValueError("condition on a class (num_classes) or on a code map (cond_num_codes), not both")
        if num_classes is not None:
            check_positive_int("num_classes", num_classes)
        if cond_num_codes is not None:
            check_positive_int("cond_num_codes", cond_num_codes)
            cond_channels = check_positive_int("cond_channels", channels if cond_channels is None else cond_channels)
        elif cond_channels is not None:
            raise ValueError("cond_channels needs cond_num_codes")
        self.num_codes = num_codes
        self.channels = channels
        self.num_classes = num_classes
        self.cond_num_codes = cond_num_codes
        self.cond_channels = cond_channels
        self.embedding = nn.Embedding(num_codes, channels)
        self.cond_embedding = nn.Embedding(cond_num_codes, cond_channels) if cond_num_codes else None

    # -- inputs

    def _check_codes(self, codes: object) -> Tensor:
        if not isinstance(codes, Tensor) or codes.dtype not in (torch.int64, torch.int32) or codes.dim() != 3:
            shape = (f"{codes.dtype} tensor of shape {tuple(codes.shape)}" if isinstance(codes, Tensor)
                     else type(codes).__name__)
            raise ValueError(f"codes must be an int64 [B, H, W] code map, got {shape}")
        return codes

    def _condition(
        self, cond: object, batch: int, height: int, width: int
    ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """``(labels [B] or None, cond_map [B, cond_channels, H, W] or None)`` from ``cond``."""
        if self.num_classes is None and self.cond_num_codes is None:
            if cond is not None:
                raise ValueError(f"{type(self).__name__} was built without conditioning, but cond was given")
            return None, None
        if self.num_classes is not None:
            if (not isinstance(cond, Tensor) or cond.dtype not in (torch.int64, torch.int32)
                    or tuple(cond.shape) != (batch,)):
                shape = tuple(cond.shape) if isinstance(cond, Tensor) else cond
                raise ValueError(f"cond must be int64 class labels of shape ({batch},), got {shape}")
            return cond, None
        if (not isinstance(cond, Tensor) or cond.dtype not in (torch.int64, torch.int32)
                or cond.dim() != 3 or cond.shape[0] != batch):
            shape = tuple(cond.shape) if isinstance(cond, Tensor) else cond
            raise ValueError(f"cond must be an int64 code map [{batch}, H_cond, W_cond], got {shape}")
        cond_map = self.cond_embedding(cond).permute(0, 3, 1, 2)
        if tuple(cond_map.shape[2:]) != (height, width):
            cond_map = F.interpolate(cond_map, size=(height, width), mode="nearest")
        return None, cond_map

    def _embed(self, codes: Tensor) -> Tensor:
        return self.embedding(codes).permute(0, 3, 1, 2)

    # -- sampling

    @torch.no_grad()
    def sample(
        self,
        n: int,
        shape: Sequence[int],
        cond: Optional[Tensor] = None,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        *,
        method: str = "fast",
    ) -> Tensor:
        """Draws ``n`` code maps of size ``shape = (H, W)`` in raster order.

        Args:
            n: number of maps, ``>= 0``.
            shape: ``(H, W)``, each ``>= 1``.
            cond: class labels int64 ``[n]`` (``num_classes``) or a code map int64
                ``[n, H_cond, W_cond]`` (``cond_num_codes``); ``None`` for an unconditional model.
            temperature: logits are divided by it; ``0`` takes the most likely code (greedy).
            top_k: draw among the ``top_k`` most likely codes only (ties at the threshold kept).
            generator: a ``torch.Generator`` on the model's device; ``None`` uses the global RNG.
            method: ``"fast"`` (cached, recomputes only what each new code changes) or
                ``"naive"`` (the whole network per position). Both return the same maps for the
                same generator state.

        Returns:
            int64 ``[n, H, W]`` on the model's device. Each position takes one
            ``torch.rand(n, generator=generator, dtype=torch.float64)`` draw, also when greedy.
            After a fast sample, ``self.last_sample_rechecks`` says at how many positions a draw
            came so close to a decision boundary that it was re-made from a full forward pass.

        Raises:
            ValueError: a bad ``n``, ``shape``, ``cond``, ``temperature``, ``top_k``, ``method``
                or a generator on another device.
        """
        height, width = self._check_sample_args(n, shape, temperature, top_k, generator, method)
        device = self.embedding.weight.device
        codes = torch.zeros((n, height, width), dtype=torch.int64, device=device)
        if n == 0:
            return codes
        labels, cond_map = self._condition(cond, n, height, width)
        stepper = self._stepper(n, height, width, labels, cond_map) if method == "fast" else None
        for i in range(height):
            if stepper is not None:
                stepper.begin_row(i)
            for j in range(width):
                uniform = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
                if stepper is None:
                    drawn, _ = _draw(self(codes, cond)[:, :, i, j], uniform, temperature, top_k, _ROUNDING_ULPS)
                else:
                    drawn, ambiguous = _draw(stepper.logits(i, j), uniform, temperature, top_k, _ROUNDING_ULPS)
                    if ambiguous.any():
                        stepper.rechecked += 1
                        drawn, _ = _draw(self(codes, cond)[:, :, i, j], uniform, temperature, top_k, _ROUNDING_ULPS)
                    stepper.commit(i, j, drawn)
                codes[:, i, j] = drawn
        self.last_sample_rechecks = 0 if stepper is None else stepper.rechecked
        return codes

    def _check_sample_args(self, n, shape, temperature, top_k, generator, method) -> tuple[int, int]:
        check_positive_int("n", n, minimum=0)
        if (not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2
                or not all(isinstance(size, int) and not isinstance(size, bool) and size >= 1 for size in shape)):
            raise ValueError(f"shape must be (H, W) with ints >= 1, got {shape!r}")
        height, width = shape
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite float >= 0, got {temperature!r}")
        if top_k is not None and (
            not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= self.num_codes
        ):
            raise ValueError(f"top_k must be None or an int in [1, {self.num_codes}], got {top_k!r}")
        if method not in SAMPLE_METHODS:
            raise ValueError(f"method must be one of {SAMPLE_METHODS}, got {method!r}")
        device = self.embedding.weight.device
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            if generator.device.type != device.type:
                raise ValueError(f"generator is on {generator.device} but the model is on {device}")
        return height, width


def _crop(cond: Optional[Tensor], row: int) -> Optional[Tensor]:
    """The conditioning term at one row; constant terms as they are."""
    if cond is None or cond.shape[2:] == (1, 1):
        return cond
    return cond[:, :, row : row + 1, :]


def _matrix(conv: nn.Conv2d) -> Tensor:
    """A 1 x 1 convolution's weight as a ``[in, out]`` matrix, for ``x [n, in] @ matrix``."""
    return conv.weight[:, :, 0, 0].t().contiguous()


def _bias(conv: nn.Conv2d) -> Tensor:
    return conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.weight.shape[0])


def _matrix_with_bias(conv: nn.Conv2d) -> Tensor:
    """``[in + 1, out]``: the ``1 x 1`` weight matrix with the bias as its last row, for inputs
    that end in a constant 1."""
    return torch.cat([_matrix(conv), _bias(conv)[None]])


def _row_term(cond: Optional[Tensor], row: int) -> Optional[Tensor]:
    """The conditioning term at one row, channels last: ``[n, W or 1, channels]``."""
    return None if cond is None else _crop(cond, row)[:, :, 0, :].transpose(1, 2)


def _gate_last(x: Tensor) -> Tensor:
    """``gate`` over the last dimension: ``tanh(a) * sigmoid(b)`` of its two halves."""
    a, b = x.chunk(2, dim=-1)
    return torch.tanh(a) * torch.sigmoid(b)


# --------------------------------------------------------------------------- PixelCNN


class _PixelCNNLayer(nn.Module):
    """Type A: ``conv_A(x) + c``. Type B (residual): ``x + W_o relu(conv_B(relu(x)) + c)``."""

    def __init__(self, channels: int, kernel_size: int, mask_type: str, num_classes, cond_channels):
        super().__init__()
        self.mask_type = mask_type
        self.kernel_size = kernel_size
        self.conv = MaskedConv2d(mask_type, channels, channels, kernel_size, padding=kernel_size // 2)
        self.out = MaskedConv2d("B", channels, channels, 1) if mask_type == "B" else None
        self.class_embedding = nn.Embedding(num_classes, channels) if num_classes else None
        self.cond = MaskedConv2d("B", cond_channels, channels, 1, bias=False) if cond_channels else None

    def conditioning(self, labels: Optional[Tensor], cond_map: Optional[Tensor]) -> Optional[Tensor]:
        if self.class_embedding is not None:
            return self.class_embedding(labels)[:, :, None, None]
        if self.cond is not None:
            return self.cond(cond_map)
        return None

    def forward(self, x: Tensor, cond: Optional[Tensor], *, padding: Optional[int] = None) -> Tensor:
        """With ``padding=0``, ``x`` is a crop and the output covers the positions whose whole
        window lies inside it (the residual comes from the crop's centre)."""
        y = self.conv(x if self.out is None else F.relu(x), padding=padding)
        if cond is not None:
            y = y + cond
        if self.out is None:
            return y
        y = self.out(F.relu(y))
        top, left = (x.shape[2] - y.shape[2]) // 2, (x.shape[3] - y.shape[3]) // 2
        return x[:, :, top : top + y.shape[2], left : left + y.shape[3]] + y


class PixelCNN(_CodePrior):
    """PixelCNN (van den Oord et al. 2016a) over a map of discrete codes.

    ``embedding -> MaskedConv2d("A", first_kernel_size) -> (num_layers - 1) residual blocks
    [ReLU, MaskedConv2d("B", kernel_size), ReLU, 1 x 1] -> ReLU, 1 x 1, ReLU, 1 x 1 -> logits``,
    with the conditioning (when asked for) added after every masked convolution. Stacked type-B
    masks leave PixelCNN's known blind spot above-right of each position; ``GatedPixelCNN``
    removes it.

    Args:
        num_codes: ``K``, the codebook size: codes in, ``K`` logits out.
        channels: width of every layer.
        num_layers: masked convolutions, the type-A one included (``>= 1``).
        kernel_size, first_kernel_size: odd kernel sizes of the type-B and the type-A layers.
        head_channels: width of the hidden 1 x 1 layer of the output head (default ``channels``).
        num_classes: condition on a class label ``cond`` int64 ``[B]``.
        cond_num_codes: condition on a code map ``cond`` int64 ``[B, H_cond, W_cond]`` (e.g. VQ-VAE-2's
            top codes), embedded in ``cond_channels`` (default ``channels``) and resized to ``H x W``.

    ``forward(codes [B, H, W] int64, cond=None)`` returns logits ``[B, K, H, W]`` in the
    parameters' dtype. ``sample(...)`` draws code maps (see ``_CodePrior.sample``).

    Raises:
        ValueError: bad sizes, both kinds of conditioning, codes or ``cond`` of the wrong shape.
    """

    def __init__(
        self,
        num_codes: int,
        channels: int = 64,
        num_layers: int = 8,
        kernel_size: int = 3,
        first_kernel_size: int = 7,
        head_channels: Optional[int] = None,
        *,
        num_classes: Optional[int] = None,
        cond_num_codes: Optional[int] = None,
        cond_channels: Optional[int] = None,
    ):
        super().__init__(num_codes, channels, num_classes, cond_num_codes, cond_channels)
        check_positive_int("num_layers", num_layers)
        _check_odd("kernel_size", kernel_size)
        _check_odd("first_kernel_size", first_kernel_size)
        head_channels = check_positive_int("head_channels", channels if head_channels is None else head_channels)
        self.layers = nn.ModuleList(
            _PixelCNNLayer(channels, first_kernel_size if index == 0 else kernel_size, "A" if index == 0 else "B",
                           num_classes, self.cond_channels)
            for index in range(num_layers)
        )
        self.head_hidden = MaskedConv2d("B", channels, head_channels, 1)
        self.head_out = MaskedConv2d("B", head_channels, num_codes, 1)

    def head(self, x: Tensor) -> Tensor:
        return self.head_out(F.relu(self.head_hidden(F.relu(x))))

    def forward(self, codes: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        codes = self._check_codes(codes)
        batch, height, width = codes.shape
        labels, cond_map = self._condition(cond, batch, height, width)
        x = self._embed(codes)
        for layer in self.layers:
            x = layer(x, layer.conditioning(labels, cond_map))
        return self.head(x)

    def _stepper(self, n, height, width, labels, cond_map) -> "_PixelCNNStepper":
        return _PixelCNNStepper(self, n, height, width, labels, cond_map)


class _PixelCNNStepper:
    """The fast sampler's state for ``PixelCNN``: a step costs one position's worth of work.

    A ``k x k`` type-A or type-B mask keeps the ``k // 2`` rows above the centre whole and, in the
    centre row, the taps left of (A) or up to (B) the centre. When row ``i`` begins, every layer's
    rows above are final, so their part of the convolution at every position of the row (with the
    bias and the conditioning) is computed by one convolution per layer into ``above[l]``
    ``[n, W, C]``. A step then costs, per layer, one matmul of the packed kept centre-row taps
    ``[n, taps * C]`` with the packed weight ``[taps * C, C]`` onto ``above[l]``, a ReLU and the
    ``1 x 1`` output onto the residual, then the head: four plain ATen ops per layer on buffers
    and views made once.

    ``rows[l]`` ``[n, k // 2 + W, C]`` (channels last) holds the current row of layer ``l``'s
    convolution input (the embedded codes for the first layer, ``relu(x)`` for the others) behind
    ``k // 2`` zero columns; ``maps[l]`` ``[n, C, k // 2 + H, k // 2 + W + k // 2]`` its finished
    rows behind zero rows on top and zero columns each side. Columns right of ``j`` hold stale
    values, which no mask reads. ``hidden`` ``[n, C + 1]`` ends in a constant 1 so that the
    ``1 x 1`` output's bias (the last row of its packed weight) is added inside the matmul.
    """

    def __init__(self, model: PixelCNN, n: int, height: int, width: int, labels, cond_map):
        self.model = model
        self.rechecked = 0
        channels = model.channels
        weight = model.embedding.weight
        self.embedding = weight
        layers = model.layers
        self.conds = [layer.conditioning(labels, cond_map) for layer in layers]
        self.pads = [layer.kernel_size // 2 for layer in layers]
        self.maps = [weight.new_zeros((n, channels, height + pad, width + 2 * pad)) for pad in self.pads]
        self.rows = [weight.new_zeros((n, pad + width, channels)) for pad in self.pads]
        self.above = [weight.new_zeros((n, width, channels)) for _ in layers]
        self.top_weights = [layer.conv.weight[:, :, :pad, :].contiguous() for layer, pad in zip(layers, self.pads)]
        self.biases = [_bias(layer.conv) for layer in layers]
        self.centre_weights = []
        for layer, pad in zip(layers, self.pads):
            taps = pad + 1 if layer.mask_type == "B" else pad
            kept = layer.conv.weight[:, :, pad, :taps]  # [C, C, taps]
            self.centre_weights.append(kept.permute(2, 1, 0).reshape(taps * channels, channels).contiguous())
        self.out_weights = [None if layer.out is None else _matrix_with_bias(layer.out) for layer in layers]
        self.head = [(_matrix(conv), _bias(conv)) for conv in (model.head_hidden, model.head_out)]
        # Per-step scratch and views, made once: every layer's output x, the pre-activation, and
        # its ReLU followed by the constant 1.
        self.outputs = [weight.new_zeros((n, channels)) for _ in layers]
        self.pre = weight.new_zeros((n, channels))
        self.hidden = weight.new_ones((n, channels + 1))
        self.hidden_relu = self.hidden[:, :channels]
        self.steps = []  # steps[j][l]: the views layer l reads and writes at column j
        for j in range(width):
            self.steps.append([
                (self.rows[index][:, pad + j, :],
                 self.rows[index][:, j : j + self.centre_weights[index].shape[0] // channels, :].reshape(n, -1),
                 self.above[index][:, j, :])
                for index, pad in enumerate(self.pads)
            ])

    def begin_row(self, i: int) -> None:
        for index, pad in enumerate(self.pads):
            maps, width = self.maps[index], self.above[index].shape[1]
            if i > 0:  # the finished row joins the map the next rows read
                maps[:, :, i - 1 + pad, pad : pad + width] = self.rows[index][:, pad:, :].transpose(1, 2)
            if pad > 0:
                # Padded rows i .. i + pad - 1 hold rows i - pad .. i - 1: the kernel's rows above the centre.
                term = F.conv2d(maps[:, :, i : i + pad, :], self.top_weights[index], self.biases[index])
                term = term[:, :, 0, :].transpose(1, 2)
            else:
                term = self.biases[index]
            if self.conds[index] is not None:
                term = term + _row_term(self.conds[index], i)
            self.above[index].copy_(term.expand_as(self.above[index]))

    def logits(self, i: int, j: int) -> Tensor:
        x = None
        for (centre, taps, above), weight, out_weight, output in zip(
            self.steps[j], self.centre_weights, self.out_weights, self.outputs
        ):
            if out_weight is None:  # type A: conv_A(embedded codes) + c
                x = torch.addmm(above, taps, weight, out=output)
                continue
            # type B: x + W_o relu(conv_B(relu(x)) + c) + b_o, its input's centre written first
            torch.clamp_min(x, 0, out=centre)  # ReLU, into the buffer (torch.relu has no out=)
            torch.addmm(above, taps, weight, out=self.pre)
            torch.clamp_min(self.pre, 0, out=self.hidden_relu)
            x = torch.addmm(x, self.hidden, out_weight, out=output)
        (hidden_weight, hidden_bias), (out_weight, out_bias) = self.head
        return torch.addmm(out_bias, torch.addmm(hidden_bias, x.relu(), hidden_weight).relu_(), out_weight)

    def commit(self, i: int, j: int, codes: Tensor) -> None:
        self.rows[0][:, self.pads[0] + j, :] = self.embedding[codes]


# --------------------------------------------------------------------------- GatedPixelCNN


class GatedPixelCNN(_CodePrior):
    """Gated PixelCNN (van den Oord et al. 2016b) over a map of discrete codes.

    ``embedding -> num_layers x GatedMaskedConv2d`` (the first type A with ``first_kernel_size``
    and no residual, the rest type B with ``kernel_size``), the layers' skip outputs summed
    ``-> ReLU, 1 x 1, ReLU, 1 x 1 -> logits``. Vertical and horizontal stacks remove PixelCNN's
    blind spot: the logits at ``(i, j)`` see every earlier position within the receptive field.

    Args: as ``PixelCNN`` (``num_layers`` counts gated layers); the conditioning goes into every
    gated layer (``GatedMaskedConv2d``'s ``num_classes`` / ``cond_channels``).

    ``forward(codes [B, H, W] int64, cond=None)`` returns logits ``[B, K, H, W]``.
    """

    def __init__(
        self,
        num_codes: int,
        channels: int = 64,
        num_layers: int = 12,
        kernel_size: int = 3,
        first_kernel_size: int = 7,
        head_channels: Optional[int] = None,
        *,
        num_classes: Optional[int] = None,
        cond_num_codes: Optional[int] = None,
        cond_channels: Optional[int] = None,
    ):
        super().__init__(num_codes, channels, num_classes, cond_num_codes, cond_channels)
        check_positive_int("num_layers", num_layers)
        _check_odd("kernel_size", kernel_size)
        _check_odd("first_kernel_size", first_kernel_size)
        head_channels = check_positive_int("head_channels", channels if head_channels is None else head_channels)
        self.layers = nn.ModuleList(
            GatedMaskedConv2d(
                channels,
                first_kernel_size if index == 0 else kernel_size,
                mask_type="A" if index == 0 else "B",
                num_classes=num_classes,
                cond_channels=self.cond_channels,
            )
            for index in range(num_layers)
        )
        self.head_hidden = MaskedConv2d("B", channels, head_channels, 1)
        self.head_out = MaskedConv2d("B", head_channels, num_codes, 1)

    def head(self, skip: Tensor) -> Tensor:
        return self.head_out(F.relu(self.head_hidden(F.relu(skip))))

    def forward(self, codes: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        codes = self._check_codes(codes)
        batch, height, width = codes.shape
        labels, cond_map = self._condition(cond, batch, height, width)
        v = h = self._embed(codes)
        skip = None
        for layer in self.layers:
            v, h, layer_skip = layer(v, h, labels, cond_map)
            skip = layer_skip if skip is None else skip + layer_skip
        return self.head(skip)

    def _stepper(self, n, height, width, labels, cond_map) -> "_GatedStepper":
        return _GatedStepper(self, n, height, width, labels, cond_map)


class _GatedStepper:
    """The fast sampler's state for ``GatedPixelCNN``: a step costs one position's worth of work.

    Everything a step does not change is cached when a row begins. Row ``i``'s codes reach layer
    ``l``'s horizontal stack at ``(i, j)`` only through its ``1 x k`` horizontal taps (the
    vertical stack sees rows ``< i`` only, after the down shift), so when row ``i`` begins each
    layer's vertical stack advances by row ``i - 1`` (one convolution per layer over that row), and
    the horizontal stack's other inputs (the shifted vertical link, the bias and the conditioning)
    are summed into ``links[l]`` ``[n, W, 2C]``. A step then costs, per layer, one matmul of the
    packed unmasked horizontal taps ``[n, taps * C]`` with the packed weight ``[taps * C, 2C]``
    onto ``links[l]``, the gate, and one matmul for the ``1 x 1`` output onto the residual; the
    skip outputs of all layers are summed by one matmul with the stacked skip weights, then the
    head. Buffers and their per-step views are made once, so a step allocates little and
    dispatches five plain ATen ops per layer (the masked convolution op's checks and backend
    selection cost more than the arithmetic at one position).

    ``rows[l]`` ``[n, k // 2 + W, C]`` (channels last) holds layer ``l``'s horizontal input for the
    current row behind ``k // 2`` zero columns (the taps right of the centre are masked);
    ``vertical[l]`` ``[n, C, k // 2 + H, k // 2 + W + k // 2]`` its vertical input behind zero rows
    on top and zero columns each side. Columns right of ``j`` hold stale values, which no mask reads.
    ``gates`` ``[n, L, C + 1]`` holds every layer's gate output at the current position and a
    constant 1, so that the ``1 x 1`` weights, packed as ``[C + 1, out]`` with the bias as the
    last row, add their biases inside the matmul.
    """

    def __init__(self, model: GatedPixelCNN, n: int, height: int, width: int, labels, cond_map):
        self.model = model
        self.rechecked = 0
        layers = model.layers
        channels = model.channels
        weight = model.embedding.weight
        self.embedding = weight
        self.conds = [layer.conditioning(labels, cond_map) for layer in layers]
        self.pads = [layer.kernel_size // 2 for layer in layers]
        self.vertical = [weight.new_zeros((n, channels, height + pad, width + 2 * pad)) for pad in self.pads]
        self.rows = [weight.new_zeros((n, pad + width, channels)) for pad in self.pads]
        self.links = [weight.new_zeros((n, width, 2 * channels)) for _ in layers]
        # Packed weights: the vertical kernel's rows up to the centre; the horizontal kernel's kept
        # taps as [taps * C, 2C], tap-major like the row buffer's columns.
        self.vertical_weights = [layer.vertical.weight[:, :, : pad + 1, :].contiguous()
                                 for layer, pad in zip(layers, self.pads)]
        self.vertical_biases = [layer.vertical.bias for layer in layers]
        self.horizontal_weights = []
        for layer, pad in zip(layers, self.pads):
            taps = pad + 1 if layer.mask_type == "B" else pad
            kept = layer.horizontal.weight[:, :, 0, :taps]  # [2C, C, taps]
            self.horizontal_weights.append(kept.permute(2, 1, 0).reshape(taps * channels, 2 * channels).contiguous())
        self.horizontal_biases = [_bias(layer.horizontal) for layer in layers]
        self.link_weights = [_matrix(layer.vertical_to_horizontal) for layer in layers]
        self.link_biases = [_bias(layer.vertical_to_horizontal) for layer in layers]
        self.out_weights = [_matrix_with_bias(layer.out) for layer in layers]
        self.skip_weight = torch.cat([_matrix_with_bias(layer.skip) for layer in layers])  # [L * (C + 1), C]
        self.head = [(_matrix(conv), _bias(conv)) for conv in (model.head_hidden, model.head_out)]
        # Per-step scratch and views, made once.
        self.gates = weight.new_ones((n, len(layers), channels + 1))
        self.flat_gates = self.gates.view(n, len(layers) * (channels + 1))
        self.pre = [weight.new_zeros((n, 2 * channels)) for _ in layers]
        self.tanh = weight.new_zeros((n, channels))
        self.sigmoid = weight.new_zeros((n, channels))
        self.layer_views = [  # per layer: pre-activation, its two halves, the gate output, it with the 1
            (pre, pre[:, :channels], pre[:, channels:], self.gates[:, index, :channels], self.gates[:, index, :])
            for index, pre in enumerate(self.pre)
        ]
        self.steps = []  # steps[j][l]: the views layer l reads and writes at column j
        for j in range(width):
            views = []
            for index, (layer, pad) in enumerate(zip(layers, self.pads)):
                taps = self.horizontal_weights[index].shape[0] // channels
                following = index + 1 < len(layers)
                views.append((
                    self.rows[index][:, j : j + taps, :].reshape(n, taps * channels),
                    self.links[index][:, j, :],
                    self.rows[index][:, pad + j, :] if layer.residual else None,
                    self.rows[index + 1][:, self.pads[index + 1] + j, :] if following else None,
                ))
            self.steps.append(views)

    def begin_row(self, i: int) -> None:
        layers = self.model.layers
        if i > 0:  # the first layer's vertical input: the embedded codes of the finished row
            pad = self.pads[0]
            self.vertical[0][:, :, i - 1 + pad, pad:-pad or None] = self.rows[0][:, pad:, :].transpose(1, 2)
        for index, layer in enumerate(layers):
            term = self.horizontal_biases[index] + (0 if self.conds[index] is None else _row_term(self.conds[index], i))
            if i > 0:
                above, pad = i - 1, self.pads[index]
                # Padded rows above .. above + pad hold rows above - pad .. above: the kept kernel rows.
                v_pre = F.conv2d(self.vertical[index][:, :, above : above + pad + 1, :], self.vertical_weights[index],
                                 self.vertical_biases[index])[:, :, 0, :].transpose(1, 2)  # [n, W, 2C]
                term = term + torch.addmm(self.link_biases[index], v_pre.reshape(-1, v_pre.shape[2]),
                                          self.link_weights[index]).view_as(v_pre)
                if index + 1 < len(layers):
                    cond = self.conds[index]
                    v_out = _gate_last(v_pre if cond is None else v_pre + _row_term(cond, above))
                    following = self.pads[index + 1]
                    self.vertical[index + 1][:, :, above + following, following:-following or None] = (
                        v_out.transpose(1, 2))
            self.links[index].copy_(term.expand_as(self.links[index]))

    def logits(self, i: int, j: int) -> Tensor:
        for (taps, link, residual, following), (pre, a, b, gate_out, gate_and_one), weight, out_weight in zip(
            self.steps[j], self.layer_views, self.horizontal_weights, self.out_weights
        ):
            torch.addmm(link, taps, weight, out=pre)
            torch.tanh(a, out=self.tanh)
            torch.sigmoid(b, out=self.sigmoid)
            torch.mul(self.tanh, self.sigmoid, out=gate_out)
            if following is None:  # the last layer's h_out feeds nothing
                continue
            if residual is None:
                torch.mm(gate_and_one, out_weight, out=following)
            else:
                torch.addmm(residual, gate_and_one, out_weight, out=following)
        skip = torch.mm(self.flat_gates, self.skip_weight).relu_()
        (hidden_weight, hidden_bias), (out_weight, out_bias) = self.head
        return torch.addmm(out_bias, torch.addmm(hidden_bias, skip, hidden_weight).relu_(), out_weight)

    def commit(self, i: int, j: int, codes: Tensor) -> None:
        self.rows[0][:, self.pads[0] + j, :] = self.embedding[codes]
