"""fastvq::parallel_for (csrc/cpu/parallel.h), the loop every C++ CPU kernel runs on: dynamic chunks claimed
from a counter by the caller and a pool of helpers, no join barrier, nothing spinning between calls.

What the kernels rely on: every index of the range is visited exactly once, whatever the range, grain and
thread count; chunks hold at least ``grain`` indices; a body's exception reaches the caller; a helper that
stalls mid-chunk makes loops that take less than a stall stay on the caller for a while, and only those; a
fork's child still computes (its pool is new); and the ops give the same bits on one thread and on two, since
no kernel's result may depend on which thread ran which chunk. No timing is asserted here:
``benchmarks/bench_loaded.py`` measures the behaviour under load.
"""

from __future__ import annotations

import os
import pickle
import time

import pytest
import torch

import fastvq
from fastvq.backends import cpp

pytestmark = pytest.mark.skipif(not cpp.available() or not hasattr(torch.ops.fastvq_C, "parallel_for_coverage"),
                                reason="needs fastvq._C built with csrc/cpu/parallel.cpp")

NO_THROW = -(2**62)


@pytest.fixture
def threads(monkeypatch):
    """Sets the intra-op thread count for one test and restores it afterwards. The loop's back-off (which
    keeps small loops on one thread for a while after a helper stalled, as on a loaded test machine) is
    turned off, so that the parallel path is the one tested."""
    monkeypatch.setenv("FASTVQ_CPU_BACKOFF", "0")
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)


def coverage(begin: int, end: int, grain: int, spin: int = 0, throw_at: int = NO_THROW, helper_sleep_us: int = 0):
    """(visits per index, chunks [calls, 3]: begin, end, 1 where a helper ran it)."""
    return torch.ops.fastvq_C.parallel_for_coverage(begin, end, grain, spin, throw_at, helper_sleep_us)


@pytest.mark.parametrize("num_threads", [1, 2, 3])
@pytest.mark.parametrize("begin,end,grain", [
    (0, 0, 1), (4, 4, 7), (0, 1, 1), (0, 7, 3), (5, 1_000, 1), (3, 1_000, 7), (0, 10_007, 64), (11, 108, 1_000),
    (-50, 77, 2), (0, 129, 128),
])
def test_every_index_once_in_chunks_of_at_least_grain(threads, num_threads, begin, end, grain):
    threads(num_threads)
    visits, chunks = coverage(begin, end, grain, spin=200)
    assert visits.shape == (end - begin,)
    assert torch.equal(visits, torch.ones_like(visits)), f"indices visited other than once: {visits.tolist()}"
    if end == begin:
        assert chunks.shape[0] == 0
        return
    ordered = chunks[chunks[:, 0].argsort(), :2]
    assert ordered[0, 0] == begin and ordered[-1, 1] == end
    assert torch.equal(ordered[1:, 0], ordered[:-1, 1]), f"chunks not contiguous: {ordered.tolist()}"
    lengths = ordered[:, 1] - ordered[:, 0]
    assert (lengths[:-1] >= grain).all(), f"a chunk below the grain {grain}: {ordered.tolist()}"
    if num_threads == 1 or end - begin <= grain:
        assert chunks[:, :2].tolist() == [[begin, end]], "one thread or one grain of work must run as a single call"


def test_many_threads_cut_the_range_into_small_chunks(threads):
    # Small chunks are what lets the other threads take over a descheduled thread's share.
    threads(2)
    _, chunks = coverage(0, 1_000, 1, spin=100)
    assert chunks.shape[0] >= 8


def test_exception_in_a_body_reaches_the_caller_and_the_pool_stays_usable(threads):
    threads(2)
    with pytest.raises(RuntimeError, match="thrown at index 777"):
        coverage(0, 1_000, 1, spin=100, throw_at=777)
    visits, _ = coverage(0, 1_000, 1, spin=100)
    assert torch.equal(visits, torch.ones_like(visits))


def backoff_state(reset: bool = False) -> tuple[int, int]:
    """(stall cost in ns, ns left of the cautious window); ``reset`` first forgets every stall."""
    return torch.ops.fastvq_C.parallel_for_backoff_state(reset)


def stall_a_helper() -> None:
    """Runs loops whose helper sleeps 30 ms in its chunk, so that the caller waits on it (a stall), until a
    helper claimed a chunk; skips the test where none did in 20 calls (a very loaded machine). Each loop is
    ~10 ms of work: above the default stall cost (4 ms), so that it posts helpers on a busy machine too."""
    for _ in range(20):
        visits, chunks = coverage(0, 64, 1, spin=200_000, helper_sleep_us=30_000)
        assert torch.equal(visits, torch.ones_like(visits))
        if chunks[:, 2].any():
            return
    pytest.skip("no helper claimed a chunk in 20 calls (a very loaded machine): no stall to back off from")


