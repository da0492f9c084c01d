"""``reference.vector_quantize_ref`` is a float64 oracle for float64 inputs: its loss and gradients
keep differences that float32 would round away (issue 23)."""

from __future__ import annotations

import torch

from fastvq import reference


def test_vector_quantize_ref_keeps_float64_differences():
    offset = 1e-9  # 1 + 1e-9 is 1.0 in float32
    z = torch.full((4, 3), 1.0 + offset, dtype=torch.float64, requires_grad=True)
    codebook = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
    _, indices, loss = reference.vector_quantize_ref(z, codebook, beta=0.25)
    assert loss.dtype == torch.float32 and indices.tolist() == [0, 0, 0, 0]
    torch.testing.assert_close(loss, torch.tensor(1.25 * offset**2, dtype=torch.float32), rtol=1e-6, atol=0)
    loss.backward()
    # d/de mean((e - z)^2) over 12 entries, all four rows on code 0: 2 * 4 * (-offset) / 12 per entry.
    expected = torch.zeros(2, 3, dtype=torch.float64)
    expected[0] = -2 * 4 * offset / 12
    torch.testing.assert_close(codebook.grad, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(z.grad, torch.full_like(z, 0.25 * 2 * offset / 12), rtol=1e-6, atol=0)
