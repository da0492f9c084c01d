"""The masked convolution op, its layers and their contracts, on every backend.

Parity is against ``fastvq.reference.masked_conv2d_ref`` (``conv2d(x, weight * mask)`` in float64);
causality is checked by perturbation: an output position must not change, bit for bit, when the
inputs it must not see change. The ``backend`` fixture runs each test on the PyTorch path and on
the Triton kernels (through Triton's interpreter when there is no GPU).
"""

from __future__ import annotations

import pytest
import torch
from _backends import HAS_TRITON, TRITON_DEVICE, backends_for
from torch import nn

import fastvq
from fastvq import reference
from fastvq.nn import GatedMaskedConv2d, MaskedConv2d

KERNEL_SIZES = [1, 3, 5, 7]
# conftest's ``backend``, restricted to the backends with a masked convolution of their own: fastvq._C
# has none, so FASTVQ_BACKEND=cpp runs the PyTorch path and =cuda the Triton kernels.
backend = backends_for("masked_conv2d")


def _inputs(device, batch=2, in_channels=3, out_channels=5, height=5, width=7, kernel=(3, 3), dtype=torch.float32,
            seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_channels, height, width, generator=generator)
    weight = torch.randn(out_channels, in_channels, *kernel, generator=generator) / kernel[0]
    bias = torch.randn(out_channels, generator=generator)
    return x.to(device, dtype), weight.to(device, dtype), bias.to(device, dtype)


def _assert_close(actual, expected, what, rtol=1e-5):
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=rtol * max(scale, 1.0),
                               msg=lambda message: f"{what}: {message}")


def _check_against_reference(x, weight, bias, mask_type, padding=None, rtol=1e-5):
    x, weight, bias = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    out = fastvq.masked_conv2d(x, weight, bias, mask_type=mask_type, padding=padding)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    out.backward(grad)
    x64, weight64, bias64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    expected = reference.masked_conv2d_ref(x64, weight64, bias64, mask_type, padding)
    expected.backward(grad.double())
    assert out.shape == expected.shape and out.dtype == x.dtype
    _assert_close(out, expected, "output", rtol)
    _assert_close(x.grad, x64.grad, "grad_x", rtol)
    _assert_close(weight.grad, weight64.grad, "grad_weight", rtol)
    _assert_close(bias.grad, bias64.grad, "grad_bias", rtol)
    return weight.grad


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("mask_type", ["A", "B", "V"])
@pytest.mark.parametrize("kernel", [(1, 1), (1, 3), (3, 1), (3, 3), (3, 5), (5, 5), (7, 7)])
def test_tap_prefix_masks_equal_the_literature_masks(mask_type, kernel):
    from fastvq._masks import conv_mask

    assert torch.equal(conv_mask(mask_type, *kernel), reference.pixelcnn_mask_ref(mask_type, kernel).bool())


def test_mask_a_3x3_is_the_pixelcnn_mask():
    assert reference.pixelcnn_mask_ref("A", 3).tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert reference.pixelcnn_mask_ref("B", 3).tolist() == [[1, 1, 1], [1, 1, 0], [0, 0, 0]]
    assert reference.pixelcnn_mask_ref("V", 3).tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 0]]


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("kernel_size", KERNEL_SIZES)
@pytest.mark.parametrize("mask_type", ["A", "B"])
def test_forward_and_gradients_match_reference(backend, mask_type, kernel_size):
    x, weight, bias = _inputs(backend[1], kernel=(kernel_size, kernel_size))
    grad_weight = _check_against_reference(x, weight, bias, mask_type)
    mask = reference.pixelcnn_mask_ref(mask_type, kernel_size).bool()
    assert torch.equal(grad_weight[:, :, ~mask], torch.zeros_like(grad_weight[:, :, ~mask])), "masked taps got gradient"


