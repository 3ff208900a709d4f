"""Greedy k-center coreset: the fast selection must equal the textbook loop, index for index."""

from __future__ import annotations

import numpy as np
import pytest

from anomalyqc.stats.coreset import _greedy_coreset, greedy_coreset, naive_greedy_coreset


def _blobs(n_points: int = 3000, d: int = 16, seed: int = 0) -> np.ndarray:
    """Clustered data like patch embeddings: a few dense groups, scales from 0.05 to 2."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, d)) * 6
    scale = np.geomspace(0.05, 2.0, 12)
    label = rng.integers(12, size=n_points)
    x = centres[label] + rng.standard_normal((n_points, d)) * scale[label, None]
    x[:50] += 40.0  # a far-away outlier group
    return x.astype(np.float32)


def _duplicates(seed: int = 0) -> np.ndarray:
    """Only 40 distinct points, each repeated (background patches are often identical)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((40, 8)).astype(np.float32)
    return base[rng.integers(40, size=600)]


# small candidate sets and early rebuilds so small data goes through every code path
SMALL = dict(candidates=32, builds=(4, 16, 64, 256))


@pytest.mark.parametrize("make,n", [
    (lambda: _blobs(), 400),
    (lambda: _blobs(seed=1, d=64), 700),
    (lambda: np.random.default_rng(2).standard_normal((2500, 32)).astype(np.float32), 300),
    (lambda: np.random.default_rng(3).uniform(size=(1500, 3)).astype(np.float32), 500),
])
@pytest.mark.parametrize("params", [SMALL, {}], ids=["small-params", "defaults"])
def test_matches_naive(make, n, params):
    x = make()
    ref = naive_greedy_coreset(x, n, seed=5)
    got = _greedy_coreset(x, n, seed=5, **params)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, ref)


def test_duplicates_ties_and_exhaustion():
    x = _duplicates()
    for n in (30, 40, 100):  # fewer, as many and more centres than distinct points
        ref = naive_greedy_coreset(x, n, seed=1)
        got = _greedy_coreset(x, n, seed=1, **SMALL)
        np.testing.assert_array_equal(got, ref)
        assert len(set(got.tolist())) == n


def test_public_function_on_structured_data():
    x = _blobs(seed=4)
    np.testing.assert_array_equal(greedy_coreset(x, 250, seed=9), naive_greedy_coreset(x, 250, 9))


def test_float64_and_noncontiguous_input():
    x = _blobs(seed=6, d=24).astype(np.float64)[:, ::2]
    np.testing.assert_array_equal(greedy_coreset(x, 200, seed=2), naive_greedy_coreset(x, 200, 2))


def test_n_at_least_total_returns_everything():
    x = _blobs(100)
    np.testing.assert_array_equal(greedy_coreset(x, 100), np.arange(100))
    np.testing.assert_array_equal(greedy_coreset(x, 500), np.arange(100))


def test_single_centre_is_the_seeded_draw():
    x = _blobs(1000)
    for seed in (0, 1, 7):
        expected = np.random.default_rng(seed).integers(1000)
        np.testing.assert_array_equal(greedy_coreset(x, 1, seed=seed), [expected])
    with pytest.raises(ValueError):
        greedy_coreset(x, 0)


def test_seed_determinism():
    x = _blobs(2000)
    a = greedy_coreset(x, 300, seed=3)
    np.testing.assert_array_equal(a, greedy_coreset(x.copy(), 300, seed=3))
    assert a[0] == np.random.default_rng(3).integers(2000)
    b = greedy_coreset(x, 300, seed=4)
    assert b[0] == np.random.default_rng(4).integers(2000) and b[0] != a[0]


def test_lattice_exact_ties_break_to_lowest_index():
    # integer grid points: distances tie exactly all the time
    rng = np.random.default_rng(11)
    x = rng.integers(0, 6, size=(1200, 3)).astype(np.float32)
    for params in (SMALL, {}):
        for n in (50, 150):
            np.testing.assert_array_equal(_greedy_coreset(x, n, seed=2, **params),
                                          naive_greedy_coreset(x, n, seed=2))


def test_far_offset_data_stays_exact():
    # a far-away offset makes |x|^2 huge next to the distances (float32 cancellation)
    rng = np.random.default_rng(12)
    x = (rng.standard_normal((1500, 8)) * np.geomspace(1e-2, 1.0, 8) + 300.0).astype(np.float32)
    np.testing.assert_array_equal(_greedy_coreset(x, 400, seed=0, **SMALL),
                                  naive_greedy_coreset(x, 400, seed=0))


def test_structure_is_exploited():
    # regression guard for speed: on clustered data most of the N x n work is skipped
    x = _blobs(20000, d=16, seed=13)
    stats: dict = {}
    _greedy_coreset(x, 2000, seed=0, stats=stats)
    assert stats["gemm_flop"] < 0.25 * 2 * 20000 * 16 * 2000
    assert stats["batches"] < 200


def test_progress_reports_monotone_and_complete():
    x = _blobs(2000)
    seen: list[int] = []
    greedy_coreset(x, 300, progress=seen.append)
    assert seen and seen[-1] == 300
    assert all(a <= b for a, b in zip(seen, seen[1:]))


def test_covering_radius_property():
    # farthest-point sampling: the k-th pick is at least as far as any later covering radius
    x = _blobs(1500, seed=8)
    idx = greedy_coreset(x, 200, seed=0)
    d = np.sqrt(((x[:, None, :] - x[idx][None, :, :]) ** 2).sum(-1, dtype=np.float64))
    radius = d.min(axis=1).max()
    pick_dist = [d[idx[k], :k].min() for k in range(1, 200)]
    assert min(pick_dist) >= radius * (1 - 1e-5)
