"""Set-up shared by the tests of the EnCodec-family drop-ins (tests/nn/test_audiocraft.py, test_encodec.py):
the original's quantizer and fastvq's built from the same seed, seeded batches, and the state comparison."""

from __future__ import annotations

import torch

# fastvq's k-means and segment sums accumulate in float32 (the ops' contract), so a float64 training run
# matches the original to float32 rounding; float64 keeps the original's own rounding from hiding more.
TRAINING_TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def seeded_pair(theirs_class, ours_class, seed=0, parity=True, dtype=torch.float32, **config):
    """``(theirs_class(**config), ours_class(**config, parity=parity))`` in ``dtype``, each built right after
    ``torch.manual_seed(seed)`` (so both draw the same random initial codes)."""
    torch.manual_seed(seed)
    theirs = theirs_class(**config).to(dtype)
    torch.manual_seed(seed)
    ours = ours_class(**config, parity=parity).to(dtype)
    return theirs, ours


def seeded_batch(seed, dtype=torch.float32, *, shape):
    """A ``shape`` tensor of normal values times 2 from its own generator seeded by ``seed``, in ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 2.0).to(dtype)


def assert_same_state(theirs, ours, **tolerance):
    """The same state_dict keys in the same order, and values equal within ``tolerance``."""
    theirs_state, ours_state = theirs.state_dict(), ours.state_dict()
    assert list(theirs_state) == list(ours_state)
    for key in theirs_state:
        torch.testing.assert_close(ours_state[key], theirs_state[key], msg=key, **tolerance)
