"""``fastvq.backends.openmp``: PyTorch's own CPU ops around fastvq's kernels run on one OpenMP thread of the
calling Python thread, kernels called through ``with_threads`` on the caller's count, restored on every exit."""

from __future__ import annotations

import threading

import pytest
import torch

import fastvq
from fastvq.backends import openmp

pytestmark = pytest.mark.skipif(
    openmp._openmp_num_threads_setter() is None, reason="PyTorch's OpenMP runtime was not found in torch/lib"
)


@pytest.fixture
def two_threads():
    outer = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(outer)


def test_serial_scope_nests_restores_and_gives_kernels_the_callers_count(two_threads):
    with openmp.serial_torch_ops():
        assert torch.get_num_threads() == 1
        with openmp.serial_torch_ops():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1  # the inner scope does not restore 2 inside the outer one
        assert openmp.with_threads(torch.get_num_threads) == 2
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(ZeroDivisionError):
        with openmp.serial_torch_ops():
            1 / 0
    assert torch.get_num_threads() == 2
    assert openmp.with_threads(torch.get_num_threads) == 2  # outside a scope: a plain call


def test_serial_scope_is_per_python_thread(two_threads):
    seen = {}
    entered, release = threading.Event(), threading.Event()

    def other():
        torch.set_num_threads(2)  # a new thread starts from OpenMP's default count
        entered.wait()
        seen["other"] = torch.get_num_threads()
        release.set()

    worker = threading.Thread(target=other)
    worker.start()
    with openmp.serial_torch_ops():
        entered.set()
        release.wait(timeout=30)
    worker.join()
    assert seen == {"other": 2}


@pytest.mark.parametrize("search", ["nearest_code", "nearest_codes"])
def test_duplicate_code_probe_runs_on_one_thread(two_threads, monkeypatch, search):
    import fastvq.ops.search as search_front
    import fastvq.ops.topk as topk_front

    front = search_front if search == "nearest_code" else topk_front
    probe = front.find_duplicate_codes
    seen = []

    def recording_probe(codebook):
        seen.append(torch.get_num_threads())
        return probe(codebook)

    monkeypatch.setattr(front, "find_duplicate_codes", recording_probe)
    z, codebook = torch.randn(30, 8), torch.randn(12, 8)
    codebook[7] = codebook[3]
    if search == "nearest_code":
        indices, _ = fastvq.nearest_code(z, codebook)
        assert not (indices == 7).any()
    else:
        indices, _ = fastvq.nearest_codes(z, codebook, 3)
    assert seen == [1]
    assert torch.get_num_threads() == 2
