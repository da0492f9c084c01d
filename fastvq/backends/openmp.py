"""PyTorch's own CPU ops on one OpenMP thread around fastvq's kernels.

The ops around a kernel (checks, operand preparation, the duplicate-code probe, the soft ops' chain rule) are
PyTorch ops, each of which opens an OpenMP region over the caller's threads once it has 32 768 elements. On a
loaded 2-core machine waking libgomp's sleeping thread costs a scheduler slice: two reductions of 65 536
elements took 20-31 ms a call on 2 threads against 0.12 ms on one (AMD EPYC Zen 4, load 7-10), and
``soft_quantize`` at N <= 1 024 took 23-154 ms on 2 threads against 1.7-10.6 ms on one, almost all of it there.
On any machine libgomp's workers then spin for a while after the region, beside the kernel's own threads. These
ops are elementwise ops or reductions over ``N x D`` and ``K x D`` elements, a few ms at most on one thread
beside kernels of ``N x K x D`` work, so :func:`serial_torch_ops` runs them on one thread, and
:func:`with_threads` gives a kernel called inside it the caller's thread count back.

The OpenMP thread count is a per-thread setting (``torch.get_num_threads()`` reads it on OpenMP builds), so
other threads are not affected; ``torch.set_num_threads`` would also resize PyTorch's other pools and clear
oneDNN's cache. Where PyTorch's OpenMP runtime cannot be found, or does not govern its thread count, both are
plain calls.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar

import torch

_Result = TypeVar("_Result")

# The OpenMP runtimes PyTorch's wheels ship in torch/lib: GNU's on Linux, LLVM's or Intel's elsewhere.
_RUNTIME_PATTERNS = ("libgomp*.so*", "libiomp5*.so*", "libomp*.so*", "libomp*.dylib", "libiomp5*.dylib")

_state = threading.local()  # .threads: the caller's thread count inside serial_torch_ops, 0 outside


@functools.lru_cache(maxsize=None)
def _openmp_num_threads_setter() -> Optional[Callable[[int], None]]:
    """The ``omp_set_num_threads`` of the OpenMP runtime PyTorch runs its CPU ops on, or ``None`` where it
    cannot be found or does not govern ``torch.get_num_threads()`` (a build without OpenMP)."""
    library_dir = Path(torch.__file__).parent / "lib"
    for pattern in _RUNTIME_PATTERNS:
        for path in sorted(library_dir.glob(pattern)):
            try:
                setter = ctypes.CDLL(str(path)).omp_set_num_threads
            except (OSError, AttributeError):
                continue
            setter.argtypes, setter.restype = [ctypes.c_int], None
            threads = torch.get_num_threads()
            if threads == 1:
                return setter  # nothing to tell it by; setting 1 where the count is 1 changes nothing
            setter(threads - 1)
            governs = torch.get_num_threads() == threads - 1
            setter(threads)
            if governs:
                return setter
    return None


@contextlib.contextmanager
def serial_torch_ops() -> Iterator[None]:
    """Runs the PyTorch CPU ops of its block (or of the function it decorates) on one OpenMP thread of this
    Python thread, restoring the caller's count on exit, an exception's included. Nested uses are one."""
    threads = torch.get_num_threads()
    setter = _openmp_num_threads_setter() if threads > 1 and not getattr(_state, "threads", 0) else None
    if setter is None:
        yield
        return
    _state.threads = threads
    setter(1)
    try:
        yield
    finally:
        setter(threads)
        _state.threads = 0


def with_threads(kernel: Callable[..., _Result], *args) -> _Result:
    """``kernel(*args)`` on the caller's thread count, also inside :func:`serial_torch_ops`: fastvq's C++
    kernels read it on entry (and run their own PyTorch ops inline)."""
    threads = getattr(_state, "threads", 0)
    if not threads:
        return kernel(*args)
    setter = _openmp_num_threads_setter()
    setter(threads)
    try:
        return kernel(*args)
    finally:
        setter(1)
