"""fastvq.kmeans against the textbook reference (fastvq.reference.kmeans_ref / kmeans_plusplus_ref),
on every backend, and its contracts: seeds, re-seeding, mini-batches, memory-mapped data, bad
arguments, two gloo ranks giving what one process gives on the concatenated shards; and the
``fastvq kmeans`` command."""

from __future__ import annotations

import os
import re
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastvq
from fastvq import cli, clustering
from fastvq.reference import kmeans_plusplus_ref, kmeans_ref

CLUSTERS, DIM = 7, 5


def _blobs(rows: int = 301, centres: int = 9, seed: int = 0, offset: float = 0.0) -> torch.Tensor:
    """Gaussian blobs far enough apart that no row sits near a tie between two centroids."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(centres, DIM, generator=generator) * 4
    picks = torch.randint(centres, (rows,), generator=generator)
    return means[picks] + torch.randn(rows, DIM, generator=generator) + offset


def _assert_same_clustering(result, reference, *, rtol=1e-5):
    centroids, assignments, inertia = reference
    where = torch.nonzero(result.assignments != assignments).flatten()[:5].tolist()
    assert torch.equal(result.assignments, assignments), f"assignments differ at rows {where}"
    torch.testing.assert_close(result.centroids, centroids, rtol=rtol, atol=1e-4)
    torch.testing.assert_close(result.inertia, inertia, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_kmeans_plusplus_and_lloyd_match_the_reference(backend, metric):
    name, device = backend
    # Triton's interpreter runs a kernel launch in about a second: a tiny problem there.
    rows, clusters, iters = (61, 3, 2) if name == "triton" and device == "cpu" else (301, CLUSTERS, 4)
    x = _blobs(rows).to(device)
    result = fastvq.kmeans(x, clusters, iters=iters, init="k-means++", metric=metric, seed=3, tol=None)
    seeds = kmeans_plusplus_ref(x.cpu(), clusters, torch.Generator().manual_seed(3), metric)
    _assert_same_clustering(
        type(result)(*(t.cpu() for t in result)), kmeans_ref(x.cpu(), seeds, iters, metric)
    )


def test_data_far_from_the_origin_seeds_and_clusters_alike():
    # x + 1000: the trials' distances are taken around the data mean, so they do not cancel.
    x = _blobs(offset=1000.0)
    result = fastvq.kmeans(x, CLUSTERS, iters=3, init="k-means++", seed=5, tol=None)
    seeds = kmeans_plusplus_ref(x, CLUSTERS, torch.Generator().manual_seed(5))
    _assert_same_clustering(result, kmeans_ref(x, seeds, 3))


@pytest.mark.parametrize("empty_clusters", ["farthest", "keep"])
def test_empty_cluster_policies_match_the_reference(empty_clusters):
    x = _blobs()
    # Two centroids no row is nearest to: they start empty.
    init = torch.cat([x[:5], torch.full((2, DIM), 40.0)])
    result = fastvq.kmeans(x, CLUSTERS, iters=4, init=init, tol=None, empty_clusters=empty_clusters)
    _assert_same_clustering(result, kmeans_ref(x, init, 4, empty_clusters=empty_clusters))
    if empty_clusters == "keep":
        assert torch.equal(result.centroids[5:], init[5:])
    else:
        assert torch.bincount(result.assignments, minlength=CLUSTERS).min() > 0


def test_reseeding_never_empties_another_cluster():
    # The row farthest from its centroid is alone in its cluster: it stays, and the empty cluster
    # keeps its centroid until a row can be spared.
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [30.0, 0.0]])
    init = torch.tensor([[0.0, 0.5], [10.0, 0.0], [25.0, 0.0], [99.0, 99.0]])
    result = fastvq.kmeans(x, 4, iters=1, init=init, tol=None)
    assert torch.bincount(result.assignments, minlength=4).tolist() == [2, 1, 1, 0]
    assert torch.equal(result.centroids[3], init[3])
    _assert_same_clustering(result, kmeans_ref(x, init, 1))


def test_random_init_draws_distinct_rows_and_seeds_repeat():
    x = _blobs()
    first = fastvq.kmeans(x, CLUSTERS, init="random", iters=2, seed=11)
    again = fastvq.kmeans(x, CLUSTERS, init="random", iters=2, seed=11)
    other = fastvq.kmeans(x, CLUSTERS, init="random", iters=2, seed=12)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first.centroids, other.centroids)
    seeds = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(11))[:CLUSTERS]]
    _assert_same_clustering(first, kmeans_ref(x, seeds, 2))


def test_seed_none_follows_torch_manual_seed():
    x = _blobs()
    torch.manual_seed(4)
    first = fastvq.kmeans(x, CLUSTERS, iters=2)
    torch.manual_seed(4)
    assert torch.equal(fastvq.kmeans(x, CLUSTERS, iters=2).centroids, first.centroids)


def test_tol_stops_when_the_inertia_stops_falling():
    x = _blobs()
    converged = fastvq.kmeans(x, CLUSTERS, iters=50, seed=1, tol=0.0)
    assert len(converged.inertia) < 50
    assert converged.inertia[-1] == converged.inertia[-2]
    assert len(fastvq.kmeans(x, CLUSTERS, iters=50, seed=1, tol=None).inertia) == 50
    assert torch.all(converged.inertia[1:] <= converged.inertia[:-1] * (1 + 1e-12))


def test_memmap_and_blocks_give_the_tensor_result(tmp_path, monkeypatch):
    x = _blobs(rows=500)
    path = tmp_path / "x.npy"
    np.save(path, x.numpy())
    whole = fastvq.kmeans(x, CLUSTERS, iters=3, seed=2)
    mapped = fastvq.kmeans(np.load(path, mmap_mode="r"), CLUSTERS, iters=3, seed=2)
    for a, b in zip(whole, mapped):
        assert torch.equal(a, b)
    # Rows copied to the device in blocks (as when x is on another device): the same clustering.
    blocks = clustering._Shards.blocks
    monkeypatch.setattr(clustering._Shards, "blocks", lambda self, block_bytes=None: blocks(self, block_bytes or 700))
    blocked = fastvq.kmeans(np.load(path, mmap_mode="r"), CLUSTERS, iters=3, seed=2)
    assert torch.equal(blocked.assignments, whole.assignments)
    torch.testing.assert_close(blocked.centroids, whole.centroids, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(blocked.inertia, whole.inertia, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_cluster_like_fp32(dtype):
    x = _blobs()
    # The greedy seeding: its trials compare potentials, which the rounding of x rarely reorders, where
    # k-means|| draws from a running sum of distances that any rounding shifts (other seeds, another optimum).
    exact = fastvq.kmeans(x, CLUSTERS, iters=4, init="k-means++", seed=3, tol=None)
    result = fastvq.kmeans(x.to(dtype), CLUSTERS, iters=4, init="k-means++", seed=3, tol=None)
    assert result.centroids.dtype == torch.float32
    assert (result.assignments == exact.assignments).float().mean() > 0.99
    torch.testing.assert_close(result.inertia[-1], exact.inertia[-1], rtol=2e-2, atol=0)


def test_mini_batch_is_repeatable_and_close_to_lloyd():
    x = _blobs(rows=2000)
    full = fastvq.kmeans(x, CLUSTERS, iters=10, seed=0)
    first = fastvq.kmeans(x, CLUSTERS, iters=4, batch_size=128, seed=0)
    again = fastvq.kmeans(x, CLUSTERS, iters=4, batch_size=128, seed=0)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    indices, distances = fastvq.nearest_code(x, first.centroids)
    assert torch.equal(first.assignments, indices)
    assert distances.double().sum() < 1.1 * full.inertia[-1]


def test_mini_batch_update_is_the_running_mean():
    # batch_size = N with the rows drawn with replacement: check one step against its definition.
    x = _blobs(rows=64)
    init = x[:CLUSTERS].clone()
    result = fastvq.kmeans(x, CLUSTERS, iters=1, init=init, batch_size=64, seed=9)
    generator = torch.Generator().manual_seed(9)
    batch = x[torch.randint(64, (64,), generator=generator)]
    _, assignments, _ = kmeans_ref(batch, init, 1, empty_clusters="keep")
    counts = torch.bincount(assignments, minlength=CLUSTERS)
    means = torch.stack([batch[assignments == k].mean(0) if counts[k] else init[k] for k in range(CLUSTERS)])
    torch.testing.assert_close(result.centroids, means, rtol=1e-5, atol=1e-5)


def test_nan_data_raises():
    x = _blobs()
    x[7, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        fastvq.kmeans(x, CLUSTERS, iters=2, init=x[:CLUSTERS].nan_to_num())
    with pytest.raises(ValueError, match="NaN or infinite"):
        fastvq.kmeans(x, CLUSTERS, iters=2, init="random", seed=0, tol=1e-4)


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        ((torch.zeros(10),), {}, ValueError, r"x must be 2-D \[N, D\] \(or 3-D \[B, N, D\].*got shape \(10,\)"),
        ((torch.zeros(2, 2, 10, 3),), {}, ValueError, r"x must be 2-D .* got shape \(2, 2, 10, 3\)"),
        ((torch.zeros(2, 10, 3), 11), {}, ValueError, r"draws 11 distinct rows of each problem, but x has 10 rows"),
        ((torch.zeros(0, 10, 3), 2), {}, ValueError, r"at least one problem \(B >= 1\), got shape \(0, 10, 3\)"),
        ((torch.zeros(2, 10, 3), 2), {"init": torch.zeros(2, 3)}, ValueError, r"init must have shape \(2, 2, 3\)"),
        ((torch.zeros(2, 10, 3), 2), {"batch_size": 4}, ValueError, r"batch_size .* takes one \[N, D\] problem"),
        ((torch.zeros(10, 3, dtype=torch.int64),), {}, TypeError, "x must be a floating-point tensor"),
        ((np.zeros((10, 3), dtype=np.int32),), {}, TypeError, "numpy array of dtype int32"),
        (([[1.0, 2.0]],), {}, TypeError, "x must be a torch.Tensor or a numpy array, got list"),
        ((torch.zeros(10, 0),), {}, ValueError, "D >= 1"),
        ((torch.zeros(10, 3), 0), {}, ValueError, "num_clusters must be >= 1"),
        ((torch.zeros(10, 3), 2.0), {}, TypeError, "num_clusters must be an int"),
        ((torch.zeros(10, 3), 11), {}, ValueError, r"draws 11 distinct rows, but x has 10 rows \(shape \(10, 3\)\)"),
        ((torch.zeros(10, 3), 2), {"iters": 0}, ValueError, "iters must be >= 1"),
        ((torch.zeros(10, 3), 2), {"metric": "dot"}, ValueError, "metric must be one of"),
        ((torch.zeros(10, 3), 2), {"init": "kmeans"}, ValueError, "init must be one of"),
        ((torch.zeros(10, 3), 2), {"init": [[0.0]]}, TypeError, "init must be one of"),
        ((torch.zeros(10, 3), 2), {"init": torch.zeros(3, 3)}, ValueError, r"init must have shape \(2, 3\)"),
        ((torch.zeros(10, 3), 2), {"init": torch.full((2, 3), float("inf"))}, ValueError, "init must hold finite"),
        ((torch.zeros(10, 3), 2), {"tol": -1.0}, ValueError, "tol must be a finite float >= 0"),
        ((torch.zeros(10, 3), 2), {"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ((torch.zeros(10, 3), 2), {"seed": 1.5}, TypeError, "seed must be an int"),
        ((torch.zeros(10, 3), 2), {"empty_clusters": "drop"}, ValueError, "empty_clusters must be one of"),
        ((torch.zeros(10, 3), 2), {"max_points_per_centroid": 0}, ValueError, "max_points_per_centroid must be >= 1"),
        ((torch.zeros(10, 3), 2), {"max_points_per_centroid": 2.0}, TypeError, "max_points_per_centroid must be an"),
    ],
)
def test_bad_arguments_are_named(args, kwargs, error, message):
    if len(args) == 1:
        args = (*args, 2)
    with pytest.raises(error, match=message):
        fastvq.kmeans(*args, **kwargs)


# --------------------------------------------------------------------------- torch.distributed

SHARD_CASES = {
    "k-means++": dict(init="k-means++", iters=4, seed=5, tol=None),
    "k-means||": dict(init="k-means||", iters=3, seed=8, tol=None),
    "random-cosine": dict(init="random", metric="cosine", iters=3, seed=6, tol=None),
    "farthest": dict(iters=3, tol=None),  # init: two far centroids that start empty
    "mini-batch": dict(init="k-means++", iters=2, batch_size=64, seed=7),
    "sampled": dict(iters=3, seed=9, tol=None, max_points_per_centroid=20),  # 140 of the 301 rows, then all
}
SPLITS = {"uneven": 120, "rank1-empty": 301}


def _case_kwargs(name: str, x: torch.Tensor) -> dict:
    kwargs = dict(SHARD_CASES[name])
    if name == "farthest":
        kwargs["init"] = torch.cat([x[:5], torch.full((2, DIM), 40.0)])
    return kwargs


def _shard_worker(rank, world, store, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        x = _blobs()
        results = {}
        for split_name, split in SPLITS.items():
            shard = x[:split] if rank == 0 else x[split:]
            for name in SHARD_CASES:
                # sizes not known in advance: the init sample and draws must come from global rows
                results[split_name, name] = tuple(fastvq.kmeans(shard.clone(), CLUSTERS, **_case_kwargs(name, x)))
        torch.save(results, os.path.join(out_dir, f"kmeans-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see tests/app/test_distributed.py: gloo ranks of torch 2.13 can abort in teardown


def test_two_ranks_give_the_one_process_result(tmp_path):
    mp.spawn(_shard_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"kmeans-rank{rank}.pt") for rank in range(2)]
    x = _blobs()
    for name in SHARD_CASES:
        whole = fastvq.kmeans(x, CLUSTERS, **_case_kwargs(name, x))
        for split_name in SPLITS:
            first, second = ranks[0][split_name, name], ranks[1][split_name, name]
            label = f"{name}, {split_name} shards"
            assert torch.equal(first[0], second[0]), f"{label}: the ranks' centroids differ"
            assert torch.equal(first[2], second[2]), f"{label}: the ranks' inertia differs"
            assignments = torch.cat([first[1], second[1]])
            assert torch.equal(assignments, whole.assignments), f"{label}: assignments differ from one process"
            torch.testing.assert_close(first[0], whole.centroids, rtol=1e-5, atol=1e-5, msg=label)
            torch.testing.assert_close(first[2], whole.inertia, rtol=1e-6, atol=0, msg=label)


# --------------------------------------------------------------------------- the fastvq kmeans command


def _write(path, x):
    if path.suffix == ".npy":
        np.save(path, x.numpy())
    elif path.suffix == ".pt":
        torch.save({"features": x}, path)
    else:
        from safetensors.torch import save_file

        save_file({"features": x}, str(path))


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".safetensors"])
def test_command_writes_the_centroids_of_fastvq_kmeans(tmp_path, capsys, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    x = _blobs()
    data = tmp_path / f"x{suffix}"
    # [3, N / 3, D]: the rows of every leading index are clustered together.
    _write(data, x[:300].reshape(3, 100, DIM))
    out, labels = tmp_path / "out" / "centroids.npy", tmp_path / "labels.npy"
    status = cli.main(["kmeans", "--data", str(data), "--k", str(CLUSTERS), "--out", str(out), "--assignments",
                       str(labels), "--iters", "5", "--seed", "3", "--device", "cpu", "--no-progress"])
    assert status == 0
    expected = fastvq.kmeans(x[:300], CLUSTERS, iters=5, seed=3)
    assert np.array_equal(np.load(out), expected.centroids.numpy())
    assert np.array_equal(np.load(labels), expected.assignments.numpy())
    assert f"k-means: {CLUSTERS} clusters of 300 rows x {DIM}" in capsys.readouterr().out


def test_command_batched_clusters_each_problem_of_a_3d_array(tmp_path, capsys):
    x = _problems(3, 100)
    data, out, labels = tmp_path / "x.npy", tmp_path / "centroids.npy", tmp_path / "labels.npy"
    np.save(data, x.numpy())
    status = cli.main(["kmeans", "--data", str(data), "--k", str(CLUSTERS), "--out", str(out), "--assignments",
                       str(labels), "--iters", "5", "--seed", "3", "--device", "cpu", "--no-progress", "--batched"])
    assert status == 0
    expected = fastvq.kmeans(x, CLUSTERS, iters=5, seed=3)
    assert np.load(out).shape == (3, CLUSTERS, DIM) and np.load(labels).shape == (3, 100)
    assert np.array_equal(np.load(out), expected.centroids.numpy())
    assert np.array_equal(np.load(labels), expected.assignments.numpy())
    assert f"k-means: {CLUSTERS} clusters of 3 problems of 100 rows x {DIM}" in capsys.readouterr().out
    # without --batched the same file is 300 rows of one problem, as before
    assert cli.main(["kmeans", "--data", str(data), "--k", str(CLUSTERS), "--out", str(out), "--iters", "2",
                     "--no-progress"]) == 0
    assert np.load(out).shape == (CLUSTERS, DIM)
    np.save(data, x[0].numpy())
    assert cli.main(["kmeans", "--data", str(data), "--k", "2", "--out", str(out), "--no-progress", "--batched"]) == 2
    assert re.search(r"fastvq kmeans: error: .*--batched needs B problems of rows: \[B, N, D\]",
                     capsys.readouterr().err)


@pytest.mark.parametrize(
    "name, content, extra, message",
    [
        ("x.npy", b"not an array", [], "cannot read .*x.npy"),
        ("absent.npy", None, [], "cannot read .*absent.npy: FileNotFoundError"),
        ("x.csv", b"1,2\n", [], "--data must be a .npy, .pt or .safetensors file"),
        ("x.pt", "two", [], r"holds 2 tensors \(a, b\): choose one with --key"),
        ("x.pt", "two", ["--key", "c"], "has no tensor 'c'"),
        ("x.npy", "vector", [], r"shape \(10,\); k-means needs rows"),
        ("x.npy", "ints", [], "float16, float32 or float64 values, got a numpy array of dtype int64"),
        ("x.npy", "few", [], "draws 3 distinct rows, but x has 2 rows"),
    ],
)
def test_command_errors_are_messages(tmp_path, capsys, name, content, extra, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "two":
        torch.save({"a": torch.zeros(4, 2), "b": torch.zeros(4, 2)}, path)
    elif content is not None:
        array = {"vector": np.zeros(10, np.float32), "ints": np.zeros((4, 2), np.int64),
                 "few": np.zeros((2, 2), np.float32)}[content]
        np.save(path, array)
    status = cli.main(["kmeans", "--data", str(path), "--k", "3", "--out", str(tmp_path / "c.npy"), "--no-progress",
                       *extra])
    assert status == 2
    assert re.search(f"fastvq kmeans: error: .*{message}", capsys.readouterr().err)
    assert not (tmp_path / "c.npy").exists()


# --------------------------------------------------------------------------- the k-means|| seeding


def _clustered(rows: int, centres: int, seed: int, dim: int = 8) -> torch.Tensor:
    """Blobs of unequal sizes and spreads: a seeding that misses small blobs pays for it in the inertia."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(centres, dim, generator=generator) * 6
    sizes = torch.rand(centres, generator=generator) + 0.05
    picks = torch.multinomial(sizes, rows, replacement=True, generator=generator)
    spread = 0.3 + torch.rand(centres, 1, generator=generator)
    return means[picks] + torch.randn(rows, dim, generator=generator) * spread[picks]


