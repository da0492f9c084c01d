"""Shared test set-up: which backends run here, on which device.

Without a GPU, Triton's kernels run on CPU tensors through its interpreter. TRITON_INTERPRET must
be set before Triton compiles anything, so it is set here, before any test module imports fastvq.
"""

import os
import platform
import shutil
import tempfile

# A fresh inductor cache per test session: a cache left by an earlier build of fastvq can hold
# compiled graphs that call an operator with an older schema, and inductor's key does not see it.
_INDUCTOR_CACHE = None if "TORCHINDUCTOR_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="fastvq-inductor-")
if _INDUCTOR_CACHE:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _INDUCTOR_CACHE

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - Triton is a test requirement on Linux
    HAS_TRITON = False

TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

from fastvq.backends import cpp as compiled_backend  # noqa: E402  (after TRITON_INTERPRET is set)

# The compiled backend joins the parametrisation wherever fastvq._C was built and loads;
# tests/test_cpp_backend.py says why it is missing where it is not.
HAS_CPP, CPP_MISSING_REASON = compiled_backend.load()
HAS_CUDA_KERNELS = HAS_CUDA and compiled_backend.cuda_available()

BACKENDS = (
    [("torch", "cpu"), ("triton", TRITON_DEVICE)]
    + ([("cpp", "cpu")] if HAS_CPP else [])
    + ([("torch", "cuda")] if HAS_CUDA else [])
    + ([("cuda", "cuda")] if HAS_CUDA_KERNELS else [])
)
BACKEND_IDS = [f"{name}-{device}" for name, device in BACKENDS]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: dynamo's recompile limit counts compilations per code
    object across the whole process, and torch.compile's wrapper code is shared by every model,
    so tests compiling different models would otherwise exhaust each other's budget."""
    torch._dynamo.reset()
    yield


@pytest.fixture(params=BACKENDS, ids=BACKEND_IDS)
def backend(request, monkeypatch):
    """Selects a backend for the test through FASTVQ_BACKEND and returns ``(name, device)``."""
    name, device = request.param
    if name == "triton" and not HAS_TRITON:
        if platform.system() == "Linux":
            pytest.fail("Triton is not installed: pip install -e '.[test]' installs it on Linux")
        pytest.skip("Triton is not available on this platform")
    monkeypatch.setenv("FASTVQ_BACKEND", name)
    return name, device


@pytest.fixture
def device(backend):
    return backend[1]


def pytest_sessionfinish(session, exitstatus):
    if _INDUCTOR_CACHE:
        shutil.rmtree(_INDUCTOR_CACHE, ignore_errors=True)