@pytest.mark.parametrize(
    "mask_type, kernel", [("V", (3, 3)), ("V", (7, 7)), ("A", (1, 5)), ("B", (1, 7)), ("B", (5, 3))]
)
def test_stack_masks_and_rectangular_kernels_match_reference(backend, mask_type, kernel):
    x, weight, bias = _inputs(backend[1], kernel=kernel)
    _check_against_reference(x, weight, bias, mask_type)


def test_channel_and_pixel_tiles_with_ragged_edges(backend):
    # 19 in / 17 out channels and 3 * 7 * 9 pixels: none a multiple of any tile size.
    x, weight, bias = _inputs(backend[1], batch=3, in_channels=19, out_channels=17, height=7, width=9, kernel=(3, 3))
    _check_against_reference(x, weight, bias, "B")


@pytest.mark.parametrize("padding, kernel", [(0, (3, 3)), ((1, 2), (5, 5)), ((3, 0), (3, 3))])
def test_explicit_padding(backend, padding, kernel):
    x, weight, bias = _inputs(backend[1], kernel=kernel)
    _check_against_reference(x, weight, bias, "A", padding)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_error_at_most_twice_pytorchs(backend, dtype):
    x, weight, bias = _inputs(
        backend[1], in_channels=16, out_channels=16, height=6, width=6, kernel=(5, 5), dtype=dtype
    )
    grad = torch.randn(2, 16, 6, 6, generator=torch.Generator().manual_seed(2)).to(x)

    def run(fn, upcast):
        leaves = [t.detach().clone().double().requires_grad_() if upcast else t.detach().clone().requires_grad_()
                  for t in (x, weight, bias)]
        out = fn(*leaves)
        out.backward(grad.double() if upcast else grad)
        return [out.detach()] + [leaf.grad for leaf in leaves]

    truth = run(lambda a, w, b: reference.masked_conv2d_ref(a, w, b, "B"), upcast=True)
    ours = run(lambda a, w, b: fastvq.masked_conv2d(a, w, b, mask_type="B"), upcast=False)
    pytorch = run(lambda a, w, b: reference.masked_conv2d_ref(a, w, b, "B", upcast=False).to(dtype), upcast=False)
    for name, exact, mine, theirs in zip(("output", "grad_x", "grad_weight", "grad_bias"), truth, ours, pytorch):
        assert mine.dtype == dtype, name
        our_error = (mine.double() - exact).abs().max().item()
        pytorch_error = (theirs.double() - exact).abs().max().item()
        slack = 1e-3 * exact.abs().max().item()
        assert our_error <= 2 * pytorch_error + slack, f"{name}: error {our_error:.3g} vs PyTorch's {pytorch_error:.3g}"


def test_float64_runs_and_matches_reference_exactly_enough():
    x, weight, bias = _inputs("cpu", kernel=(5, 5), dtype=torch.float64)
    out = fastvq.masked_conv2d(x, weight, bias, mask_type="A")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference.masked_conv2d_ref(x, weight, bias, "A"), rtol=1e-12, atol=1e-12)


def test_mixed_dtypes_are_promoted(backend):
    x, weight, bias = _inputs(backend[1])
    x = x.to(torch.bfloat16).requires_grad_()
    weight = weight.requires_grad_()
    out = fastvq.masked_conv2d(x, weight, bias, mask_type="B")
    assert out.dtype == torch.float32
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    expected = reference.masked_conv2d_ref(x.detach(), weight.detach(), bias, "B")
    _assert_close(out, expected, "output")


def test_empty_batch(backend):
    x, weight, bias = _inputs(backend[1], batch=0)
    weight.requires_grad_()
    out = fastvq.masked_conv2d(x, weight, bias, mask_type="A")
    assert out.shape == (0, 5, 5, 7)
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_type_a_1x1_keeps_no_tap(backend):
    x, weight, bias = _inputs(backend[1], kernel=(1, 1))
    x.requires_grad_()
    out = fastvq.masked_conv2d(x, weight, bias, mask_type="A")
    assert torch.equal(out, bias[None, :, None, None].expand_as(out))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


# --------------------------------------------------------------------------- layouts and the weight


