"""Tests for anomalyqc.stats (moments, whitening, K-Means, local coreset, projections, kNN).

Everything is checked against plain numpy / naive loops on small random data; no backbone.
(stats/coreset.py has its own tests.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anomalyqc.stats.kmeans import OnlineKMeans, kmeans_plus_plus, lloyd, pairwise_sqdist
from anomalyqc.stats.knn import NearestNeighbour
from anomalyqc.stats.local_coreset import local_farthest_points
from anomalyqc.stats.moments import OnlineMoments
from anomalyqc.stats.projection import gaussian_random_matrix, pca_matrix, sparse_random_matrix
from anomalyqc.stats.whitening import cholesky, whiten

P, D = 5, 4  # grid locations, embedding dimension


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_cov(d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    a = torch.randn(d, d, generator=gen(seed), dtype=dtype)
    return a @ a.T + 0.5 * torch.eye(d, dtype=dtype)


def correlated(n: int, p: int, d: int, seed: int, offset: float = 1000.0,
               scale: float = 1.0) -> torch.Tensor:
    """(n, p, d) float32 samples: offset + a different correlated Gaussian at each location."""
    g = gen(seed)
    mix = torch.randn(p, d, d, generator=g) * 0.7 + torch.eye(d)
    centre = offset + torch.randn(p, d, generator=g)
    z = torch.randn(n, p, d, generator=g)
    return (centre + scale * torch.einsum("npd,pde->npe", z, mix)).float()


def fit_moments(x: torch.Tensor, batch: int = 7) -> OnlineMoments:
    m = OnlineMoments(x.shape[1], x.shape[2])
    for chunk in x.split(batch):
        m.update(chunk)
    return m


def np_mean_cov(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Exact (float64) mean and unbiased covariance per location of the float32 samples."""
    a = x.double().numpy()
    mean = a.mean(axis=0)
    cov = np.stack([np.cov(a[:, p, :], rowvar=False, ddof=1) for p in range(a.shape[1])])
    return mean, cov


# ==================================================================================== moments


def test_moments_match_numpy_with_large_offset():
    x = correlated(61, P, D, seed=0)  # values ~ 1000 + O(1): cancellation-prone if naive
    m = fit_moments(x, batch=7)  # batches of 7 and a last one of 5
    mean, cov = np_mean_cov(x)
    assert m.count == 61
    assert m.mean().dtype == torch.float64
    np.testing.assert_allclose(m.mean().numpy(), mean, rtol=1e-7, atol=0)
    np.testing.assert_allclose(m.covariance().numpy(), cov, rtol=1e-5, atol=1e-5)
    # eps goes on the diagonal only, and does not change the stored moments
    eps = 0.37
    diff = m.covariance(eps).numpy() - cov
    np.testing.assert_allclose(diff, np.broadcast_to(eps * np.eye(D), cov.shape), atol=1e-5)
    np.testing.assert_allclose(m.covariance().numpy(), cov, rtol=1e-5, atol=1e-5)


def test_moments_small_variance_at_large_offset():
    """Variance 1e-4 at offset 1e3: the naive float32 E[xx^T] - mm^T would lose it all."""
    x = correlated(40, 2, 3, seed=1, offset=1000.0, scale=0.01)  # variance ~1e-4 at 1e3
    _, cov = np_mean_cov(x)
    m = fit_moments(x, batch=8)
    np.testing.assert_allclose(m.covariance().numpy(), cov, rtol=1e-3, atol=1e-9)


def test_covariance_location_slice_matches_full():
    x = correlated(30, 7, D, seed=2)
    m = fit_moments(x)
    full = m.covariance(0.1)
    assert torch.equal(m.covariance(0.1, slice(2, 5)), full[2:5])
    assert m.covariance(0.1, slice(6, 99)).shape == (1, D, D)


