"""The Triton kernels' tl.dot precision follows PyTorch's fp32 precision flags, read through either API.

PyTorch >= 2.9 has ``fp32_precision`` (global ``torch.backends.fp32_precision``, per backend
``torch.backends.cuda.matmul.fp32_precision`` and ``torch.backends.cudnn.conv.fp32_precision``); once
it is used, reading the legacy ``allow_tf32`` raises RuntimeError, which made every Triton op fail
for anyone on the recommended API. Older PyTorch (down to 2.4, the oldest fastvq supports) has only
``allow_tf32``, simulated here by stand-ins without the new attributes. The search follows the matmul
flag (off by default); the masked convolution follows the convolution's flag (on by default), as
``conv2d`` does. fp16/bf16 never depend on a flag.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fastvq.backends.triton import common

NEW_API = hasattr(torch.backends, "fp32_precision")
needs_new_api = pytest.mark.skipif(not NEW_API, reason="this PyTorch has no fp32_precision API")


@pytest.fixture(autouse=True)
def compiled_precision(monkeypatch):
    """Flags as on a GPU (the interpreter always answers "ieee"), restored afterwards through the API
    that reads them without raising."""
    monkeypatch.setattr(common, "interpreting", lambda: False)
    # Held here: a test may swap the modules for stand-ins until its monkeypatch is undone.
    backends, matmul, cudnn = torch.backends, torch.backends.cuda.matmul, torch.backends.cudnn
    if NEW_API:
        saved = (backends.fp32_precision, matmul.fp32_precision, cudnn.conv.fp32_precision)
    else:
        saved = (matmul.allow_tf32, cudnn.allow_tf32)
    yield
    if NEW_API:
        backends.fp32_precision, matmul.fp32_precision, cudnn.conv.fp32_precision = saved
    else:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


def _precisions():
    return common.dot_precision(torch.float32, "matmul"), common.dot_precision(torch.float32, "conv")


def test_defaults_are_pytorchs():
    assert _precisions() == ("tf32x3", "tf32")  # matmul: tf32 off; cuDNN convolution: tf32 on
    for dtype in (torch.float16, torch.bfloat16):
        assert common.dot_precision(dtype, "matmul") == common.dot_precision(dtype, "conv") == "tf32x3"


@needs_new_api
def test_new_per_backend_api():
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    assert _precisions() == ("tf32", "tf32x3")  # the convolution follows its own flag, not the matmul's
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    assert _precisions() == ("tf32x3", "tf32")


@needs_new_api
def test_new_global_api():
    torch.backends.fp32_precision = "tf32"
    torch.backends.cuda.matmul.fp32_precision = "none"  # inherit the global setting
    torch.backends.cudnn.conv.fp32_precision = "none"
    assert _precisions() == ("tf32", "tf32")
    torch.backends.fp32_precision = "ieee"
    assert _precisions() == ("tf32x3", "tf32x3")


def test_legacy_api():
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = False
    assert _precisions() == ("tf32", "tf32x3")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True
    assert _precisions() == ("tf32x3", "tf32")


@pytest.mark.parametrize("matmul_tf32, conv_tf32", [(True, False), (False, True)])
def test_pytorch_before_the_new_api(monkeypatch, matmul_tf32, conv_tf32):
    """PyTorch 2.4 - 2.8: backends without fp32_precision, whose getattr raises AttributeError."""

    class LegacyMatmul:
        allow_tf32 = matmul_tf32

        def __getattr__(self, name):
            raise AttributeError("Unknown attribute " + name)

    monkeypatch.setattr(torch.backends.cuda, "matmul", LegacyMatmul())
    monkeypatch.setattr(torch.backends, "cudnn", SimpleNamespace(allow_tf32=conv_tf32))
    assert _precisions() == ("tf32" if matmul_tf32 else "tf32x3", "tf32" if conv_tf32 else "tf32x3")


def test_unknown_op_is_refused():
    with pytest.raises(ValueError, match="op must be"):
        common.dot_precision(torch.float32, "attention")
