"""PixelCNN's masked convolution layers on ``fastvq.masked_conv2d``.

``MaskedConv2d`` is a drop-in for the ``MaskedConv(mask_type, *args, **kwargs)`` layer of the
PixelCNN code bases (an ``nn.Conv2d`` whose weight is multiplied by, or overwritten with, a mask on
every forward): the same constructor arguments after ``mask_type``, the same ``weight``/``bias``
parameters, a ``mask`` buffer, but a forward that skips the masked taps and never touches the weight.

``GatedMaskedConv2d`` is one layer of Gated PixelCNN (van den Oord et al. 2016): a vertical stack
that sees the rows above, a horizontal stack that sees the pixels to the left, the vertical stack
feeding the horizontal one through a one-row down shift (so no blind spot), tanh x sigmoid gates,
a residual and a skip output, and optional class or spatial conditioning.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._masks import check_kernel_size, check_mask_type, conv_mask
from ..ops.masked_conv import masked_conv2d

__all__ = ["MaskedConv2d", "GatedMaskedConv2d"]


def _pair(value: Union[int, tuple[int, int]]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


class MaskedConv2d(nn.Conv2d):
    """A PixelCNN masked convolution: ``nn.Conv2d`` with a mask of type ``"A"``, ``"B"`` or ``"V"``.

    ``MaskedConv2d(mask_type, in_channels, out_channels, kernel_size, stride=1, padding=0,
    dilation=1, groups=1, bias=True, padding_mode="zeros", device=None, dtype=None)`` takes
    ``nn.Conv2d``'s arguments, with its defaults, after ``mask_type`` (see
    ``fastvq.masked_conv2d`` for the masks). ``padding="same"`` or ``kernel_size // 2`` keeps the
    map size, as PixelCNNs do; note that ``nn.Conv2d``'s default ``padding=0`` shrinks it.

    Shapes: input ``[B, in_channels, H, W]`` float; output ``[B, out_channels, H + 2 pad_h - kH + 1,
    W + 2 pad_w - kW + 1]``; an unbatched ``[in_channels, H, W]`` input gives an unbatched output,
    as in ``nn.Conv2d``. ``weight`` is ``[out_channels, in_channels, kH, kW]`` as in
    ``nn.Conv2d``; its masked taps are never read, never modified and get zero gradient. ``mask``
    is a non-persistent ``[1, 1, kH, kW]`` float buffer for code that reads it; state_dicts of the
    layers that store their mask load here (the stored mask is ignored).

    Raises:
        ValueError: an unknown ``mask_type``, an even kernel size, or ``stride``, ``dilation``,
            ``groups`` or ``padding_mode`` other than 1, 1, 1 and ``"zeros"``: PixelCNN's masked
            convolutions never use them, and the kernels do not implement them.
    """

    def __init__(
        self,
        mask_type: str,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, tuple[int, int]],
        stride: Union[int, tuple[int, int]] = 1,
        padding: Union[str, int, tuple[int, int]] = 0,
        dilation: Union[int, tuple[int, int]] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
    ):
        check_mask_type(mask_type)
        check_kernel_size(*_pair(kernel_size), name="kernel_size")
        for name, value, allowed in (("stride", stride, 1), ("dilation", dilation, 1)):
            if _pair(value) != (allowed, allowed):
                raise ValueError(f"MaskedConv2d supports {name}=1 only, got {name}={value!r}")
        if groups != 1:
            raise ValueError(f"MaskedConv2d supports groups=1 only, got groups={groups!r}")
        if padding_mode != "zeros":
            raise ValueError(f"MaskedConv2d supports padding_mode='zeros' only, got {padding_mode!r}")
        if isinstance(padding, str) and padding != "same":
            raise ValueError(f"padding must be 'same', an int or a pair of ints, got {padding!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        self.mask_type = mask_type
        mask = conv_mask(mask_type, *self.kernel_size, device=self.weight.device).to(self.weight.dtype)
        self.register_buffer("mask", mask[None, None], persistent=False)

    def forward(self, input: Tensor, *, padding: Union[None, int, tuple[int, int]] = None) -> Tensor:
        """``padding`` overrides the layer's own for this call (the fast samplers use ``0`` on crops)."""
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        # [C_in, H, W] works as in nn.Conv2d.
        return masked_conv2d(input, self.weight, self.bias, mask_type=self.mask_type,
                             padding=self.padding if padding is None else padding)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        state_dict.pop(prefix + "mask", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"mask_type={self.mask_type!r}, " + super().extra_repr()


def gate(x: Tensor) -> Tensor:
    """``tanh(a) * sigmoid(b)`` of the two channel halves ``a, b`` of ``x [B, 2C, ...]``."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def shift_down(x: Tensor) -> Tensor:
    """Moves every row of ``x [B, C, H, W]`` one down; row 0 becomes zeros."""
    return F.pad(x, (0, 0, 1, 0))[:, :, : x.shape[2], :]


class GatedMaskedConv2d(nn.Module):
    """One Gated PixelCNN layer (van den Oord et al. 2016), on masked convolutions.

    With ``c`` the optional conditioning term (a class embedding and/or a 1 x 1 convolution of a
    spatial map), ``*`` the masked convolution, and ``gate(a | b) = tanh(a) * sigmoid(b)``::

        v_pre  = W_v * v                          k x k, mask "V": rows up to and including this one
        v_out  = gate(v_pre + c)
        h_pre  = W_h * h + shift_down(W_vh v_pre) + c
                                                  1 x k, mask "A" (first layer) or "B"; W_vh 1 x 1
        g      = gate(h_pre)
        skip   = W_s g                            1 x 1
        h_out  = W_o g (+ h when residual)        1 x 1

    The vertical stack never reads the horizontal one, and reaches it only shifted down one row, so
    ``h_out`` and ``skip`` at ``(i, j)`` depend on the rows above ``i`` (all of them within the
    receptive field: no blind spot) and on row ``i`` left of ``j`` (type A) or up to ``j`` (type B).

    Args:
        channels: ``C``, the width of both stacks.
        kernel_size: odd ``k``; the vertical weight is ``[2C, C, k, k]`` (its rows below the centre
            are masked, never read) and the horizontal one ``[2C, C, 1, k]``.
        mask_type: ``"A"`` for the first layer, whose inputs are the values being predicted; ``"B"``
            for every later one.
        residual: add ``h`` to ``h_out``. Defaults to ``mask_type == "B"``; a type-A layer cannot
            have it (the residual would pass each position's own input to its output).
        num_classes: adds a learned ``[2C]`` embedding of a class label to both stacks.
        cond_channels: adds a 1 x 1 convolution of a ``[B, cond_channels, H, W]`` map.
        bias: biases of the convolutions.

    ``forward(v, h, labels=None, cond_map=None)`` takes ``v, h [B, C, H, W]`` (the same tensor in
    the first layer), ``labels`` int64 ``[B]`` when ``num_classes`` is set and ``cond_map``
    ``[B, cond_channels, H, W]`` when ``cond_channels`` is set, and returns ``(v_out, h_out, skip)``,
    each ``[B, C, H, W]``.

    Raises:
        ValueError: bad sizes, a residual type-A layer, or inputs whose shapes do not match.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        *,
        mask_type: str = "B",
        residual: Optional[bool] = None,
        num_classes: Optional[int] = None,
        cond_channels: Optional[int] = None,
        bias: bool = True,
    ):
        super().__init__()
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be an int >= 1, got {channels!r}")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd int >= 1, got {kernel_size!r}")
        if residual is None:
            residual = mask_type == "B"
        if residual and mask_type == "A":
            raise ValueError("a type-A GatedMaskedConv2d cannot be residual: h_out would see its own input position")
        for name, value in (("num_classes", num_classes), ("cond_channels", cond_channels)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.mask_type = mask_type
        self.residual = residual
        self.num_classes = num_classes
        self.cond_channels = cond_channels
        pad = kernel_size // 2
        self.vertical = MaskedConv2d("V", channels, 2 * channels, kernel_size, padding=pad, bias=bias)
        self.horizontal = MaskedConv2d(mask_type, channels, 2 * channels, (1, kernel_size), padding=(0, pad), bias=bias)
        self.vertical_to_horizontal = MaskedConv2d("B", 2 * channels, 2 * channels, 1, bias=bias)
        self.skip = MaskedConv2d("B", channels, channels, 1, bias=bias)
        self.out = MaskedConv2d("B", channels, channels, 1, bias=bias)
        self.class_embedding = nn.Embedding(num_classes, 2 * channels) if num_classes else None
        self.cond = MaskedConv2d("B", cond_channels, 2 * channels, 1, bias=False) if cond_channels else None

    def forward(
        self, v: Tensor, h: Tensor, labels: Optional[Tensor] = None, cond_map: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        self._check_inputs(v, h, labels, cond_map)
        cond = self.conditioning(labels, cond_map)
        v_pre = self.vertical(v)
        v_out = self.vertical_output(v_pre, cond)
        h_out, skip = self.horizontal_output(h, shift_down(self.link(v_pre)), cond)
        return v_out, h_out, skip

    def conditioning(self, labels: Optional[Tensor], cond_map: Optional[Tensor]) -> Optional[Tensor]:
        """The term added to both stacks: ``[B, 2C, 1, 1]``, ``[B, 2C, H, W]`` or ``None``."""
        cond = None
        if self.class_embedding is not None:
            cond = self.class_embedding(labels)[:, :, None, None]
        if self.cond is not None:
            spatial = self.cond(cond_map)
            cond = spatial if cond is None else cond + spatial
        return cond

    def vertical_output(self, v_pre: Tensor, cond: Optional[Tensor]) -> Tensor:
        return gate(v_pre if cond is None else v_pre + cond)

    def link(self, v_pre: Tensor) -> Tensor:
        """The vertical stack's contribution to the horizontal one, before the down shift."""
        return self.vertical_to_horizontal(v_pre)

    def horizontal_output(
        self, h: Tensor, link: Tensor, cond: Optional[Tensor], *, padding: Optional[tuple[int, int]] = None
    ) -> tuple[Tensor, Tensor]:
        """``(h_out, skip)`` from ``h`` and the already shifted ``link``.

        With ``padding=(0, 0)`` it evaluates a crop: ``h [B, C, 1, k + n - 1]`` gives the ``n``
        outputs whose windows lie inside it, and the residual is taken from the crop's centre columns.
        """
        h_pre = self.horizontal(h, padding=padding) + link
        if cond is not None:
            h_pre = h_pre + cond
        gated = gate(h_pre)
        h_out = self.out(gated)
        if self.residual:
            offset = (h.shape[3] - h_out.shape[3]) // 2
            h_out = h_out + h[:, :, :, offset : offset + h_out.shape[3]]
        return h_out, self.skip(gated)

    def _check_inputs(self, v: Tensor, h: Tensor, labels: Optional[Tensor], cond_map: Optional[Tensor]) -> None:
        for name, value in (("v", v), ("h", h)):
            if not isinstance(value, Tensor) or value.dim() != 4 or value.shape[1] != self.channels:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{name} must be [B, {self.channels}, H, W], got {shape}")
        if v.shape != h.shape:
            raise ValueError(f"v and h must have the same shape, got {tuple(v.shape)} and {tuple(h.shape)}")
        batch, _, height, width = v.shape
        if self.class_embedding is not None:
            if (
                not isinstance(labels, Tensor)
                or labels.dtype not in (torch.int64, torch.int32)
                or tuple(labels.shape) != (batch,)
            ):
                shape = tuple(labels.shape) if isinstance(labels, Tensor) else labels
                raise ValueError(
                    f"labels must be an int64 tensor of shape ({batch},) for num_classes={self.num_classes}, "
                    f"got {shape}"
                )
        elif labels is not None:
            raise ValueError("labels given to a GatedMaskedConv2d built without num_classes")
        if self.cond is not None:
            expected = (batch, self.cond_channels, height, width)
            if not isinstance(cond_map, Tensor) or tuple(cond_map.shape) != expected:
                shape = tuple(cond_map.shape) if isinstance(cond_map, Tensor) else cond_map
                raise ValueError(f"cond_map must have shape {expected}, got {shape}")
        elif cond_map is not None:
            raise ValueError("cond_map given to a GatedMaskedConv2d built without cond_channels")
