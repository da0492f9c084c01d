"""Training under ``torch.compile(fullgraph=True)`` against eager training: the nn layers' shared check."""

from __future__ import annotations

import copy
from typing import Callable

import torch


def assert_compiled_training_matches_eager(
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    loss_of: Callable[[object], torch.Tensor],
    *,
    steps: int = 3,
    compare: bool = True,
) -> torch.nn.Module:
    """Trains ``model`` compiled with ``fullgraph=True`` and a deep copy of it eagerly, side by side.

    Each of ``steps`` SGD steps (learning rate 0.1) draws one float32 input of ``input_shape`` from the
    global generator, runs the eager copy and then the compiled model on it, and backpropagates
    ``loss_of(output)`` (a scalar) through each. Afterwards every entry of the compiled model's state
    must be finite and, where ``compare`` is True, equal to the eager copy's within ``rtol=1e-4,
    atol=1e-6`` (pass ``compare=False`` where the layer draws random numbers, which compiled and
    eager draw from different streams). Seed the global generator before building ``model``.
    Returns ``model``, trained in place, for checks of its own; raises AssertionError on a mismatch.
    """
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    optimizers = [torch.optim.SGD(net.parameters(), lr=0.1) for net in (eager, model)]
    for _ in range(steps):
        x = torch.randn(input_shape)
        for net, optimizer in zip((eager, compiled), optimizers):
            loss_of(net(x)).backward()
            optimizer.step()
            optimizer.zero_grad()
    for (key, ours), theirs in zip(model.state_dict().items(), eager.state_dict().values()):
        assert torch.isfinite(ours).all(), key
        if compare:
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6, msg=key)
    return model
