"""Which backends run here, on which device: the constants every test folder imports.

Without a GPU, Triton's kernels run on CPU tensors through its interpreter. TRITON_INTERPRET must
be set before Triton compiles anything, so it is set here, before this module imports fastvq;
conftest.py imports this module before any test module is collected.
"""

import os

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

from fastvq.backends import cpp as compiled_backend  # noqa: E402  (after TRITON_INTERPRET is set)

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