@pytest.mark.parametrize("split", [1, 13, 29])
def test_merge_equals_fitting_both_shards(split):
    x = correlated(40, P, D, seed=3)
    a, b = x[:split], x[split:]
    joint = fit_moments(x, batch=5)
    merged = fit_moments(a, batch=5).merge(fit_moments(b, batch=5))
    assert merged.count == 40
    np.testing.assert_allclose(merged.mean().numpy(), joint.mean().numpy(), rtol=1e-7)
    _, cov = np_mean_cov(x)
    np.testing.assert_allclose(merged.covariance().numpy(), cov, rtol=1e-5, atol=5e-6)
    np.testing.assert_allclose(merged.covariance().numpy(), joint.covariance().numpy(),
                               rtol=1e-5, atol=5e-6)


def test_merge_into_empty_and_of_empty():
    x = correlated(25, P, D, seed=4)
    full = fit_moments(x)
    into_empty = OnlineMoments(P, D).merge(fit_moments(x))
    assert into_empty.count == 25
    assert torch.equal(into_empty.mean(), full.mean())
    assert torch.equal(into_empty.covariance(), full.covariance())
    with_empty = fit_moments(x).merge(OnlineMoments(P, D))
    assert with_empty.count == 25
    assert torch.equal(with_empty.mean(), full.mean())
    assert torch.equal(with_empty.covariance(), full.covariance())


def test_merge_shards_with_very_different_shifts_algebra():
    """Shards centred 1000 and 1040 apart (each keeps its own shift): the re-expression of
    one shard about the other's shift must reproduce the pooled mean and covariance."""
    a = correlated(30, P, D, seed=5, offset=1000.0)
    b = correlated(20, P, D, seed=6, offset=1040.0, scale=2.0)
    ma, mb = fit_moments(a), fit_moments(b)
    assert not torch.allclose(ma.shift, mb.shift, atol=10)  # the shifts really differ
    merged = ma.merge(mb)
    mean, cov = np_mean_cov(torch.cat([a, b]))
    np.testing.assert_allclose(merged.mean().numpy(), mean, rtol=1e-7)
    # between-shard variance ~400 dominates: a wrong cross term would be off by O(100)
    np.testing.assert_allclose(merged.covariance().numpy(), cov, rtol=1e-4, atol=1e-3)


def test_merge_with_different_shifts_is_as_accurate_as_a_single_fit():
    a = correlated(30, P, D, seed=5, offset=1000.0)
    b = correlated(20, P, D, seed=6, offset=1040.0, scale=2.0)
    _, cov = np_mean_cov(torch.cat([a, b]))
    merged = fit_moments(a).merge(fit_moments(b))
    np.testing.assert_allclose(merged.covariance().numpy(), cov, rtol=0, atol=1e-5)


def test_mean_of_float32_data_is_float64_accurate():
    x = correlated(40, P, D, seed=7)
    mean, _ = np_mean_cov(x)
    np.testing.assert_allclose(fit_moments(x).mean().numpy(), mean, rtol=0, atol=1e-7)


def test_pooled_equals_numpy_over_all_locations():
    # locations with clearly different means, so pooling adds between-location spread
    x = correlated(33, 6, D, seed=8, offset=1000.0)
    x = x + 3.0 * torch.arange(6, dtype=torch.float32).view(1, 6, 1)
    m = fit_moments(x)
    pooled = m.pooled()
    allx = x.double().reshape(-1, D).numpy()
    assert pooled.locations == 1 and pooled.count == 33 * 6
    np.testing.assert_allclose(pooled.mean()[0].numpy(), allx.mean(0), rtol=1e-7)
    np.testing.assert_allclose(pooled.covariance()[0].numpy(), np.cov(allx, rowvar=False),
                               rtol=1e-4, atol=1e-4)
    # pooling does not touch the per-location moments
    assert m.locations == 6 and m.count == 33


def test_state_roundtrip_is_exact_and_independent():
    m = fit_moments(correlated(20, P, D, seed=9))
    state = m.state("pfx")
    assert set(state) == {"pfx.count", "pfx.shift", "pfx.sum", "pfx.outer"}
    back = OnlineMoments.from_state(state, "pfx")
    assert back.count == m.count
    assert torch.equal(back.mean(), m.mean())
    assert torch.equal(back.covariance(0.01), m.covariance(0.01))
    back.update(correlated(3, P, D, seed=10))  # the copy owns its tensors
    assert back.count == 23 and m.count == 20
    assert torch.equal(OnlineMoments.from_state(state, "pfx").covariance(), m.covariance())