def test_kmeans_parallel_is_the_default_and_seeds_as_well_as_greedy_kmeans_plusplus():
    # 6000 rows, K = 40: a 2560-row sample, 161 candidates from two oversampling rounds.
    ratios, random_ratios = [], []
    for seed in range(3):
        x = _clustered(6000, 40, seed)
        default = fastvq.kmeans(x, 40, iters=3, seed=seed, tol=None)
        parallel = fastvq.kmeans(x, 40, iters=3, init="k-means||", seed=seed, tol=None)
        assert torch.equal(default.centroids, parallel.centroids)
        greedy = fastvq.kmeans(x, 40, iters=3, init="k-means++", seed=seed, tol=None)
        drawn = fastvq.kmeans(x, 40, iters=3, init="random", seed=seed, tol=None)
        ratios.append(float(parallel.inertia[-1] / greedy.inertia[-1]))
        random_ratios.append(float(drawn.inertia[-1] / greedy.inertia[-1]))
    assert sum(ratios) / 3 < 1.03, ratios
    # The data is hard enough that a careless seeding shows: uniform seeds end far above.
    assert sum(random_ratios) / 3 > 1.1, random_ratios


def test_kmeans_parallel_scores_the_sample_with_the_fused_search_only(monkeypatch):
    x = _clustered(6000, 40, 0)
    searched = []
    original = clustering.nearest_code_batched

    def recording(rows, codes, *, metric):
        searched.append((tuple(rows.shape), tuple(codes.shape)))
        return original(rows, codes, metric=metric)

    monkeypatch.setattr(clustering, "nearest_code_batched", recording)
    centroids = clustering._seed(clustering._Shards(x, x.device, False), 40, "k-means||", "l2",
                                 torch.Generator().manual_seed(0))
    sample = clustering.PARALLEL_SAMPLE_PER_CLUSTER * 40
    per_round = clustering.PARALLEL_OVERSAMPLING * 40
    candidates = 1 + clustering.PARALLEL_ROUNDS * per_round
    # the first row, each round's draws, the weighting pass; then the candidates against the first seed
    assert searched == [((1, sample, 8), (1, 1, 8))] + [((1, sample, 8), (1, per_round, 8))] * 2 + [
        ((1, sample, 8), (1, candidates, 8)), ((1, candidates, 8), (1, 1, 8))]
    assert centroids.shape == (40, 8)
    # every seed is a row of x
    assert bool((centroids[:, None] == x[None]).all(dim=2).any(dim=1).all())


