"""Which backends run here, on which device: the constants every test folder imports.

Without a GPU, Triton's kernels run on CPU tensors through its interpreter. TRITON_INTERPRET must
be set before Triton compiles anything, so it is set here, before this module imports fastvq;
conftest.py imports this module before any test module is collected.
"""

from __future__ import annotations

import os
import platform

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - Triton is a test requirement on Linux
    HAS_TRITON = False

TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

from fastvq import backends  # noqa: E402  (after TRITON_INTERPRET is set)
from fastvq.backends import cpp as compiled_backend  # noqa: E402

# The compiled backend joins the parametrisation wherever fastvq._C was built and loads;
# tests/backends/test_cpp_backend.py says why it is missing where it is not.
HAS_CPP, CPP_MISSING_REASON = compiled_backend.load()
HAS_CUDA_KERNELS = HAS_CUDA and compiled_backend.cuda_available()

BACKENDS = (
    [("torch", "cpu"), ("triton", TRITON_DEVICE)]
    + ([("cpp", "cpu")] if HAS_CPP else [])
    + ([("torch", "cuda")] if HAS_CUDA else [])
    + ([("cuda", "cuda")] if HAS_CUDA_KERNELS else [])
)
BACKEND_IDS = [f"{name}-{device}" for name, device in BACKENDS]


def backends_for(op: str | None = None):
    """A ``backend`` fixture over the backends here that run ``op`` themselves, read from ``backends.TABLE``.

    A backend whose table row routes ``op`` to another one (``cpp`` runs ``masked_conv2d`` on the
    PyTorch path) would only repeat that one's cases, so it is left out; ``op=None`` keeps every
    backend (conftest.py's ``backend``). A test module narrows its backends with
    ``backend = backends_for("masked_conv2d")``; the fixture selects each through FASTVQ_BACKEND and
    returns ``(name, device)``. ``op`` must be a key of ``backends.TABLE`` (KeyError otherwise).
    """
    chosen = [(name, device) for name, device in BACKENDS if op is None or backends.TABLE[op][name].runs == name]

    @pytest.fixture(params=chosen, ids=[f"{name}-{device}" for name, device in chosen])
    def backend(request, monkeypatch):
        name, device = request.param
        if name == "triton" and not HAS_TRITON:
            if platform.system() == "Linux":
                pytest.fail("Triton is not installed: pip install -e '.[test]' installs it on Linux")
            pytest.skip("Triton is not available on this platform")
        monkeypatch.setenv("FASTVQ_BACKEND", name)
        return name, device

    return backend