def test_channels_last_and_strided_inputs_give_the_same_answer(backend):
    x, weight, bias = _inputs(backend[1], height=6, width=9, kernel=(3, 3))
    expected = fastvq.masked_conv2d(x, weight, bias, mask_type="B")
    channels_last = fastvq.masked_conv2d(x.contiguous(memory_format=torch.channels_last), weight, bias, mask_type="B")
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    _assert_close(channels_last, expected, "channels-last output", rtol=1e-6)
    wide = torch.zeros(2, 3, 6, 20, device=x.device)
    wide[:, :, :, ::2][:, :, :, :9] = x
    strided = wide[:, :, :, ::2][:, :, :, :9]
    assert not strided.is_contiguous()
    _assert_close(fastvq.masked_conv2d(strided, weight, bias, mask_type="B"), expected, "strided output", rtol=1e-6)
    transposed_weight = weight.transpose(2, 3).contiguous().transpose(2, 3)
    _assert_close(
        fastvq.masked_conv2d(x, transposed_weight, bias, mask_type="B"), expected, "strided weight", rtol=1e-6
    )


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 1e30])
def test_masked_taps_are_never_read_or_written(backend, poison):
    x, weight, bias = _inputs(backend[1], kernel=(5, 5))
    mask = reference.pixelcnn_mask_ref("B", 5).bool().to(x.device)
    poisoned = torch.where(mask, weight, torch.full_like(weight, poison)).requires_grad_()
    before = poisoned.detach().clone()
    x.requires_grad_()
    out = fastvq.masked_conv2d(x, poisoned, bias, mask_type="B")
    out.square().sum().backward()
    assert torch.equal(poisoned.detach().view(torch.int32), before.view(torch.int32)), "the weight was modified"
    clean = torch.where(mask, weight, 0.0)
    _assert_close(out, reference.masked_conv2d_ref(x.detach(), clean, bias, "B"), "output with poisoned masked taps")
    assert x.grad.isfinite().all(), "a masked tap leaked into grad_x"
    assert torch.equal(poisoned.grad[:, :, ~mask], torch.zeros_like(poisoned.grad[:, :, ~mask]))


def test_weight_grad_is_deterministic(backend):
    x, weight, bias = _inputs(backend[1], batch=3, in_channels=8, out_channels=8, height=9, width=9, kernel=(3, 3))
    grads = []
    for _ in range(2):
        leaf = weight.clone().requires_grad_()
        fastvq.masked_conv2d(x, leaf, bias, mask_type="A").square().sum().backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


def test_triton_backend_really_launches_the_kernels(monkeypatch):
    if not HAS_TRITON:
        pytest.skip("Triton is not installed")
    from fastvq.backends.triton import masked_conv as kernels

    launched = []
    for name in ("_implicit_gemm", "_weight_grad"):
        original = getattr(kernels, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            launched.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, spy)
    monkeypatch.setenv("FASTVQ_BACKEND", "triton")
    x, weight, bias = _inputs(TRITON_DEVICE)
    x.requires_grad_()
    weight.requires_grad_()
    fastvq.masked_conv2d(x, weight, bias, mask_type="B").sum().backward()
    assert launched == ["_implicit_gemm", "_implicit_gemm", "_weight_grad"]


# --------------------------------------------------------------------------- causality


def _raster_positions(height, width):
    return [(i, j) for i in range(height) for j in range(width)]


def _perturbation_batch(x, forbidden):
    """One copy of ``x [1, C, H, W]`` per position, each with the inputs that position must not see
    replaced by noise; ``forbidden(i, j)`` gives that set as a bool ``[H, W]`` map."""
    _, channels, height, width = x.shape
    generator = torch.Generator().manual_seed(7)
    batch = []
    for i, j in _raster_positions(height, width):
        noise = torch.randn(1, channels, height, width, generator=generator).to(x) * 10
        batch.append(torch.where(forbidden(i, j).to(x.device), noise, x))
    return torch.cat(batch)