def test_a_stalled_helper_keeps_small_loops_on_the_caller_for_a_while(threads, monkeypatch):
    threads(2)
    monkeypatch.setenv("FASTVQ_CPU_BACKOFF", "1")
    assert backoff_state(reset=True) == (4_000_000, 0)  # no stall seen: the default cost, no window
    stall_a_helper()
    stall_cost, cautious_ns = backoff_state()
    # The stall's wait (~30 ms, the helper's sleep) is remembered, capped at 20 ms, for at least ~2 s.
    assert 500_000 <= stall_cost <= 20_000_000 and cautious_ns > 1_000_000_000, (stall_cost, cautious_ns)
    # A loop that takes far less than a stall now runs on the caller alone: its first chunk, then the rest in
    # one call, although it has 64 grains.
    _, small = coverage(0, 64, 1, spin=1_000)
    assert not small[:, 2].any() and small.shape[0] <= 2, small.tolist()
    monkeypatch.setenv("FASTVQ_CPU_BACKOFF", "0")
    _, small = coverage(0, 64, 1, spin=1_000)
    assert small.shape[0] > 2, "FASTVQ_CPU_BACKOFF=0 turns the back-off off"
    backoff_state(reset=True)


def test_after_a_stall_a_loop_with_more_work_than_a_stall_keeps_its_helpers(threads, monkeypatch):
    # The back-off weighs time, not grains: 64 grains that take several stalls' time still use both threads
    # (a back-off by count kept every loop under 512 grains on the caller alone).
    threads(2)
    monkeypatch.setenv("FASTVQ_CPU_BACKOFF", "1")
    backoff_state(reset=True)
    spin, step_times = 2_000, []
    for _ in range(3):  # one grain: on the caller alone, to time a step (the fastest of three: least preempted)
        start = time.perf_counter()
        coverage(0, 64, 64, spin=spin)
        step_times.append((time.perf_counter() - start) / (64 * spin))
    seconds_per_step = min(step_times)
    stall_a_helper()
    stall_cost, _ = backoff_state()
    spin = int(4 * stall_cost * 1e-9 / seconds_per_step / 64)  # ~4 stalls of work in all
    for _ in range(3):  # a helper that the machine did not run for all that time claims nothing
        visits, chunks = coverage(0, 64, 1, spin=spin)
        assert torch.equal(visits, torch.ones_like(visits))
        if chunks[:, 2].any():
            break
    else:
        pytest.fail(f"a loop of ~{4 * stall_cost / 1e6:.0f} ms ran on the caller alone after a stall, three times")
    backoff_state(reset=True)


def _search_inputs(num_rows=3_001, num_codes=1_503, dim=37, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, dim, generator=generator), torch.randn(num_codes, dim, generator=generator)


def _all_ops(z, codebook):
    """Outputs of the C++ ops that run on fastvq::parallel_for, at sizes that go parallel on two threads."""
    indices, distances = fastvq.nearest_code(z, codebook)
    top_indices, top_distances = fastvq.nearest_codes(z, codebook, k=5)
    dot_indices, dot_distances = fastvq.nearest_code(z[:517], codebook, metric="cosine")
    counts, sums = fastvq.segment_reduce(z, indices, codebook.shape[0])
    batched = fastvq.nearest_code_batched(z[:2_000].reshape(4, 500, -1), codebook[:1_500].reshape(4, 375, -1))
    soft = fastvq.soft_quantize(z[:517], codebook, temperature=0.7)
    return (indices, distances, top_indices, top_distances, dot_indices, dot_distances, counts, sums, *batched, *soft)


def test_ops_give_the_same_bits_on_one_and_two_threads(threads):
    z, codebook = _search_inputs()
    threads(1)
    one = _all_ops(z, codebook)
    threads(2)
    for _ in range(3):  # several schedules: each run may split the chunks between the threads differently
        two = _all_ops(z, codebook)
        for position, (expected, got) in enumerate(zip(one, two)):
            assert torch.equal(expected, got), f"output {position} differs between 1 and 2 threads"


def test_a_forked_child_searches_with_a_new_pool(threads):
    threads(2)
    z, codebook = _search_inputs(num_rows=2_000, num_codes=1_000, dim=16, seed=1)
    expected = fastvq.nearest_code(z, codebook)[0]  # the parent's pool has started its helpers
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its pool's threads did not survive the fork
        try:
            os.close(read_end)
            indices = fastvq.nearest_code(z, codebook)[0]
            os.write(write_end, pickle.dumps(indices.tolist()))
        finally:
            os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's search did not finish within 60 s")
    with os.fdopen(read_end, "rb") as pipe:
        payload = pipe.read()
    assert payload, "the forked child returned nothing"
    assert pickle.loads(payload) == expected.tolist()
