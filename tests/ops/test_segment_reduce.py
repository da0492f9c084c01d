"""``segment_reduce`` and ``ema_update_`` against ``reference.segment_reduce_ref`` / ``ema_update_ref_``."""

from __future__ import annotations

import pytest
import torch
from _backends import HAS_TRITON, TRITON_DEVICE
from _parity import DTYPE_IDS, DTYPES

import fastvq
from fastvq import reference

DECAY, EPS = 0.8, 1e-5
SEGMENT_SHAPES = [(1, 1, 1), (3, 5, 3), (127, 3, 17), (300, 50, 70)]
DETERMINISTIC = [pytest.param(True, id="sorted"), pytest.param(False, id="atomic")]
SUM_TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def random_batch(num_rows, num_codes, dim, dtype, device, seed=0, *, spread_codes=None):
    """Rows and their codes; ``spread_codes`` limits the codes used, so that some stay empty."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(num_rows, dim, generator=generator).to(device=device, dtype=dtype)
    indices = torch.randint(spread_codes or num_codes, (num_rows,), generator=generator).to(device)
    return values, indices


def assert_segments_match(counts, sums, values, indices, num_codes):
    expected_counts, expected_sums = reference.segment_reduce_ref(values.cpu(), indices.cpu().long(), num_codes)
    assert counts.dtype == torch.float32 and tuple(counts.shape) == (num_codes,)
    assert sums.dtype == torch.float32 and tuple(sums.shape) == (num_codes, values.shape[1])
    assert torch.equal(counts.cpu(), expected_counts), "counts are integers and must be exact"
    torch.testing.assert_close(sums.cpu(), expected_sums, **SUM_TOLERANCE)


# --------------------------------------------------------------------------- segment_reduce


@pytest.mark.parametrize("deterministic", DETERMINISTIC)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SEGMENT_SHAPES, ids=lambda s: "N{}-K{}-D{}".format(*s))
def test_segment_reduce_matches_reference(backend, device, shape, dtype, deterministic):
    num_rows, num_codes, dim = shape
    values, indices = random_batch(num_rows, num_codes, dim, dtype, device)
    counts, sums = fastvq.segment_reduce(values, indices, num_codes, deterministic=deterministic)
    assert_segments_match(counts, sums, values, indices, num_codes)
    if deterministic:
        again = fastvq.segment_reduce(values, indices, num_codes, deterministic=True)
        assert torch.equal(again[1], sums), "the sorted path must be bitwise reproducible"


@pytest.mark.parametrize("deterministic", DETERMINISTIC)
def test_segment_reduce_accepts_int32_indices(backend, device, deterministic):
    values, indices = random_batch(127, 50, 17, torch.float32, device, seed=1)
    counts, sums = fastvq.segment_reduce(values, indices.int(), 50, deterministic=deterministic)
    assert_segments_match(counts, sums, values, indices, 50)


@pytest.mark.parametrize("deterministic", DETERMINISTIC)
def test_segment_reduce_of_empty_batch_is_zero(backend, device, deterministic):
    values = torch.empty(0, 7, device=device)
    indices = torch.empty(0, dtype=torch.int64, device=device)
    counts, sums = fastvq.segment_reduce(values, indices, 5, deterministic=deterministic)
    assert torch.equal(counts, torch.zeros(5, device=device))
    assert torch.equal(sums, torch.zeros(5, 7, device=device))


@pytest.mark.parametrize("deterministic", DETERMINISTIC)
def test_segment_reduce_op_ignores_out_of_range_indices(backend, device, deterministic):
    num_codes = 9
    values, indices = random_batch(70, num_codes, 17, torch.float32, device, seed=2)
    indices[::5] = -1
    indices[1::7] = num_codes
    indices[2::11] = 10**6
    counts, sums = torch.ops.fastvq.segment_reduce(values, indices, num_codes, deterministic)
    in_range = (indices >= 0) & (indices < num_codes)
    assert_segments_match(counts, sums, values[in_range], indices[in_range], num_codes)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("deterministic", DETERMINISTIC)
def test_triton_segment_sum_writes_nothing_out_of_bounds(deterministic):
    """The output lies between guard rows; an index of -1 or K would land on them."""
    from fastvq.backends.triton.segment_reduce import segment_sum_

    num_codes, dim = 6, 19
    values, indices = random_batch(50, num_codes, dim, torch.float32, TRITON_DEVICE, seed=3)
    indices[::4] = -1
    indices[1::6] = num_codes
    guarded_sums = torch.zeros(num_codes + 2, dim, device=TRITON_DEVICE)
    guarded_counts = torch.zeros(num_codes + 2, dtype=torch.int64, device=TRITON_DEVICE)
    segment_sum_(
        guarded_sums[1:-1], values, indices, deterministic=deterministic, counts=guarded_counts[1:-1]
    )
    assert not guarded_sums[[0, -1]].any() and not guarded_counts[[0, -1]].any()
    in_range = (indices >= 0) & (indices < num_codes)
    counts, sums = guarded_counts[1:-1].float(), guarded_sums[1:-1]
    assert_segments_match(counts, sums, values[in_range], indices[in_range], num_codes)


# --------------------------------------------------------------------------- ema_update_


def initial_state(num_codes, dim, codebook_dtype, device, *, debiased, seed=0):
    """``(codebook, cluster_size, embed_avg, step)``: fp32 averages, the codebook in its own dtype.

    The plain variant starts the averages at one count per code and the codebook itself, as
    vector-quantize-pytorch does; the zero-debiased one starts them at zero with a step counter.
    """
    generator = torch.Generator().manual_seed(seed)
    codebook = torch.randn(num_codes, dim, generator=generator).to(device=device, dtype=codebook_dtype)
    if debiased:
        cluster_size = torch.zeros(num_codes, device=device)
        embed_avg = torch.zeros(num_codes, dim, device=device)
        step = torch.zeros((), dtype=torch.int64, device=device)
    else:
        cluster_size = torch.ones(num_codes, device=device)
        embed_avg = codebook.float().clone()
        step = None
    return codebook, cluster_size, embed_avg, step


def clone_state(state):
    return tuple(None if tensor is None else tensor.clone() for tensor in state)


def assert_states_match(actual, expected):
    codebook, cluster_size, embed_avg, step = actual
    expected_codebook, expected_cluster_size, expected_embed_avg, expected_step = expected
    assert codebook.dtype == expected_codebook.dtype
    codebook_tolerance = dict(rtol=torch.finfo(codebook.dtype).eps, atol=1e-5)
    torch.testing.assert_close(codebook.cpu(), expected_codebook.cpu(), **codebook_tolerance, msg="codebook")
    torch.testing.assert_close(cluster_size.cpu(), expected_cluster_size.cpu(), **SUM_TOLERANCE, msg="cluster_size")
    torch.testing.assert_close(embed_avg.cpu(), expected_embed_avg.cpu(), **SUM_TOLERANCE, msg="embed_avg")
    if expected_step is not None:
        assert torch.equal(step, expected_step)


@pytest.mark.parametrize("debiased", [False, True], ids=["plain", "zero-debiased"])
@pytest.mark.parametrize("deterministic", DETERMINISTIC)
@pytest.mark.parametrize("codebook_dtype", DTYPES, ids=DTYPE_IDS)
def test_ema_update_matches_reference_over_steps(backend, device, codebook_dtype, deterministic, debiased):
    num_codes, dim = 37, 19
    state = initial_state(num_codes, dim, codebook_dtype, device, debiased=debiased)
    expected = clone_state(state)
    for batch in range(3):
        # Half the codes stay unused, so Laplace smoothing and decay of empty clusters are exercised.
        z, indices = random_batch(100, num_codes, dim, codebook_dtype, device, seed=10 + batch, spread_codes=20)
        codebook, cluster_size, embed_avg, step = state
        fastvq.ema_update_(
            codebook, cluster_size, embed_avg, z, indices, decay=DECAY, eps=EPS, step=step, deterministic=deterministic
        )
        reference.ema_update_ref_(*expected[:3], z, indices, DECAY, EPS, expected[3])
        assert_states_match(state, expected)
    if debiased:
        assert int(state[3]) == 3


@pytest.mark.parametrize("debiased", [False, True], ids=["plain", "zero-debiased"])
def test_ema_update_with_empty_batch_still_decays(backend, device, debiased):
    num_codes, dim = 11, 5
    state = initial_state(num_codes, dim, torch.float32, device, debiased=debiased)
    if debiased:  # one real batch first, so that the averages have something to decay
        z, indices = random_batch(30, num_codes, dim, torch.float32, device, seed=4)
        fastvq.ema_update_(*state[:3], z, indices, decay=DECAY, eps=EPS, step=state[3])
    expected = clone_state(state)
    before = clone_state(state)
    z = torch.empty(0, dim, device=device)
    indices = torch.empty(0, dtype=torch.int64, device=device)
    fastvq.ema_update_(*state[:3], z, indices, decay=DECAY, eps=EPS, step=state[3])
    reference.ema_update_ref_(*expected[:3], z, indices, DECAY, EPS, expected[3])
    assert_states_match(state, expected)
    torch.testing.assert_close(state[1], DECAY * before[1])
    torch.testing.assert_close(state[2], DECAY * before[2])


def test_ema_update_rejects_out_of_range_indices(backend, device):
    state = initial_state(8, 5, torch.float32, device, debiased=False)
    before = clone_state(state)
    z, indices = random_batch(20, 8, 5, torch.float32, device, seed=5)
    indices[3] = 8
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 8\).*\(8, 5\).*\[0, 8\]"):
        fastvq.ema_update_(*state[:3], z, indices, decay=DECAY, eps=EPS)
    indices[3] = -2
    with pytest.raises(ValueError, match=r"got values in \[-2, "):
        fastvq.ema_update_(*state[:3], z, indices, decay=DECAY, eps=EPS)
    for tensor, original in zip(state[:3], before[:3]):
        assert torch.equal(tensor, original), "the check must run before anything is updated"


@pytest.mark.parametrize("deterministic", DETERMINISTIC)
def test_ema_update_ignores_out_of_range_indices_when_unchecked(backend, device, deterministic):
    """Without the range check (and through the operator, which has none) an out-of-range index is
    ignored: the update equals the reference on the in-range rows alone."""
    num_codes, dim = 8, 5
    z, indices = random_batch(40, num_codes, dim, torch.float32, device, seed=6)
    indices[::3] = num_codes
    indices[1::5] = -1
    in_range = (indices >= 0) & (indices < num_codes)
    expected = initial_state(num_codes, dim, torch.float32, device, debiased=False)
    reference.ema_update_ref_(*expected[:3], z[in_range], indices[in_range], DECAY, EPS)

    unchecked = initial_state(num_codes, dim, torch.float32, device, debiased=False)
    fastvq.ema_update_(
        *unchecked[:3], z, indices, decay=DECAY, eps=EPS, deterministic=deterministic, check_indices_range=False
    )
    assert_states_match(unchecked, expected)

    through_op = initial_state(num_codes, dim, torch.float32, device, debiased=False)
    torch.ops.fastvq.ema_update_(*through_op[:3], z, indices, DECAY, EPS, None, deterministic)
    assert_states_match(through_op, expected)


def test_debiased_update_from_zero_state_with_empty_first_batch_keeps_codebook(backend):
    _, device = backend
    codebook = torch.randn(6, 4, device=device)
    before = codebook.clone()
    cluster_size = torch.zeros(6, device=device)
    embed_avg = torch.zeros(6, 4, device=device)
    step = torch.zeros((), dtype=torch.int64, device=device)
    empty = torch.empty(0, 4, device=device)
    fastvq.ema_update_(codebook, cluster_size, embed_avg, empty, torch.empty(0, dtype=torch.int64, device=device),
                       decay=0.9, step=step)
    assert torch.equal(codebook, before) and int(step) == 1