def _forbidden_map(mask_type, height, width):
    rows = torch.arange(height)[:, None]
    cols = torch.arange(width)[None, :]

    def forbidden(i, j):
        if mask_type == "V":
            return (rows > i).expand(height, width)
        after = (rows > i) | ((rows == i) & (cols > j))
        return after | ((rows == i) & (cols == j)) if mask_type == "A" else after

    return forbidden


@pytest.mark.parametrize(
    "mask_type, kernel", [("A", (5, 5)), ("B", (3, 3)), ("V", (3, 3)), ("A", (1, 5)), ("B", (1, 3))]
)
def test_single_layer_causality_by_perturbation(backend, mask_type, kernel):
    height, width = 4, 5
    x, weight, bias = _inputs(backend[1], batch=1, height=height, width=width, kernel=kernel)
    forbidden = _forbidden_map(mask_type, height, width)
    perturbed = _perturbation_batch(x, forbidden)
    # The same batch size for both, so both runs take the same convolution algorithm.
    base = fastvq.masked_conv2d(x.expand_as(perturbed).contiguous(), weight, bias, mask_type=mask_type)
    out = fastvq.masked_conv2d(perturbed, weight, bias, mask_type=mask_type)
    for index, (i, j) in enumerate(_raster_positions(height, width)):
        assert torch.equal(out[index, :, i, j], base[index, :, i, j]), (
            f"mask {mask_type}: output at {(i, j)} changed when only inputs it must not see changed"
        )
    # And it does see what it may: the nearest allowed input changes it.
    i, j = 2, 2
    allowed = (i, j) if mask_type in ("B", "V") else (i, j - 1)
    nudged = x.clone()
    nudged[:, :, allowed[0], allowed[1]] += 1.0
    changed = fastvq.masked_conv2d(nudged, weight, bias, mask_type=mask_type)
    assert not torch.equal(changed[0, :, i, j], fastvq.masked_conv2d(x, weight, bias, mask_type=mask_type)[0, :, i, j])


# --------------------------------------------------------------------------- bad input


