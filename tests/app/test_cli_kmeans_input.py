"""``fastvq kmeans`` on inputs that used to end in a traceback (issue 23, R13) or a wrong refusal
(R14): each is a ``fastvq kmeans: error:`` line with exit status 2, or, for a big-endian file, the
same centroids as the native file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastvq import cli


def kmeans(tmp_path, data, *extra) -> int:
    return cli.main(["kmeans", "--data", str(data), "--k", "2", "--out", str(tmp_path / "c.npy"), "--iters", "3",
                     "--no-progress", *extra])


def error_of(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("fastvq kmeans: error: "), err
    assert "Traceback" not in err
    return err


@pytest.fixture
def rows(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).random((20, 3), dtype=np.float32))
    return path


@pytest.mark.parametrize("device, message", [
    ("bogus", "--device must be auto, cpu, cuda or cuda:N, got 'bogus'"),
    ("cuda:x", "--device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    pytest.param("cuda", "--device cuda was asked for, but PyTorch sees no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")),
    ("cuda:99", None),
])
def test_a_bad_device_is_an_error(tmp_path, capsys, rows, device, message):
    if message is None:  # an index past the last device, or no CUDA at all
        message = "PyTorch sees"
    assert kmeans(tmp_path, rows, "--device", device) == 2
    assert message in error_of(capsys)


def test_rows_of_no_values_are_an_error(tmp_path, capsys):
    path = tmp_path / "empty.npy"
    np.save(path, np.zeros((5, 0), np.float32))
    assert kmeans(tmp_path, path) == 2
    assert "holds an array of shape (5, 0): its rows have no values (D = 0)" in error_of(capsys)


@pytest.mark.parametrize("stored", ["tensor", "dict"])
def test_a_sparse_tensor_is_an_error(tmp_path, capsys, stored):
    path = tmp_path / "sparse.pt"
    sparse = torch.eye(6, 3).to_sparse()
    torch.save(sparse if stored == "tensor" else {"features": sparse}, path)
    assert kmeans(tmp_path, path) == 2
    assert "holds a torch.sparse_coo tensor; k-means reads dense rows" in error_of(capsys)


def test_a_big_endian_float32_file_is_clustered_as_the_native_one(tmp_path, capsys, rows):
    big = tmp_path / "big.npy"
    np.save(big, np.load(rows).astype(">f4"))
    assert kmeans(tmp_path, rows, "--seed", "1") == 0
    native = np.load(tmp_path / "c.npy")
    assert kmeans(tmp_path, big, "--seed", "1") == 0
    assert np.array_equal(np.load(tmp_path / "c.npy"), native)