def test_moments_refuse_bad_input():
    m = OnlineMoments(P, D)
    with pytest.raises(ValueError, match=r"\(B, 5, 4\)"):
        m.update(torch.zeros(2, P, D + 1))
    with pytest.raises(ValueError):
        m.update(torch.zeros(P, D))
    with pytest.raises(ValueError, match="at least 1"):
        m.mean()
    m.update(torch.zeros(1, P, D))
    with pytest.raises(ValueError, match="at least 2"):
        m.covariance()
    with pytest.raises(ValueError, match="cannot merge"):
        m.merge(OnlineMoments(P + 1, D))


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_moments_cholesky_matches_torch(chunk):
    m = fit_moments(correlated(30, 7, D, seed=11, offset=10.0))
    eps = 0.05
    ref = torch.linalg.cholesky(m.covariance(eps))
    got = m.cholesky(eps, chunk=chunk)
    assert got.shape == (7, D, D) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref.float(), rtol=1e-6, atol=1e-6)
    # eps really regularises: a rank-deficient (n < D) location still factorises
    few = fit_moments(correlated(3, 2, 6, seed=12), batch=3)
    lf = few.cholesky(0.01)
    assert torch.isfinite(lf).all()
    torch.testing.assert_close((lf.double() @ lf.double().transpose(1, 2)),
                               few.covariance(0.01), rtol=1e-5, atol=1e-5)


# ================================================================================== whitening


