"""The thesis's exact variants and the ablations beside the fast defaults: random channel
subsets, image-score rules, channel pooling of the WideResNet50 features, two-pass MhBC,
the single-covariance readings, PatchCore's K-Means bank, strict weights and refits.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anomalyqc.backbones.extractor import FeatureExtractor, pool_channels
from anomalyqc.backbones.zoo import load_strict
from anomalyqc.errors import ConfigError
from anomalyqc.models import Mhbc, Padim, Patchcore
from anomalyqc.models.patchcore.model import reweighted_scores
from anomalyqc.models.storage import load_detector
from anomalyqc.stats.kmeans import OnlineKMeans
from anomalyqc.stats.moments import OnlineMoments
from anomalyqc.stats.whitening import cholesky
from tests.test_models import BASE, TEST_BAD, TEST_GOOD, TRAIN, batches, normal_images

MHBC = {"n_clusters": 4, "init_images": 8}


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------- random subset (PaDiM)


def test_random_reduction_keeps_a_fixed_seeded_subset_of_channels(tmp_path):
    det = Padim(**BASE, reduction="random", reduced_dim=40, seed=3).fit(batches(TRAIN[:8]))
    m = det.reduction_matrix
    assert m.shape == (152, 40)
    assert torch.equal(m.sum(0), torch.ones(40))  # each output is exactly one input channel
    keep = m.argmax(0)
    assert len(set(keep.tolist())) == 40 and torch.equal(keep, keep.sort().values)
    # the embedding is the raw embedding's channels, bit for bit
    raw = Padim(**BASE).extractor(TEST_GOOD[:1]).flatten(2).transpose(1, 2)
    assert torch.equal(det.embed(TEST_GOOD[:1]), raw[..., keep])
    # the same seed gives the same subset, another seed another one
    again = Padim(**BASE, reduction="random", reduced_dim=40, seed=3).fit(batches(TRAIN[:4]))
    other = Padim(**BASE, reduction="random", reduced_dim=40, seed=4).fit(batches(TRAIN[:4]))
    assert torch.equal(again.reduction_matrix, m)
    assert not torch.equal(other.reduction_matrix, m)
    # saved with the model
    loaded = load_detector(det.save(tmp_path / "run"))
    torch.testing.assert_close(loaded.predict(TEST_BAD).score, det.predict(TEST_BAD).score)
    with pytest.raises(ConfigError, match="reduced_dim"):
        Padim(**BASE, reduction="random", reduced_dim=152).fit(batches(TRAIN[:4]))


# ----------------------------------------------------------------------- image score rules


def test_patch_max_score_is_the_largest_raw_patch_distance():
    det = Padim(**BASE, image_score="patch_max").fit(batches(TRAIN[:12]))
    pred = det.predict(TEST_BAD)
    raw = det.patch_scores(det.embed(TEST_BAD)).amax(1)
    torch.testing.assert_close(pred.score, raw)
    # and it is not the max of the smoothed map
    assert not torch.allclose(pred.score, pred.anomaly_map.flatten(1).amax(1))


def _naive_reweighted(emb, scores, bank, k):
    out = []
    for b in range(emb.shape[0]):
        i = int(scores[b].argmax())
        q = emb[b, i]
        d = ((bank - q) ** 2).sum(1).sqrt()
        star = int(d.argmin())
        nb = ((bank - bank[star]) ** 2).sum(1).sqrt().argsort()[:k].tolist()
        nb = [star] + [j for j in nb if j != star][: k - 1]
        w = 1 - torch.softmax(d[nb], 0)[0]
        out.append(w * scores[b, i])
    return torch.stack(out)


def test_reweighted_score_matches_the_patchcore_paper_rule():
    g = torch.Generator().manual_seed(0)
    dense = 0.05 * torch.randn(30, 4, generator=g)  # a well-sampled mode at the origin
    lone = torch.tensor([[5.0, 0, 0, 0]])  # an isolated bank entry
    far = torch.tensor([[5.0, 5, 5, 5]])
    bank = torch.cat([dense, lone, far])
    # two images whose worst patch is at the same distance (1.0) from its nearest entry:
    # next to the lone entry, and next to the dense mode
    emb = torch.stack([torch.tensor([[6.0, 0, 0, 0], [0.0, 0, 0, 0]]),
                       torch.tensor([[0.0, 0, 0, 0], [0.0, 1.0, 0, 0]])])
    scores = torch.cdist(emb.reshape(-1, 4), bank).amin(1).reshape(2, 2)
    got = reweighted_scores(emb, scores, bank, n_neighbors=5)
    torch.testing.assert_close(got, _naive_reweighted(emb, scores, bank, 5))
    assert (got < scores.amax(1)).all()  # a weight in (0, 1)
    assert got[0] > got[1]  # far from a sparse region counts more than from a dense one


def test_patchcore_reweighted_through_predict():
    det = Patchcore(**BASE, image_score="reweighted", n_neighbors=3).fit(batches(TRAIN[:8]))
    emb = det.embed(TEST_BAD)
    expected = _naive_reweighted(emb, det.patch_scores(emb), det.bank, 3)
    torch.testing.assert_close(det.predict(TEST_BAD).score, expected, rtol=1e-4, atol=1e-4)
    assert det.predict(TEST_BAD).score.min() > det.predict(TEST_GOOD).score.max()


# ------------------------------------------------------------- WideResNet50 thesis features


def test_pool_channels_averages_contiguous_runs():
    x = torch.arange(12.0).reshape(1, 6, 1, 2)
    out = pool_channels(x, 3)
    expected = torch.stack([x[:, 0:2].mean(1), x[:, 2:4].mean(1), x[:, 4:6].mean(1)], dim=1)
    torch.testing.assert_close(out, expected)
    assert pool_channels(x, 6) is x


@pytest.mark.slow
def test_wide_resnet50_features_are_pooled_to_1024_channels():
    # Random weights: the real ImageNet weights are not in this machine's torch cache.
    fx = FeatureExtractor("wide_resnet50_2", 3, allow_download=False, pretrained=False)
    assert fx.channels == (512, 1024) and fx.dim == 1024
    x = torch.rand(1, 3, 64, 64)
    emb = fx(x)
    assert emb.shape == (1, 1024, 8, 8)
    mid, deep = fx.body(fx.normalise(x))
    from anomalyqc.backbones.extractor import aggregate

    torch.testing.assert_close(emb, pool_channels(aggregate(mid, deep, 3), 1024))
    det = Patchcore(**BASE, backbone="wide_resnet50_2", pretrained=False,
                    coreset_ratio=0.5).fit(batches(normal_images(2, seed=0)))
    assert det.bank.shape[1] == 1024
    assert det.predict(TEST_GOOD[:1]).score.shape == (1,)
    # channel_pool=0 turns the pooling off
    assert FeatureExtractor("wide_resnet50_2", 3, pretrained=False, channel_pool=0).dim == 1536


def test_backbone_weights_load_strictly():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    state = net.state_dict()
    load_strict(net, state, "w.pth")  # all keys: fine
    missing = {k: v for k, v in state.items() if k != "1.bias"}
    with pytest.raises(ConfigError, match=r"w\.pth.*1\.bias"):
        load_strict(net, missing, "w.pth")
    with pytest.raises(ConfigError, match="extra"):
        load_strict(net, {**state, "extra.weight": torch.zeros(1)}, "w.pth")


# ----------------------------------------------------------------- MhBC two-pass, ablations


def _embeddings(det, images):
    return torch.cat([det.embed(b.image) for b in batches(images)])


def test_two_pass_mhbc_clusters_with_the_final_factor():
    det = Mhbc(**BASE, **MHBC, passes=2).fit(batches(TRAIN[:16]))
    x = _embeddings(det, TRAIN[:16])
    # pass 1: the same moments as a one-pass fit
    one = Mhbc(**BASE, **MHBC).fit(batches(TRAIN[:16]))
    torch.testing.assert_close(det.moments.mean(), one.moments.mean())
    # pass 2: K-Means assignments all made with the final factor
    ref = OnlineKMeans(x.shape[1], x.shape[2], 4, init_size=8, seed=0)
    mean, chol = det.moments.mean().float(), det.moments.cholesky(det.config.eps)
    for chunk in x.split(4):
        ref.update(chunk, mean, chol)
    ref.finish_init(mean, chol)
    torch.testing.assert_close(det.kmeans.counts, ref.counts)
    torch.testing.assert_close(det.kmeans.sums, ref.sums)
    # and it differs from the one-pass provisional-factor fit
    assert not torch.allclose(det.centroids, one.centroids)
    assert det.predict(TEST_BAD).score.min() > det.predict(TEST_GOOD).score.max()


def test_two_pass_refuses_a_one_shot_iterator():
    with pytest.raises(ConfigError, match="re-iterable"):
        Mhbc(**BASE, **MHBC, passes=2).fit(iter(batches(TRAIN[:8])))


def test_pooled_covariance_is_the_mean_within_location_covariance():
    det = Mhbc(**BASE, **MHBC, covariance="pooled").fit(batches(TRAIN[:16]))
    x = _embeddings(det, TRAIN[:16]).double()  # (N, P, D)
    centred = x - x.mean(0, keepdim=True)
    cov = torch.einsum("npi,npj->ij", centred, centred) / (x.shape[1] * (x.shape[0] - 1))
    cov += det.config.eps * torch.eye(x.shape[2], dtype=cov.dtype)
    assert det.chol.shape == (1, 152, 152) and det.mean.shape == (64, 152)
    torch.testing.assert_close(det.chol[0], cholesky(cov).float(), rtol=1e-3, atol=1e-4)
    # the "global" reading differs: one mean for all locations, total covariance
    glob = Mhbc(**BASE, **MHBC, covariance="global").fit(batches(TRAIN[:16]))
    assert glob.mean.shape == (1, 152)
    assert not torch.allclose(glob.chol, det.chol, rtol=1e-2, atol=1e-3)


def test_within_covariance_of_moments():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 5, generator=g) + torch.arange(3.0).view(1, 3, 1) * 10
    m = OnlineMoments(3, 5)
    m.update(x[:20])
    m.update(x[20:])
    expected = torch.stack([torch.cov(x[:, p].T.double()) for p in range(3)]).mean(0)
    torch.testing.assert_close(m.within_covariance()[0], expected)


def test_patchcore_kmeans_bank_is_k_means_centroids():
    det = Patchcore(**BASE, coreset="kmeans", coreset_ratio=0.05).fit(batches(TRAIN[:16]))
    n = round(0.05 * 16 * 64)
    assert 0 < det.bank.shape[0] <= n
    x = _embeddings(det, TRAIN[:16]).reshape(-1, 152)
    # centroids, not training rows: none of them is a training embedding
    d = torch.cdist(det.bank, x).amin(1)
    assert (d > 1e-3).all()
    # every training embedding is close to its centroid compared with the spread of the data
    assert torch.cdist(x, det.bank).amin(1).mean() < 0.5 * torch.cdist(x, x.mean(0, True)).mean()
    again = Patchcore(**BASE, coreset="kmeans", coreset_ratio=0.05).fit(batches(TRAIN[:16]))
    assert torch.equal(again.bank, det.bank)
    assert det.predict(TEST_BAD).score.min() > det.predict(TEST_GOOD).score.max()


# --------------------------------------------------------------------------------- refits


@pytest.mark.parametrize("cls", [Padim, Patchcore, Mhbc])
def test_refit_on_other_channels_starts_from_scratch(cls):
    params = {**BASE, **(MHBC if cls is Mhbc else {})}
    det = cls(**params).fit(batches(normal_images(8, seed=3, channels=1)))
    assert det.config.channels == 1
    det.fit(batches(TRAIN[:8]))  # RGB after grayscale
    assert det.config.channels == 3
    fresh = cls(**params).fit(batches(TRAIN[:8]))
    torch.testing.assert_close(det.predict(TEST_BAD).score, fresh.predict(TEST_BAD).score)


def test_channels_given_by_the_user_are_kept_on_refit():
    det = Padim(**BASE, channels=3)
    det.fit(batches(TRAIN[:4]))
    det.reset()
    assert det.config.channels == 3


def test_two_pass_fit_through_the_workflow_reads_the_folder_twice(tmp_path):
    import cv2

    from anomalyqc.workflow import fit_run

    (tmp_path / "data" / "good").mkdir(parents=True)
    for i, img in enumerate(normal_images(10, seed=5)):
        cv2.imwrite(str(tmp_path / "data" / "good" / f"{i}.png"),
                    (img.permute(1, 2, 0).numpy()[..., ::-1] * 255).round().astype("uint8"))
    det = fit_run("mhbc", tmp_path / "data", tmp_path / "run",
                  {**BASE, **MHBC, "passes": 2}, batch_size=4)
    assert det.moments.count == 10  # pass 1 saw every image once
    assert int(det.kmeans.counts.sum(1)[0]) == 10  # and so did pass 2
    assert det.fit_timings["backbone_seconds"] > 0