def _bad_cases():
    x = torch.randn(2, 3, 5, 5)
    w = torch.randn(4, 3, 3, 3)
    return [
        ((x[0, 0], w, None), {}, ValueError, r"x must be .*4-D.*\(5, 5\)"),  # 3-D is unbatched
        ((x, w[0], None), {}, ValueError, r"weight must be 4-D.*\(3, 3, 3\)"),
        ((x, torch.randn(4, 2, 3, 3), None), {}, ValueError, r"C_in = 2.*\(2, 3, 5, 5\)"),
        ((x, torch.randn(4, 3, 4, 3), None), {}, ValueError, r"odd.*\(4, 3\)"),
        ((x, w, torch.randn(3)), {}, ValueError, r"bias must have shape \(4,\).*\(3,\)"),
        ((x, w, None), {"mask_type": "C"}, ValueError, r"mask_type"),
        ((x, w, None), {"padding": -1}, ValueError, r"padding must be >= 0"),
        ((x, w, None), {"padding": "valid"}, TypeError, r"padding"),
        ((x.long(), w, None), {}, TypeError, r"x must be a floating-point.*int64"),
        ((x, w.int(), None), {}, TypeError, r"weight must be a floating-point"),
        ((x, w.to("meta"), None), {}, ValueError, r"one device"),
        ((torch.randn(2, 3, 1, 1), torch.randn(4, 3, 3, 3), None), {"padding": 0}, ValueError, r"empty"),
        (("x", w, None), {}, TypeError, r"x must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_raises_before_any_kernel(backend, monkeypatch, case):
    from fastvq.backends.torch import masked_conv as torch_masked_conv

    def fail(*args, **kwargs):
        raise AssertionError("a kernel ran on bad input")

    monkeypatch.setattr(torch_masked_conv, "masked_conv2d", fail)
    if backend[0] == "triton":
        from fastvq.backends.triton import masked_conv as kernels

        monkeypatch.setattr(kernels, "masked_conv2d", fail)
    args, kwargs, error, message = _bad_cases()[case]
    with pytest.raises(error, match=message):
        fastvq.masked_conv2d(*args, **kwargs)
    # The operator checks the same things itself (a non-tensor is already refused by its schema).
    if not kwargs and isinstance(args[0], torch.Tensor) and args[1].dim() == 4:
        pads = [args[1].shape[2] // 2, args[1].shape[3] // 2]
        with pytest.raises(error, match=message):
            torch.ops.fastvq.masked_conv2d(*args, "B", pads)


# --------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("mask_type, with_bias", [("A", True), ("B", False), ("V", True)])
def test_masked_conv2d_opcheck(backend, mask_type, with_bias):
    x, weight, bias = _inputs(backend[1], kernel=(3, 3))
    args = (
        x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_() if with_bias else None, mask_type, [1, 1]
    )
    torch.library.opcheck(torch.ops.fastvq.masked_conv2d.default, args)


@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_masked_conv2d_backward_opcheck(backend, needs):
    x, weight, _ = _inputs(backend[1], kernel=(3, 3))
    grad = torch.randn(2, 5, 5, 7, device=x.device)
    torch.library.opcheck(torch.ops.fastvq.masked_conv2d_backward.default, (grad, x, weight, "A", [1, 1], *needs))


# --------------------------------------------------------------------------- layers


class LiteratureMaskedConv(nn.Conv2d):
    """The layer of the PixelCNN code bases fastvq replaces: overwrites its weight on every forward."""

    def __init__(self, mask_type, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", self.weight.data.clone())
        _, _, height, width = self.weight.size()
        self.mask.fill_(1)
        self.mask[:, :, height // 2, width // 2 + (mask_type == "B") :] = 0
        self.mask[:, :, height // 2 + 1 :] = 0

    def forward(self, x):
        self.weight.data *= self.mask
        return super().forward(x)


@pytest.mark.parametrize("mask_type", ["A", "B"])
def test_masked_conv2d_layer_is_a_drop_in(mask_type):
    torch.manual_seed(0)
    theirs = LiteratureMaskedConv(mask_type, 3, 6, 5, 1, 2, bias=True)
    ours = MaskedConv2d(mask_type, 3, 6, 5, 1, 2, bias=True)
    assert isinstance(ours, nn.Conv2d)
    ours.load_state_dict(theirs.state_dict())  # their state_dict holds a mask buffer too
    original = ours.weight.detach().clone()
    x = torch.randn(2, 3, 7, 6)
    expected = theirs(x)
    out = ours(x)
    _assert_close(out, expected.double(), "layer output")
    assert torch.equal(ours.weight, original), "the layer modified its weight"
    assert torch.equal(ours.mask[0, 0], theirs.mask[0, 0])
    assert f"mask_type='{mask_type}'" in repr(ours)
    assert "mask" not in ours.state_dict()


def test_masked_conv2d_layer_keeps_nn_conv2d_defaults_and_same_padding():
    layer = MaskedConv2d("B", 2, 3, 3)
    assert layer(torch.randn(1, 2, 6, 6)).shape == (1, 3, 4, 4)  # nn.Conv2d's padding=0
    layer = MaskedConv2d("B", 2, 3, (1, 5), padding="same", bias=False)
    assert layer(torch.randn(1, 2, 6, 6)).shape == (1, 3, 6, 6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"stride": 2}, "stride"),
        ({"dilation": 2}, "dilation"),
        ({"groups": 2}, "groups"),
        ({"padding_mode": "reflect"}, "padding_mode"),
        ({"kernel_size": 4}, "odd"),
        ({"mask_type": "C"}, "mask_type"),
        ({"padding": "valid"}, "padding"),
    ],
)
def test_masked_conv2d_layer_rejects_what_it_cannot_do(kwargs, message):
    arguments = {"mask_type": "A", "in_channels": 2, "out_channels": 2, "kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        MaskedConv2d(**arguments)


def _gated_stack(channels, num_layers, kernel_size=3, **kwargs):
    torch.manual_seed(0)
    return nn.ModuleList(
        GatedMaskedConv2d(channels, kernel_size, mask_type="A" if index == 0 else "B", **kwargs)
        for index in range(num_layers)
    )


def _run_stack(stack, x, **cond):
    v = h = x
    skips = 0
    for layer in stack:
        v, h, skip = layer(v, h, **cond)
        skips = skips + skip
    return h, skips


@pytest.mark.parametrize("num_layers", [1, 3])
def test_gated_stack_causality_by_perturbation(num_layers):
    height, width, channels = 5, 6, 4
    stack = _gated_stack(channels, num_layers)
    x = torch.randn(1, channels, height, width)
    perturbed = _perturbation_batch(x, _forbidden_map("A", height, width))
    with torch.no_grad():
        base_h, base_skip = _run_stack(stack, x.expand_as(perturbed).contiguous())
        h, skip = _run_stack(stack, perturbed)
    for index, (i, j) in enumerate(_raster_positions(height, width)):
        assert torch.equal(h[index, :, i, j], base_h[index, :, i, j]), f"h_out at {(i, j)} saw its own or a later input"
        assert torch.equal(skip[index, :, i, j], base_skip[index, :, i, j]), (
            f"skip at {(i, j)} saw its own or a later input"
        )


def _sees(run, x, target, source):
    nudged = x.clone()
    nudged[:, :, source[0], source[1]] += 1.0
    with torch.no_grad():
        return not torch.equal(run(x)[0, :, target[0], target[1]], run(nudged)[0, :, target[0], target[1]])


def test_gated_stack_has_no_blind_spot_where_pixelcnn_has_one():
    channels = 4
    x = torch.randn(1, channels, 6, 7)
    gated = _gated_stack(channels, 2)
    torch.manual_seed(0)
    pixelcnn = [
        MaskedConv2d("A", channels, channels, 3, padding=1),
        MaskedConv2d("B", channels, channels, 3, padding=1),
    ]

    def run_pixelcnn(inputs):
        return pixelcnn[1](torch.tanh(pixelcnn[0](inputs)))

    target, up_right = (3, 3), (2, 5)  # two columns right, one row up
    assert _sees(lambda inputs: _run_stack(gated, inputs)[0], x, target, up_right)
    assert not _sees(run_pixelcnn, x, target, up_right), "the plain PixelCNN stack should have its blind spot here"
    # The vertical stack alone never sees its own row's right part through the shift.
    assert not _sees(lambda inputs: _run_stack(gated, inputs)[0], x, target, (3, 4))


def test_gated_layer_conditioning():
    torch.manual_seed(0)
    layer = GatedMaskedConv2d(4, 3, mask_type="B", num_classes=3, cond_channels=2)
    v = h = torch.randn(2, 4, 5, 5)
    cond_map = torch.randn(2, 2, 5, 5)
    labels = torch.tensor([0, 1])
    _, out, _ = layer(v, h, labels, cond_map)
    _, other_labels, _ = layer(v, h, torch.tensor([2, 1]), cond_map)
    _, other_map, _ = layer(v, h, labels, cond_map + 1)
    assert not torch.equal(out[0], other_labels[0]) and torch.equal(out[1], other_labels[1])
    assert not torch.equal(out, other_map)
    with pytest.raises(ValueError, match="labels"):
        layer(v, h, None, cond_map)
    with pytest.raises(ValueError, match=r"cond_map must have shape \(2, 2, 5, 5\)"):
        layer(v, h, labels, cond_map[:, :1])


@pytest.mark.parametrize(
    "args, kwargs, message",
    [((4, 4), {}, "odd"), ((0,), {}, "channels"), ((4,), {"mask_type": "V"}, "mask_type"),
     ((4,), {"mask_type": "A", "residual": True}, "residual")],
)
def test_gated_layer_rejects_bad_arguments(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        GatedMaskedConv2d(*args, **kwargs)
