"""Shared test set-up: a fresh inductor cache, a fresh dynamo per test, and the ``backend`` fixture.

The constants (which backends run here, on which device) live in _backends.py, which test modules
import; importing it here, before any test module is collected, sets TRITON_INTERPRET before
Triton compiles anything.
"""

import os
import shutil
import tempfile

# A fresh inductor cache per test session: a cache left by an earlier build of fastvq can hold
# compiled graphs that call an operator with an older schema, and inductor's key does not see it.
_INDUCTOR_CACHE = None if "TORCHINDUCTOR_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="fastvq-inductor-")
if _INDUCTOR_CACHE:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _INDUCTOR_CACHE

import pytest  # noqa: E402
import torch  # noqa: E402
from _backends import backends_for  # noqa: E402  (sets TRITON_INTERPRET, imports fastvq)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: dynamo's recompile limit counts compilations per code
    object across the whole process, and torch.compile's wrapper code is shared by every model,
    so tests compiling different models would otherwise exhaust each other's budget."""
    torch._dynamo.reset()
    yield


# Every backend here, selected through FASTVQ_BACKEND; returns ``(name, device)``.
backend = backends_for()


@pytest.fixture
def device(backend):
    return backend[1]


def pytest_sessionfinish(session, exitstatus):
    if _INDUCTOR_CACHE:
        shutil.rmtree(_INDUCTOR_CACHE, ignore_errors=True)
