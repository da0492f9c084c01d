"""fastvq.kmeans's sample (``max_points_per_centroid``): with more than ``M K`` rows the seeding and every
iteration but the last run on ``M K`` rows drawn without replacement, the last on all rows; checked against
the textbook reference (fastvq.reference.kmeans_ref) run on the same sample, on one problem, on B problems at
once, on memory-mapped data, and through the ``fastvq kmeans`` command."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastvq
from fastvq import cli, clustering
from fastvq.reference import kmeans_ref

CLUSTERS, DIM = 7, 5
POINTS = 40  # max_points_per_centroid in these tests: a sample of 280 rows


def _blobs(rows: int, seed: int = 0) -> torch.Tensor:
    """Gaussian blobs of unequal sizes, far enough apart that no row sits near a tie between two centroids."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(10, DIM, generator=generator) * 5
    picks = torch.multinomial(torch.rand(10, generator=generator) + 0.1, rows, replacement=True, generator=generator)
    return means[picks] + torch.randn(rows, DIM, generator=generator)


def _sample(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The rows kmeans draws first from its generator: POINTS * CLUSTERS of them, in row order."""
    return x[clustering._distinct_rows(x.shape[0], POINTS * CLUSTERS, generator).sort().values]


def _close(result, centroids, assignments, inertia):
    where = torch.nonzero(result.assignments != assignments).flatten()[:5].tolist()
    assert torch.equal(result.assignments, assignments), f"assignments differ at rows {where}"
    torch.testing.assert_close(result.centroids, centroids, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(result.inertia, inertia, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_iterations_run_on_the_sample_and_the_last_on_all_rows(metric):
    x = _blobs(3000)
    init = x[:CLUSTERS].clone()
    result = fastvq.kmeans(x, CLUSTERS, init=init, iters=5, tol=None, seed=3, metric=metric,
                           max_points_per_centroid=POINTS)
    sample = _sample(x, torch.Generator().manual_seed(3))
    fitted, _, sample_inertia = kmeans_ref(sample, init, 4, metric)
    centroids, assignments, last_inertia = kmeans_ref(x, fitted, 1, metric)
    # the sample's inertia is scaled to all rows; the last is all rows' own
    _close(result, centroids, assignments, torch.cat([sample_inertia * (3000 / (POINTS * CLUSTERS)), last_inertia]))
    # every row is assigned, and each centroid is the mean of all the rows assigned to it
    assert result.assignments.shape == (3000,)
    means = torch.stack([x[result.assignments == k].mean(dim=0) for k in range(CLUSTERS)])
    if metric == "cosine":
        means = torch.nn.functional.normalize(means, dim=1)
    torch.testing.assert_close(result.centroids, means, rtol=1e-5, atol=1e-5)


def test_the_drawn_seeding_draws_from_the_sample_after_it_and_repeats_under_a_seed():
    x = _blobs(3000)
    result = fastvq.kmeans(x, CLUSTERS, init="random", iters=3, tol=None, seed=5, max_points_per_centroid=POINTS)
    generator = torch.Generator().manual_seed(5)
    sample = _sample(x, generator)
    seeds = sample[torch.randperm(sample.shape[0], generator=generator)[:CLUSTERS]]
    fitted, _, sample_inertia = kmeans_ref(sample, seeds, 2)
    centroids, assignments, last_inertia = kmeans_ref(x, fitted, 1)
    _close(result, centroids, assignments, torch.cat([sample_inertia * (3000 / (POINTS * CLUSTERS)), last_inertia]))
    # the default seeding too: the same seed, the same result; another seed, another sample
    first = fastvq.kmeans(x, CLUSTERS, iters=3, seed=5, max_points_per_centroid=POINTS)
    again = fastvq.kmeans(x, CLUSTERS, iters=3, seed=5, max_points_per_centroid=POINTS)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    other = fastvq.kmeans(x, CLUSTERS, iters=3, seed=6, max_points_per_centroid=POINTS)
    assert not torch.equal(first.inertia[:-1], other.inertia[:-1])


@pytest.mark.parametrize("rows, count", [(40, 3), (100_000, 7), (10, 5), (6, 6)])
def test_sample_rows_are_distinct_uniform_and_repeatable(rows, count):
    # (40, 3) and (100 000, 7) take the draw of distinct values, (10, 5) and (6, 6) the permutation
    picks = clustering._distinct_rows(rows, count, torch.Generator().manual_seed(0))
    assert picks.dtype == torch.int64 and picks.shape == (count,)
    assert picks.unique().shape == (count,) and int(picks.min()) >= 0 and int(picks.max()) < rows
    assert torch.equal(picks, clustering._distinct_rows(rows, count, torch.Generator().manual_seed(0)))
    if rows <= 40:
        generator = torch.Generator().manual_seed(1)
        counts = torch.bincount(torch.cat([clustering._distinct_rows(rows, count, generator) for _ in range(2000)]),
                                minlength=rows).double()
        expected = 2000 * count / rows
        # each row drawn 2000 count / rows times, give or take five standard deviations
        assert float((counts - expected).abs().max()) < 5 * (expected * (1 - count / rows)) ** 0.5 + 1e-9


def test_the_default_samples_128_rows_per_cluster_only_above_that_and_with_two_iterations():
    assert clustering.MAX_POINTS_PER_CENTROID == 128
    x = _blobs(3 * 128 + 1)
    default = fastvq.kmeans(x, 3, iters=3, seed=2, tol=None)
    sampled = fastvq.kmeans(x, 3, iters=3, seed=2, tol=None, max_points_per_centroid=128)
    every_row = fastvq.kmeans(x, 3, iters=3, seed=2, tol=None, max_points_per_centroid=None)
    for a, b in zip(default, sampled):
        assert torch.equal(a, b)
    assert not torch.equal(default.inertia, every_row.inertia)
    # None runs Lloyd on all rows from the seeds the whole data gives
    seeds = clustering._seed(clustering._Shards(x, x.device, False), 3, "k-means||", "l2",
                             torch.Generator().manual_seed(2))
    _close(every_row, *kmeans_ref(x, seeds, 3))
    # no more rows than M K, or a single iteration: no sample
    for kwargs in (dict(max_points_per_centroid=129), dict(iters=1)):
        alone = {"iters": 3, **kwargs}
        plain = fastvq.kmeans(x, 3, seed=2, tol=None, **alone)
        full = fastvq.kmeans(x, 3, seed=2, tol=None, **{**alone, "max_points_per_centroid": None})
        for a, b in zip(plain, full):
            assert torch.equal(a, b), kwargs


@pytest.mark.parametrize("init", ["k-means||", "random", "given"])
def test_batched_problems_each_sample_as_alone(init):
    x = torch.stack([_blobs(1500, seed) for seed in range(3)])
    given = x[:, :CLUSTERS].clone()
    kwargs = dict(iters=12, tol=1e-3, max_points_per_centroid=POINTS)
    batched = fastvq.kmeans(x, CLUSTERS, init=given if init == "given" else init, seed=4, **kwargs)
    lengths = []
    for b in range(3):
        alone = fastvq.kmeans(x[b], CLUSTERS, init=given[b] if init == "given" else init, seed=4 + b, **kwargs)
        lengths.append(len(alone.inertia))
        assert torch.equal(batched.centroids[b], alone.centroids), f"problem {b}"
        assert torch.equal(batched.assignments[b], alone.assignments), f"problem {b}"
        assert torch.equal(batched.inertia[: lengths[-1], b], alone.inertia), f"problem {b}"
        assert bool(batched.inertia[lengths[-1]:, b].isnan().all())
    assert batched.inertia.shape == (max(lengths), 3)
    assert batched.assignments.shape == (3, 1500)


def test_memmap_samples_like_the_tensor(tmp_path):
    x = _blobs(2000)
    np.save(tmp_path / "x.npy", x.numpy())
    whole = fastvq.kmeans(x, CLUSTERS, iters=3, seed=2, max_points_per_centroid=POINTS)
    mapped = fastvq.kmeans(np.load(tmp_path / "x.npy", mmap_mode="r"), CLUSTERS, iters=3, seed=2,
                           max_points_per_centroid=POINTS)
    for a, b in zip(whole, mapped):
        assert torch.equal(a, b)


@pytest.mark.parametrize("value, expected", [("40", POINTS), ("all", None), (None, clustering.MAX_POINTS_PER_CENTROID)])
def test_command_passes_max_points_per_centroid(tmp_path, value, expected):
    x = _blobs(2000)
    data, out, labels = tmp_path / "x.npy", tmp_path / "centroids.npy", tmp_path / "labels.npy"
    np.save(data, x.numpy())
    flag = [] if value is None else ["--max-points-per-centroid", value]
    assert cli.main(["kmeans", "--data", str(data), "--k", str(CLUSTERS), "--out", str(out), "--assignments",
                     str(labels), "--iters", "3", "--seed", "1", "--no-progress", "--device", "cpu", *flag]) == 0
    result = fastvq.kmeans(x, CLUSTERS, iters=3, seed=1, max_points_per_centroid=expected)
    assert np.array_equal(np.load(out), result.centroids.numpy())
    assert np.array_equal(np.load(labels), result.assignments.numpy())


@pytest.mark.parametrize("batched", [False, True])
def test_progress_shows_the_inertia_it_returns(monkeypatch, batched):
    x = _blobs(3000)
    x = torch.stack([x, x.flip(0)]) if batched else x
    shown = []

    class Bar:
        def close(self):
            pass

    monkeypatch.setattr(clustering, "_progress_bar", lambda iters, show: Bar() if show else None)
    monkeypatch.setattr(clustering, "_report", lambda bar, inertia: shown.append(inertia))
    result = fastvq.kmeans(x, CLUSTERS, iters=4, seed=1, tol=None, progress=True, max_points_per_centroid=POINTS)
    # the sample's iterations scaled to all rows, then the last over all rows (batched: the problems' sum)
    expected = result.inertia.sum(dim=1) if batched else result.inertia
    torch.testing.assert_close(torch.tensor(shown, dtype=torch.float64), expected, rtol=1e-12, atol=0)