def np_mahalanobis(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """x (P, N, D), mean (P|1, D), cov (P|1, D, D) -> (P, N), with an explicit inverse."""
    out = np.empty(x.shape[:2])
    for p in range(x.shape[0]):
        c = cov[p if cov.shape[0] > 1 else 0]
        mu = mean[p if mean.shape[0] > 1 else 0]
        inv = np.linalg.inv(c)
        diff = x[p] - mu
        out[p] = np.sqrt(np.einsum("nd,de,ne->n", diff, inv, diff))
    return out


def test_whiten_norm_is_mahalanobis_local():
    covs = torch.stack([random_cov(D, s) for s in range(P)])
    mean = torch.randn(P, D, generator=gen(1), dtype=torch.float64)
    x = torch.randn(P, 9, D, generator=gen(2), dtype=torch.float64) * 3
    chol = torch.linalg.cholesky(covs)
    z = whiten(x, mean, chol)
    assert z.shape == x.shape
    np.testing.assert_allclose(z.norm(dim=-1).numpy(),
                               np_mahalanobis(x.numpy(), mean.numpy(), covs.numpy()), rtol=1e-10)
    # z solves L z = x - mu, and Euclidean distances between whitened points are Mahalanobis
    torch.testing.assert_close(z @ chol.transpose(1, 2), x - mean.unsqueeze(1))
    d_white = (z[:, 0] - z[:, 1]).norm(dim=-1).numpy()
    d_maha = np_mahalanobis(x[:, :1].numpy(), x[:, 1].numpy(), covs.numpy())[:, 0]
    np.testing.assert_allclose(d_white, d_maha, rtol=1e-10)


@pytest.mark.parametrize("mean_rows", [1, P])
def test_whiten_with_one_global_factor(mean_rows):
    cov = random_cov(D, 3)
    mean = torch.randn(mean_rows, D, generator=gen(4), dtype=torch.float64)
    x = torch.randn(P, 6, D, generator=gen(5), dtype=torch.float64)
    chol = torch.linalg.cholesky(cov).unsqueeze(0)  # (1, D, D)
    z = whiten(x, mean, chol)
    assert z.shape == x.shape
    np.testing.assert_allclose(z.norm(dim=-1).numpy(),
                               np_mahalanobis(x.numpy(), mean.numpy(), cov[None].numpy()),
                               rtol=1e-10)
    # same as giving every location its own copy of the factor (location order preserved)
    local = whiten(x, mean.expand(P, D), chol.expand(P, D, D).contiguous())
    torch.testing.assert_close(z, local)


def test_whiten_float32_is_close_to_float64():
    covs = torch.stack([random_cov(8, s) for s in range(3)])
    mean = torch.randn(3, 8, generator=gen(6), dtype=torch.float64)
    x = mean.unsqueeze(1) + torch.randn(3, 5, 8, generator=gen(7), dtype=torch.float64)
    chol = torch.linalg.cholesky(covs)
    z32 = whiten(x.float(), mean.float(), chol.float())
    z64 = whiten(x, mean, chol)
    torch.testing.assert_close(z32.double(), z64, rtol=1e-4, atol=1e-4)


def test_whiten_uses_triangular_solve_never_an_inverse(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("whitening must not form an explicit inverse")

    for name in ("inv", "inv_ex", "pinv", "solve", "solve_ex", "tensorinv"):
        monkeypatch.setattr(torch.linalg, name, forbidden)
    for name in ("inverse", "cholesky_inverse", "pinverse", "cholesky_solve"):
        monkeypatch.setattr(torch, name, forbidden)
    monkeypatch.setattr(torch.Tensor, "inverse", forbidden)
    calls = []
    real = torch.linalg.solve_triangular

    def spy(*args, **kwargs):
        calls.append(kwargs.get("upper"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "solve_triangular", spy)
    covs = torch.stack([random_cov(D, s) for s in range(P)])
    chol = torch.linalg.cholesky(covs)
    x = torch.randn(P, 3, D, generator=gen(8), dtype=torch.float64)
    whiten(x, torch.zeros(P, D, dtype=torch.float64), chol)
    whiten(x, torch.zeros(1, D, dtype=torch.float64), chol[:1])
    assert calls == [False, False]  # lower-triangular solves did all the work


def test_cholesky_of_singular_psd_succeeds_with_jitter():
    v = torch.randn(6, 2, generator=gen(9), dtype=torch.float64)
    cov = v @ v.T  # rank 2 of 6: singular
    assert (torch.linalg.cholesky_ex(cov).info > 0).any()  # plain Cholesky really fails
    lf = cholesky(cov)
    assert torch.isfinite(lf).all()
    assert torch.equal(lf, lf.tril())
    scale = float(cov.diagonal().mean())
    err = (lf @ lf.T - cov).abs().max()
    assert err < 1e-3 * scale  # only a small jitter was needed


def test_cholesky_of_positive_definite_is_plain_cholesky():
    covs = torch.stack([random_cov(D, s) for s in range(3)])
    assert torch.equal(cholesky(covs), torch.linalg.cholesky(covs))


def test_cholesky_refuses_an_indefinite_matrix():
    with pytest.raises(ValueError, match="not positive definite"):
        cholesky(torch.diag(torch.tensor([1.0, -5.0, 1.0], dtype=torch.float64)))


def test_cholesky_jitter_only_touches_the_failing_matrix():
    healthy = random_cov(D, 10)
    v = torch.randn(D, 1, generator=gen(11), dtype=torch.float64)
    batch = torch.stack([healthy, v @ v.T])
    assert torch.equal(cholesky(batch)[0], torch.linalg.cholesky(healthy))


# ==================================================================================== K-Means


def blobs(p: int, k: int, per: int, d: int, seed: int, spread: float = 0.3,
          sep: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, k*per, D) points around k well-separated centres per location (shuffled)."""
    g = gen(seed)
    centres = torch.randn(p, k, d, generator=g) * sep
    # make sure centres are well apart at every location
    while pairwise_sqdist(centres, centres).add(torch.eye(k) * 1e9).min() < (sep / 2) ** 2:
        centres = torch.randn(p, k, d, generator=g) * sep
    pts = centres.repeat_interleave(per, dim=1) + spread * torch.randn(p, k * per, d, generator=g)
    perm = torch.randperm(k * per, generator=g)
    return pts[:, perm], centres


def match_error(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Largest distance from a true centre to its nearest found centre, and vice versa."""
    d = pairwise_sqdist(found.double(), truth.double()).sqrt()
    return float(max(d.amin(dim=1).max(), d.amin(dim=2).max()))


def test_pairwise_sqdist_matches_cdist():
    a = torch.randn(3, 7, 5, generator=gen(0), dtype=torch.float64)
    b = torch.randn(3, 4, 5, generator=gen(1), dtype=torch.float64)
    torch.testing.assert_close(pairwise_sqdist(a, b), torch.cdist(a, b) ** 2)
    assert (pairwise_sqdist(a, a) >= 0).all()


def test_kmeans_plus_plus_seeds_one_point_per_blob():
    pts, centres = blobs(4, 3, 20, 2, seed=2)
    idx = kmeans_plus_plus(pts, 3, gen(0))
    assert idx.shape == (4, 3)
    seeds = pts.gather(1, idx.unsqueeze(-1).expand(-1, -1, 2))
    # each seed lies in a different blob
    nearest = pairwise_sqdist(seeds, centres).argmin(-1)
    for row in nearest:
        assert sorted(row.tolist()) == [0, 1, 2]


def test_lloyd_recovers_blob_centres_per_location():
    pts, centres = blobs(3, 4, 25, 3, seed=3)
    idx = kmeans_plus_plus(pts, 4, gen(1))
    start = pts.gather(1, idx.unsqueeze(-1).expand(-1, -1, 3))
    sums, counts = lloyd(pts, start, iters=10)
    assert sums.shape == (3, 4, 3) and counts.shape == (3, 4)
    assert torch.equal(counts.sum(1), torch.full((3,), 100.0, dtype=counts.dtype))
    assert sorted(counts[0].tolist()) == [25.0] * 4
    assert match_error(sums / counts.unsqueeze(-1), centres) < 0.2


def test_lloyd_weights_equal_repeated_points():
    pts = torch.randn(1, 12, 2, generator=gen(4)) * 3
    w = torch.randint(1, 4, (1, 12), generator=gen(5)).double()
    start = pts[:, :3].double()
    sums_w, counts_w = lloyd(pts, start, iters=5, weights=w)
    rep = pts[0].repeat_interleave(w[0].long(), dim=0).unsqueeze(0)
    sums_r, counts_r = lloyd(rep, start, iters=5)
    torch.testing.assert_close(sums_w, sums_r)
    torch.testing.assert_close(counts_w, counts_r)
    torch.testing.assert_close(counts_w.sum(1), w.sum(1))  # weight is conserved


def test_online_kmeans_in_batches_finds_the_centres():
    p, k, d = 4, 3, 2
    pts, centres = blobs(p, k, 70, d, seed=6)  # 210 points per location
    km = OnlineKMeans(p, d, k, init_size=30, seed=0)
    x = pts.transpose(0, 1)  # (N, P, D) as the detectors feed it
    for chunk in x.split(20):
        km.update(chunk)
        assert km._buffered <= 40  # the warm-up buffer stays bounded
    assert km.initialised and km._buffer == []
    assert km.sums.shape == (p, k, d) and km.counts.shape == (p, k)
    torch.testing.assert_close(km.counts.sum(1), torch.full((p,), 210.0, dtype=km.counts.dtype))
    assert match_error(km.centroids(), centres) < 0.15
    # sums are running sums: each centroid is the exact mean of its points
    torch.testing.assert_close(km.sums.sum(1), pts.double().sum(1))


def test_online_kmeans_with_fewer_points_than_clusters_pads_empty_ones():
    km = OnlineKMeans(2, 3, 5, init_size=10)
    km.update(torch.randn(3, 2, 3, generator=gen(7)))
    km.finish_init()
    assert km.sums.shape == (2, 5, 3)
    assert torch.equal(km.counts.sum(1), torch.full((2,), 3.0, dtype=km.counts.dtype))
    assert torch.isfinite(km.centroids()).all()
    with pytest.raises(ValueError):
        OnlineKMeans(2, 3, 0)


def stripes(n_per: int, seed: int) -> torch.Tensor:
    """Two horizontal stripes y=0 and y=3: long in x (sd 10), thin in y (sd 0.3): (N, 1, 2)."""
    g = gen(seed)
    x = torch.randn(2 * n_per, generator=g) * 10
    y = torch.cat([torch.zeros(n_per), torch.full((n_per,), 3.0)]) + 0.3 * torch.randn(
        2 * n_per, generator=g)
    pts = torch.stack([x, y], dim=1)[torch.randperm(2 * n_per, generator=g)]
    return pts.unsqueeze(1)


def test_online_kmeans_whitened_metric_finds_anisotropic_clusters():
    """With the within-cluster covariance as metric the stripes are found; in plain Euclidean
    space K-Means cuts them across (left/right), since x spreads far more than y."""
    pts = stripes(150, seed=8)
    within = torch.tensor([[10.0 ** 2, 0.0], [0.0, 0.3 ** 2]])
    chol = torch.linalg.cholesky(within).unsqueeze(0)  # (1, 2, 2)
    mean = torch.tensor([[0.0, 1.5]])
    truth = torch.tensor([[[0.0, 0.0], [0.0, 3.0]]])

    maha = OnlineKMeans(1, 2, 2, init_size=40, seed=0)
    eucl = OnlineKMeans(1, 2, 2, init_size=40, seed=0)
    for chunk in pts.split(25):
        maha.update(chunk, mean, chol)
        eucl.update(chunk)
    c = maha.centroids()[0]
    c = c[c[:, 1].argsort()]
    assert (c[:, 0] - truth[0, :, 0]).abs().max() < 3.0  # x is noisy: sd 10/sqrt(150)
    assert (c[:, 1] - truth[0, :, 1]).abs().max() < 0.2
    ce = eucl.centroids()[0]
    assert (ce[:, 1] - 1.5).abs().max() < 0.6  # each Euclidean cluster mixes both stripes
    assert (ce[:, 0].abs() > 4).all()  # and sits left or right


def test_online_kmeans_assigns_in_the_given_metric():
    """Deterministic: centroids (0,0) and (10,2); with Sigma=diag(100,1) the point (6,0) is
    Mahalanobis-nearer (0,0) but Euclidean-nearer (10,2)."""
    start = torch.tensor([[0.0, 0.0], [10.0, 2.0]]).view(2, 1, 2)  # (B=2, P=1, D=2)
    mean = torch.zeros(1, 2)
    chol = torch.linalg.cholesky(torch.diag(torch.tensor([100.0, 1.0]))).unsqueeze(0)
    q = torch.tensor([[6.0, 0.0]]).view(1, 1, 2)
    for metric, winner in (((mean, chol), 0), ((None, None), 1)):
        km = OnlineKMeans(1, 2, 2, init_size=2)
        km.update(start)  # seeds exactly the two points
        order = km.centroids()[0, :, 0].argsort()
        km.update(q, *metric)
        counts = km.counts[0, order]
        assert counts[winner] == 2 and counts[1 - winner] == 1
        cent = km.centroids()[0, order]
        expected = torch.tensor([[0.0, 0.0], [10.0, 2.0]], dtype=torch.float64)
        expected[winner] = (expected[winner] + torch.tensor([6.0, 0.0])) / 2
        torch.testing.assert_close(cent, expected)


def test_online_kmeans_merge_of_two_shards():
    p, k, d = 3, 4, 2
    pts, centres = blobs(p, k, 50, d, seed=9)
    x = pts.transpose(0, 1)
    a = OnlineKMeans(p, d, k, init_size=24, seed=1)
    b = OnlineKMeans(p, d, k, init_size=24, seed=2)
    for chunk in x[:120].split(30):
        a.update(chunk)
    for chunk in x[120:].split(40):
        b.update(chunk)
    merged = a.merge(b)
    assert merged.sums.shape == (p, k, d)
    torch.testing.assert_close(merged.counts.sum(1),
                               torch.full((p,), 200.0, dtype=merged.counts.dtype))
    torch.testing.assert_close(merged.sums.sum(1), pts.double().sum(1))  # no mass lost
    assert match_error(merged.centroids(), centres) < 0.2


# ============================================================================= local coreset


def naive_farthest(z: np.ndarray, first: int, n: int) -> list[int]:
    chosen = [first]
    mind = ((z - z[first]) ** 2).sum(1)
    for _ in range(1, n):
        nxt = int(np.argmax(mind))
        chosen.append(nxt)
        mind = np.minimum(mind, ((z - z[nxt]) ** 2).sum(1))
    return chosen


@pytest.mark.parametrize("seed", [0, 3])
def test_local_farthest_points_matches_naive_loop(seed):
    z = torch.randn(6, 40, 5, generator=gen(10), dtype=torch.float64)
    idx = local_farthest_points(z, 9, seed=seed)
    assert idx.shape == (6, 9)
    first = torch.randint(40, (6, 1), generator=gen(seed))[:, 0]  # same draw as the function
    for p in range(6):
        assert idx[p].tolist() == naive_farthest(z[p].numpy(), int(first[p]), 9)
        assert len(set(idx[p].tolist())) == 9


def test_local_farthest_points_caps_at_the_number_of_points():
    z = torch.randn(2, 5, 3, generator=gen(11))
    idx = local_farthest_points(z, 50)
    assert idx.shape == (2, 5)
    for row in idx:
        assert sorted(row.tolist()) == [0, 1, 2, 3, 4]


# =============================================================================== projections


def test_pca_matrix_is_orthonormal_top_eigenvectors():
    d = 12
    g = gen(12)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    evals = torch.tensor([50.0, 30, 20, 10, 5, 3, 2, 1, 0.5, 0.3, 0.2, 0.1], dtype=torch.float64)
    cov = q @ torch.diag(evals) @ q.T
    r = pca_matrix(cov, 4)
    assert r.shape == (d, 4) and r.dtype == torch.float32
    torch.testing.assert_close(r.T @ r, torch.eye(4), atol=1e-5, rtol=0)
    # columns are the eigenvectors of the 4 largest eigenvalues, in order (up to sign)
    overlap = (r.double().T @ q[:, :4]).abs()
    torch.testing.assert_close(overlap, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
    # projected variance = the top eigenvalues
    torch.testing.assert_close(torch.diag(r.double().T @ cov @ r.double()), evals[:4],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("density", [None, 0.25])
def test_sparse_random_matrix_values_and_sparsity(density):
    din, dout = 400, 60
    r = sparse_random_matrix(din, dout, seed=3, density=density)
    s = 1 / density if density else math.sqrt(din)
    assert r.shape == (din, dout)
    val = math.sqrt(s / dout)
    vals = np.unique(r.numpy())
    np.testing.assert_allclose(vals, [-val, 0.0, val], rtol=1e-6)
    nonzero = float((r != 0).float().mean())
    assert abs(nonzero - 1 / s) < 0.1 / s  # 24000 entries: well inside 10%
    pos, neg = int((r > 0).sum()), int((r < 0).sum())
    assert abs(pos - neg) < 0.1 * (pos + neg)
    assert torch.equal(r, sparse_random_matrix(din, dout, seed=3, density=density))
    assert not torch.equal(r, sparse_random_matrix(din, dout, seed=4, density=density))


def test_random_projections_preserve_squared_norms_on_average():
    x = torch.randn(300, 400, generator=gen(13))
    for r in (sparse_random_matrix(400, 100, seed=1), gaussian_random_matrix(400, 100, seed=1)):
        ratio = ((x @ r) ** 2).sum(1) / (x ** 2).sum(1)
        assert abs(float(ratio.mean()) - 1.0) < 0.05


def test_gaussian_random_matrix_shape_and_scale():
    r = gaussian_random_matrix(300, 50, seed=2)
    assert r.shape == (300, 50)
    assert abs(float(r.std()) - 1 / math.sqrt(50)) < 0.01
    assert abs(float(r.mean())) < 0.01
    assert torch.equal(r, gaussian_random_matrix(300, 50, seed=2))


# ======================================================================= nearest neighbours


@pytest.fixture(scope="module")
def bank_and_queries():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(500, 16)).astype(np.float32)
    queries = np.concatenate([rng.normal(size=(60, 16)), bank[:5] + 1e-3]).astype(np.float32)
    exact = np.sqrt(((queries[:, None, :].astype(np.float64) - bank[None]) ** 2).sum(-1)).min(1)
    return bank, queries, exact


def test_flat_index_equals_brute_force(bank_and_queries):
    bank, queries, exact = bank_and_queries
    got = NearestNeighbour(bank, kind="flat", threads=1).distance(queries)
    assert got.shape == (len(queries),)
    np.testing.assert_allclose(got, exact, rtol=1e-4, atol=2e-3)
    # queries 1e-3 away from bank points find them
    assert (got[-5:] < 1e-2).all()


def test_hnsw_index_is_close_to_exact(bank_and_queries):
    bank, queries, exact = bank_and_queries
    got = NearestNeighbour(bank, kind="hnsw", hnsw_m=16, ef_search=64, threads=1).distance(queries)
    assert (got >= exact - 1e-3).all()  # approximate search can only overestimate
    assert np.mean(np.abs(got - exact) < 1e-3) > 0.9  # and is almost always exact here
    assert np.median(got / exact) < 1.001


def test_nearest_neighbour_refuses_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        NearestNeighbour(np.zeros((0, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="unknown index kind"):
        NearestNeighbour(np.zeros((3, 4), dtype=np.float32), kind="ivf")


def _clustered_bank(rng, n=6000):
    """Patch features come in groups (background, rim, label...) far from the origin."""
    modes = 100 + 3 * rng.normal(size=(40, 40))
    return (modes[rng.integers(0, 40, n)] + 0.3 * rng.normal(size=(n, 40))).astype(np.float32)


def _exact(queries, bank):
    return np.sqrt(((queries[:, None, :].astype(np.float64) - bank[None]) ** 2).sum(-1)).min(1)


def test_clustered_index_is_exact_and_prunes_most_pairs():
    rng = np.random.default_rng(5)
    bank = _clustered_bank(rng)
    near = bank[rng.integers(0, len(bank), 300)] + 0.05 * rng.normal(size=(300, 40))
    far = 100 + 3 * rng.normal(size=(50, 40))  # between the groups: anomalies
    queries = np.concatenate([near, far, bank[:3]]).astype(np.float32)
    nn = NearestNeighbour(bank, kind="clustered", threads=1)
    assert nn.kind == "clustered"
    got = nn.distance(queries)
    np.testing.assert_allclose(got, _exact(queries, bank), rtol=1e-3, atol=2e-2)
    assert (got[-3:] < 2e-2).all()  # bank vectors find themselves
    # the point of the index: most (query, bank) distances are never computed
    assert nn.clusters.pairs_computed < 0.3 * len(queries) * len(bank)


def test_clustered_index_is_exact_when_pruning_cannot_help():
    rng = np.random.default_rng(6)
    bank = rng.normal(size=(400, 32)).astype(np.float32)  # isotropic: clusters overlap
    queries = rng.normal(size=(40, 32)).astype(np.float32)
    nn = NearestNeighbour(bank, kind="clustered", n_clusters=10, threads=1)
    np.testing.assert_allclose(nn.distance(queries), _exact(queries, bank), rtol=1e-4, atol=1e-3)


def test_clustered_index_handles_duplicates_and_more_clusters_than_distinct_points():
    bank = np.repeat(np.eye(4, dtype=np.float32), 50, axis=0)  # 4 distinct points, 200 rows
    queries = np.array([[1, 0, 0, 0], [0.5, 0.5, 0, 0], [3, 3, 3, 3]], dtype=np.float32)
    nn = NearestNeighbour(bank, kind="clustered", n_clusters=12, threads=1)
    np.testing.assert_allclose(nn.distance(queries), _exact(queries, bank), rtol=1e-5, atol=1e-3)


def test_small_banks_use_brute_force():
    nn = NearestNeighbour(np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32))
    assert nn.kind == "flat"  # below MIN_CLUSTERED_BANK the bookkeeping costs more than it saves


def test_kmeans_plus_plus_with_thousands_of_centres_keeps_memory_bounded():
    """PatchCore's K-Means bank seeds thousands of centres: a (P, N, D) temporary per centre
    fragmented the heap to 7 GB for 3,840 centres over 16k points."""
    import subprocess
    import sys

    code = """
import resource, torch
from anomalyqc.stats.kmeans import kmeans_plus_plus
torch.set_num_threads(1)
x = torch.randn(1, 16384, 152)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kmeans_plus_plus(x, 1500, torch.Generator().manual_seed(0))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    grown_mb = float(subprocess.run([sys.executable, "-c", code], check=True, text=True,
                                    stdout=subprocess.PIPE).stdout.strip().splitlines()[-1])
    assert grown_mb < 500, f"k-means++ seeding grew the peak RSS by {grown_mb:.0f} MB"
