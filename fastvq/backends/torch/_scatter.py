"""Deterministic scatter-adds for the PyTorch path's segment reduce and VQ backward."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def deterministic_scatter(enabled: bool):
    """Turns PyTorch's deterministic mode on around an ``index_add_`` when asked.

    ``index_add_`` is deterministic on CPU; on CUDA it uses float atomics unless the mode is on.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled and not previous:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        if enabled and not previous:
            torch.use_deterministic_algorithms(False, warn_only=warn_only)
