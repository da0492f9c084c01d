"""``nearest_code`` against ``fastvq.reference`` on every backend: odd shapes, dtypes, metrics, and
its Gumbel-max sampled codes (``sample_temperature``, ``seed``).

Under Triton's interpreter (CPU, no GPU) every tile is a numpy array, so the interpreted backend
runs a covering sample of the shapes (every N, K and D value at least once, the largest ones
paired with each other) instead of the full cartesian product that compiled backends run.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from _backends import BACKEND_IDS, BACKENDS
from _parity import DTYPE_IDS, DTYPES, METRICS, assert_search_parity

import fastvq

SIZES_N = (0, 1, 3, 127, 300)
SIZES_K = (1, 3, 50, 129)
SIZES_D = (1, 3, 17, 70)
ALL_SHAPES = list(itertools.product(SIZES_N, SIZES_K, SIZES_D))
COVERING_SHAPES = [
    (0, 3, 17),
    (1, 129, 70),
    (3, 50, 1),
    (3, 1, 70),
    (127, 1, 3),
    (127, 129, 17),
    (127, 50, 70),
    (300, 3, 70),
    (300, 50, 17),
    (300, 129, 1),
]


def _interpreted(name: str, device: str) -> bool:
    return name == "triton" and device == "cpu"


def backend_shape_cases(interpreted_shapes, compiled_shapes):
    """``(backend, shape)`` parameters: a sample of shapes on interpreted backends, all elsewhere."""
    cases = []
    for (name, device), backend_id in zip(BACKENDS, BACKEND_IDS):
        shapes = interpreted_shapes if _interpreted(name, device) else compiled_shapes
        for shape in shapes:
            cases.append(pytest.param((name, device), shape, id=f"{backend_id}-N{shape[0]}-K{shape[1]}-D{shape[2]}"))
    return cases


def random_search_inputs(shape, dtype, device, seed=0):
    num_rows, num_codes, dim = shape
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(num_rows, dim, generator=generator)
    codebook = torch.randn(num_codes, dim, generator=generator)
    return z.to(device=device, dtype=dtype), codebook.to(device=device, dtype=dtype)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("backend", "shape"), backend_shape_cases(COVERING_SHAPES, ALL_SHAPES), indirect=["backend"])
def test_nearest_code_matches_reference(backend, device, shape, dtype, metric):
    z, codebook = random_search_inputs(shape, dtype, device)
    indices, distances, codes = fastvq.nearest_code(z, codebook, metric=metric, return_codes=True)
    assert_search_parity(z, codebook, metric, indices, distances, codes)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    ("backend", "shape"), backend_shape_cases([(127, 50, 17)], [(127, 50, 17), (300, 129, 70)]), indirect=["backend"]
)
def test_nearest_code_on_clustered_data(backend, device, shape, dtype, metric):
    """Rows drawn around the codes, as a trained VQ layer sees them: every row has a clear winner."""
    num_rows, num_codes, dim = shape
    generator = torch.Generator().manual_seed(1)
    codebook = torch.randn(num_codes, dim, generator=generator)
    assignment = torch.randint(num_codes, (num_rows,), generator=generator)
    z = codebook[assignment] + 0.05 * torch.randn(num_rows, dim, generator=generator)
    z, codebook = z.to(device=device, dtype=dtype), codebook.to(device=device, dtype=dtype)
    indices, distances, codes = fastvq.nearest_code(z, codebook, metric=metric, return_codes=True)
    assert_search_parity(z, codebook, metric, indices, distances, codes)
    if metric != "dot":  # under dot a longer code can beat the row's own centre
        assert torch.equal(indices.cpu(), assignment)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(
    ("backend", "shape"), backend_shape_cases([(40, 50, 17)], [(40, 50, 17), (300, 129, 70)]), indirect=["backend"]
)
def test_return_codes_false_returns_the_same_search(backend, device, shape, metric):
    z, codebook = random_search_inputs(shape, torch.float32, device, seed=2)
    result = fastvq.nearest_code(z, codebook, metric=metric)
    assert len(result) == 2
    indices, distances = result
    with_codes = fastvq.nearest_code(z, codebook, metric=metric, return_codes=True)
    assert torch.equal(indices, with_codes[0])
    assert torch.equal(distances, with_codes[1])
    op_indices, op_distances, op_codes = torch.ops.fastvq.nearest_code(z, codebook, metric, False)
    assert torch.equal(op_indices, indices) and torch.equal(op_distances, distances)
    assert tuple(op_codes.shape) == (0, shape[2]) and op_codes.dtype == z.dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_l2_distance_is_exact(backend, device, dtype):
    """The returned l2 distance is ``sum((z - e)^2)``, never the cancelling ``z^2 + e^2 - 2 z.e``:
    a row equal to a code gets exactly 0, and a row one step off a code gets that step squared."""
    generator = torch.Generator().manual_seed(3)
    codebook = (torch.randn(20, 33, generator=generator) * 30).to(dtype)
    z = codebook[[4, 11, 19]].clone()
    z[1, 5] += 2
    step = float(z[1, 5].float() - codebook[11, 5].float())
    indices, distances = fastvq.nearest_code(z.to(device), codebook.to(device))
    assert indices.tolist() == [4, 11, 19]
    assert distances.cpu().tolist() == [0.0, step * step, 0.0]


# --------------------------------------------------------------------------- Gumbel-max sampling


@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
def test_gumbel_sampling_follows_the_softmax(backend, metric):
    _, device = backend
    generator = torch.Generator().manual_seed(3)
    codebook = torch.randn(12, 5, generator=generator) * 0.5
    row = torch.randn(1, 5, generator=generator)
    draws = 3000 if backend[0] == "triton" else 20000
    temperature = 0.7
    indices, _ = fastvq.nearest_code(
        row.repeat(draws, 1).to(device), codebook.to(device), metric=metric, sample_temperature=temperature,
        seed=torch.tensor(11, device=device),
    )
    frequencies = torch.bincount(indices.cpu(), minlength=12).double() / draws
    if metric == "l2":
        logits = -torch.cdist(row.double(), codebook.double())[0]
    elif metric == "cosine":
        logits = (F.normalize(row.double(), dim=1) @ F.normalize(codebook.double(), dim=1).T)[0]
    else:
        logits = (row.double() @ codebook.double().T)[0]
    probabilities = (logits / temperature).softmax(0)
    standard_error = (probabilities * (1 - probabilities) / draws).sqrt()
    assert ((frequencies - probabilities).abs() <= 5 * standard_error + 1e-3).all(), (frequencies, probabilities)


def test_sampling_is_reproducible_for_a_seed_and_varies_across_seeds(backend):
    _, device = backend
    generator = torch.Generator().manual_seed(5)
    z = torch.randn(64, 6, generator=generator).to(device)
    codebook = torch.randn(20, 6, generator=generator).to(device)
    def draw(seed):
        return fastvq.nearest_code(z, codebook, sample_temperature=5.0, seed=torch.tensor(seed, device=device))[0]
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_sampling_arguments_are_checked():
    z, codebook = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="sample_temperature"):
        fastvq.nearest_code(z, codebook, sample_temperature=-1.0)
    with pytest.raises(TypeError, match="seed"):
        torch.ops.fastvq.nearest_code(z, codebook, "l2", False, 1.0, None)
    with pytest.raises(ValueError, match="seed"):
        fastvq.nearest_code(z, codebook, sample_temperature=1.0, seed=torch.tensor(1.5))