# --------------------------------------------------------------------------- B problems at once


def _problems(count: int = 3, rows: int = 400) -> torch.Tensor:
    return torch.stack([_clustered(rows, 12, seed, dim=DIM) for seed in range(count)])


@pytest.mark.parametrize("init", ["k-means||", "random", "k-means++"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_batched_kmeans_is_each_problem_clustered_alone(init, metric):
    x = _problems()
    # tol: the problems stop after different numbers of iterations
    batched = fastvq.kmeans(x, CLUSTERS, iters=12, init=init, metric=metric, seed=4, tol=1e-3)
    assert batched.centroids.shape == (3, CLUSTERS, DIM) and batched.assignments.shape == (3, 400)
    lengths = []
    for b in range(3):
        alone = fastvq.kmeans(x[b], CLUSTERS, iters=12, init=init, metric=metric, seed=4 + b, tol=1e-3)
        lengths.append(len(alone.inertia))
        assert torch.equal(batched.centroids[b], alone.centroids), f"problem {b}"
        assert torch.equal(batched.assignments[b], alone.assignments), f"problem {b}"
        assert torch.equal(batched.inertia[: lengths[-1], b], alone.inertia), f"problem {b}"
        assert bool(batched.inertia[lengths[-1] :, b].isnan().all())
    assert batched.inertia.shape == (max(lengths), 3)


def test_batched_kmeans_reseeds_empty_clusters_per_problem():
    x = _problems(2, 200)
    # problem 1 starts with two centroids far away from every row: they lose all their rows
    init = torch.stack([x[0, :CLUSTERS], torch.cat([x[1, :5], torch.full((2, DIM), 40.0)])])
    batched = fastvq.kmeans(x, CLUSTERS, iters=3, init=init, tol=None)
    for b in range(2):
        alone = fastvq.kmeans(x[b], CLUSTERS, iters=3, init=init[b], tol=None)
        assert torch.equal(batched.centroids[b], alone.centroids)
        assert torch.equal(batched.assignments[b], alone.assignments)
    assert bool((batched.centroids[1].abs() < 30).all())  # the far ones moved onto rows


def test_batched_kmeans_on_the_pytorch_path_is_each_problem_alone(monkeypatch):
    monkeypatch.setenv("FASTVQ_BACKEND", "torch")
    x = _problems(2, 300)
    batched = fastvq.kmeans(x, CLUSTERS, iters=3, seed=1, tol=None)
    for b in range(2):
        alone = fastvq.kmeans(x[b], CLUSTERS, iters=3, seed=1 + b, tol=None)
        assert torch.equal(batched.assignments[b], alone.assignments)
        torch.testing.assert_close(batched.centroids[b], alone.centroids, rtol=1e-5, atol=1e-5)


def test_batched_kmeans_runs_one_search_and_one_segment_sum_per_iteration(monkeypatch):
    x = _problems(4, 100)
    calls = []
    for name in ("nearest_code_batched", "segment_reduce", "nearest_code"):
        original = getattr(clustering, name)
        monkeypatch.setattr(clustering, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    fastvq.kmeans(x, CLUSTERS, iters=5, init=x[:, :CLUSTERS].clone(), tol=None)
    assert calls == ["nearest_code_batched", "segment_reduce"] * 5
