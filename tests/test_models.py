"""Tests for the embedding detectors (PaDiM, PatchCore, MhBC-PatchCore) and their run folders.

Tiny inputs keep this fast: 64x64 images (an 8x8 embedding grid, D=152) through the offline
EfficientNet-Lite0 backbone. The images are synthetic but structured (a lit gradient, a disc and
a bar that move a little, sensor noise), seeded with torch.Generator; an anomaly is a dark blob.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import reseal

from anomalyqc.errors import ConfigError, DataError, ModelFileError
from anomalyqc.models import Mhbc, Padim, Patchcore, detector_class
from anomalyqc.models.base import Detector
from anomalyqc.models.storage import (
    CONFIG_FILE,
    FORMAT,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    load_detector,
    read_manifest,
)
from anomalyqc.stats.kmeans import OnlineKMeans
from anomalyqc.stats.moments import OnlineMoments
from anomalyqc.types import Batch

S = 64  # image size -> 8 x 8 grid
BASE = {"image_size": S, "allow_download": False}
MHBC = {"n_clusters": 4, "init_images": 8}  # small K; K-Means seeds after 8 images, then streams
CLASSES = {"padim": Padim, "patchcore": Patchcore, "mhbc": Mhbc}
DEFAULTS = {"padim": {}, "patchcore": {}, "mhbc": MHBC}
BLOBS = [(40, 20), (36, 40)]  # (row, col) centres of the pasted dark blobs


@pytest.fixture(autouse=True, scope="module")
def _few_threads():
    """Two cores are shared: torch and faiss on one thread while these tests run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        import faiss

        faiss.omp_set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------- images


def normal_images(n: int, seed: int, channels: int = 3) -> torch.Tensor:
    """(n, C, 64, 64) in [0, 1]: gradient background, bright disc, bar, mild noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, S), torch.linspace(0, 1, S), indexing="ij")
    out = []
    for _ in range(n):
        a, b = (0.3 + 0.1 * torch.rand(2, generator=g)).tolist()
        img = 0.25 + a * xx + b * yy
        cy, cx = (22 + 3 * torch.rand(2, generator=g)).tolist()
        img[((yy * S - cy) ** 2 + (xx * S - cx) ** 2) < 8 ** 2] = 0.9
        bar = int(48 + 2 * torch.rand(1, generator=g))
        img[bar : bar + 4, 8:56] = 0.75
        rgb = torch.stack([img, 0.9 * img, 0.8 * img])[:channels]
        out.append((rgb + 0.02 * torch.randn(channels, S, S, generator=g)).clamp(0, 1))
    return torch.stack(out)


def with_blob(images: torch.Tensor, cy: int, cx: int, r: int = 5) -> torch.Tensor:
    images = images.clone()
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    images[:, :, ((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r] = 0.05
    return images


def batches(images: torch.Tensor, size: int = 4) -> list[Batch]:
    return [Batch.from_images(chunk) for chunk in images.split(size)]


TRAIN = normal_images(24, seed=0)
TEST_GOOD = normal_images(6, seed=1)
TEST_BAD = torch.cat([with_blob(normal_images(1, seed=10 + i), cy, cx)
                      for i, (cy, cx) in enumerate(BLOBS)])

_CACHE: dict[tuple, Detector] = {}


def fitted(name: str, n_train: int = 16, **params) -> Detector:
    """A detector fitted on the first n_train TRAIN images, shared by tests that only read it."""
    key = (name, n_train, tuple(sorted(params.items())))
    if key not in _CACHE:
        params = {**BASE, **DEFAULTS[name], **params}
        _CACHE[key] = CLASSES[name](**params).fit(batches(TRAIN[:n_train]))
    return _CACHE[key]


def fresh(name: str, images: torch.Tensor, **params) -> Detector:
    params = {**BASE, **DEFAULTS[name], **params}
    return CLASSES[name](**params).fit(batches(images))


# ------------------------------------------------------------------------- detection


@pytest.mark.parametrize("name", ["padim", "patchcore", "mhbc"])
def test_dark_blob_scores_higher_and_is_localised(name):
    det = fitted(name)
    good = det.predict(TEST_GOOD)
    bad = det.predict(Batch.from_images(TEST_BAD))  # Batch or tensor: both accepted
    assert bad.score.min() > good.score.max(), (good.score, bad.score)
    for i, (cy, cx) in enumerate(BLOBS):
        m = bad.anomaly_map[i, 0]
        py, px = divmod(int(m.flatten().argmax()), S)
        assert abs(py - cy) <= 8 and abs(px - cx) <= 8, (name, (py, px), (cy, cx))
        # pixel level too: the blob centre is hotter than that pixel in any good image
        assert m[cy, cx] > good.anomaly_map[:, 0, cy, cx].max()


@pytest.mark.parametrize("name", ["padim", "patchcore", "mhbc"])
def test_prediction_shapes_and_score_is_max_of_map(name):
    det = fitted(name)
    pred = det.predict(TEST_GOOD[:3])
    assert pred.score.shape == (3,)
    assert pred.anomaly_map.shape == (3, 1, S, S)
    assert pred.score.dtype == torch.float32 and pred.anomaly_map.dtype == torch.float32
    assert torch.isfinite(pred.anomaly_map).all() and (pred.anomaly_map >= 0).all()
    torch.testing.assert_close(pred.score, pred.anomaly_map.flatten(1).amax(1))
    assert {"backbone_ms", "scoring_ms", "total_ms"} <= set(pred.timings)
    # predictions are per image: a batch of 3 scores as 3 batches of 1
    single = torch.cat([det.predict(TEST_GOOD[i : i + 1]).score for i in range(3)])
    torch.testing.assert_close(single, pred.score, rtol=1e-4, atol=1e-4)


def test_gray_images_fit_and_predict():
    det = fresh("padim", normal_images(6, seed=3, channels=1))
    assert det.config.channels == 1
    pred = det.predict(normal_images(2, seed=4, channels=1))
    assert pred.anomaly_map.shape == (2, 1, S, S)
    with pytest.raises(DataError, match="1-channel"):
        det.predict(TEST_GOOD[:1])


# ------------------------------------------------------------------ scoring internals


def test_patchcore_bank_is_a_coreset_and_scores_are_exact_nearest_neighbour():
    det = fitted("patchcore", n_train=8)
    train_emb = det.embed(TRAIN[:8]).reshape(-1, det.bank.shape[1])  # (8*64, D)
    assert det.bank.shape == (round(0.1 * 8 * 64), 152)
    # every bank row is one of the training patch embeddings
    assert torch.cdist(det.bank.double(), train_emb.double()).amin(1).max() < 1e-4
    emb = det.embed(TEST_GOOD[:2])
    ref = torch.cdist(emb.reshape(-1, 152).double(), det.bank.double()).amin(1).reshape(2, -1)
    torch.testing.assert_close(det.patch_scores(emb).double(), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("coreset_dim", [0, 32])  # 0: searched on the raw embeddings
def test_patchcore_bank_is_the_greedy_coreset_of_the_training_embeddings(coreset_dim):
    from anomalyqc.stats.coreset import greedy_coreset

    det = fresh("patchcore", TRAIN[:8], coreset_dim=coreset_dim)
    emb = det.embed(TRAIN[:8]).reshape(-1, 152).numpy()
    keys = emb @ det._projection(152) if coreset_dim else emb
    assert keys.shape[1] == (coreset_dim or 152)
    idx = np.sort(greedy_coreset(keys, det.bank.shape[0], seed=0))
    np.testing.assert_allclose(det.bank.numpy(), emb[idx], rtol=1e-4, atol=1e-4)


def regularised_gaussian(moments: OnlineMoments, eps: float, pooled: bool = False):
    """float64 mean (P|1, D) and explicit inverse of Sigma + eps I, straight from the moments."""
    m = moments.pooled() if pooled else moments
    return m.mean().numpy(), np.linalg.inv(m.covariance(eps).numpy())


def test_padim_score_is_mahalanobis_distance_with_explicit_inverse():
    det = fitted("padim")
    emb = det.embed(TEST_BAD[:1]).double().numpy()[0]  # (P, D)
    mean, sigma_inv = regularised_gaussian(det.moments, det.config.eps)
    diff = emb - mean
    ref = np.sqrt(np.einsum("pd,pde,pe->p", diff, sigma_inv, diff))
    np.testing.assert_allclose(det.patch_scores(torch.from_numpy(emb).float()[None])[0].numpy(),
                               ref, rtol=1e-5)


@pytest.mark.parametrize("covariance", ["local", "global"])
def test_mhbc_score_is_mahalanobis_distance_to_nearest_centroid(covariance):
    """Appendix D: 1-NN in whitened space == min_k Mahalanobis(phi, c_k) (explicit inverse)."""
    det = fitted("mhbc", covariance=covariance)
    emb = det.embed(TEST_BAD[:1])
    _, sigma_inv = regularised_gaussian(det.moments, det.config.eps, covariance == "global")
    L = det.chol.double()
    c = det.mean.double().unsqueeze(-2) + det.centroids.double() @ L.transpose(1, 2)  # (P,K,D)
    diff = emb.double().transpose(0, 1).numpy()[:, :, None, :] - c.numpy()[:, None]  # P,B,K,D
    sigma_inv = np.broadcast_to(sigma_inv, (c.shape[0],) + sigma_inv.shape[1:])
    ref = np.sqrt(np.einsum("pbkd,pde,pbke->pbk", diff, sigma_inv, diff).min(-1)).T
    np.testing.assert_allclose(det.patch_scores(emb).numpy(), ref, rtol=1e-5)
    # the centroids really are K distinct points per location, not one repeated mean
    assert (det.centroids[:, 0] - det.centroids[:, 1]).norm(dim=-1).min() > 0


def test_mhbc_single_cluster_equals_padim():
    """K=1 with local covariance: the only centroid is the mean, so the score is PaDiM's
    Mahalanobis distance (same eps) - exercises whitening and centroid bookkeeping."""
    padim = fitted("padim", eps=0.02)
    mhbc = fitted("mhbc", eps=0.02, n_clusters=1)
    images = torch.cat([TEST_GOOD[:3], TEST_BAD])
    a, b = padim.predict(images), mhbc.predict(images)
    torch.testing.assert_close(b.score, a.score, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(b.anomaly_map, a.anomaly_map, rtol=1e-5, atol=1e-3)
    assert mhbc.centroids.abs().max() < 1e-3  # whitened mean = 0


# ------------------------------------------------------------------------- save / load


ROUNDTRIP = [
    ("padim", {}),
    ("padim", {"reduction": "pca", "reduced_dim": 24, "pca_images": 4}),
    ("padim", {"reduction": "srp", "reduced_dim": 24, "pca_images": 4}),
    ("patchcore", {}),
    ("patchcore", {"index": "hnsw"}),
    ("patchcore", {"reduction": "pca", "reduced_dim": 24, "pca_images": 4}),
    ("mhbc", {}),
    ("mhbc", {"covariance": "global"}),
    ("mhbc", {"covariance": "none"}),
    ("mhbc", {"clustering": "coreset", "coreset_ratio": 0.25}),
    ("mhbc", {"reduction": "srp", "reduced_dim": 24, "pca_images": 4}),
]


@pytest.mark.parametrize("name,params", ROUNDTRIP,
                         ids=[f"{n}-{'-'.join(map(str, p.values())) or 'default'}"
                              for n, p in ROUNDTRIP])
def test_save_load_gives_identical_predictions(tmp_path, name, params):
    det = fitted(name, n_train=8, **params)
    before = det.predict(TEST_BAD)
    run = det.save(tmp_path / "run")
    assert sorted(p.name for p in run.iterdir()) == [CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE]
    cfg = json.loads((run / CONFIG_FILE).read_text())
    assert cfg["format"] == FORMAT and cfg["detector"] == name
    assert cfg["params"]["channels"] == 3
    for key, value in params.items():
        assert cfg["params"][key] == value

    loaded = load_detector(run, merge_state=True)
    assert type(loaded) is type(det) and loaded.fitted
    assert loaded.config == det.config
    assert type(det).load(run).config == det.config  # the class method too
    got = state_shapes(loaded)
    assert got == state_shapes(det)
    # a plain load (what predict uses) leaves out only the tensors a merge needs
    lean = state_shapes(load_detector(run))
    assert lean == {k: v for k, v in got.items() if not k.startswith(("moments.", "kmeans."))}
    if params.get("reduction", "none") != "none":
        assert loaded.reduction_matrix.shape == (152, 24)
    after = loaded.predict(TEST_BAD)
    torch.testing.assert_close(after.score, before.score, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(after.anomaly_map, before.anomaly_map, rtol=1e-6, atol=1e-6)


def state_shapes(det: Detector) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in det.state_tensors().items()}


def test_mhbc_state_per_variant():
    local = state_shapes(fitted("mhbc", n_train=8))
    assert local["mean"] == (64, 152) and local["chol"] == (64, 152, 152)
    assert local["centroids"] == (64, 4, 152)
    glob = state_shapes(fitted("mhbc", n_train=8, covariance="global"))
    assert glob["mean"] == (1, 152) and glob["chol"] == (1, 152, 152)
    none = state_shapes(fitted("mhbc", n_train=8, covariance="none"))
    assert "chol" not in none and "mean" not in none
    core = state_shapes(fitted("mhbc", n_train=8, clustering="coreset", coreset_ratio=0.25))
    assert core["centroids"] == (64, 2, 152)  # 25% of 8 images per location


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("name", ["padim", "patchcore", "mhbc"])
def test_predict_or_save_before_fit_is_a_config_error(tmp_path, name):
    det = CLASSES[name](**BASE)
    with pytest.raises(ConfigError, match="not fitted"):
        det.predict(TEST_GOOD[:1])
    with pytest.raises(ConfigError, match="unfitted"):
        det.save(tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["padim", "patchcore", "mhbc"])
def test_wrong_input_is_a_data_error_naming_what_is_expected(name):
    det = fitted(name, n_train=8)
    with pytest.raises(DataError, match="64x64"):
        det.predict(torch.rand(1, 3, 48, 48))
    with pytest.raises(DataError, match="64x64"):
        det.predict(torch.rand(1, 3, 64, 80))
    with pytest.raises(DataError, match="3-channel"):
        det.predict(torch.rand(1, 1, S, S))
    with pytest.raises(DataError, match="1 or 3 channels"):
        det.predict(torch.rand(1, 2, S, S))
    with pytest.raises(DataError, match=r"\(B, C, H, W\)"):
        det.predict(torch.rand(3, S, S))


def test_rectangular_input_size_fits_predicts_and_round_trips(tmp_path):
    wide = torch.nn.functional.interpolate(TRAIN[:8], size=(64, 96), mode="bilinear")
    det = fresh("padim", wide, image_size=(64, 96))
    assert det.input_size == (64, 96)
    pred = det.predict(wide[:2])
    assert pred.anomaly_map.shape == (2, 1, 64, 96)
    with pytest.raises(DataError, match="64x96"):
        det.predict(TRAIN[:1])  # a 64x64 image
    det.save(tmp_path / "run")
    back = load_detector(tmp_path / "run")
    assert back.input_size == (64, 96)
    torch.testing.assert_close(back.predict(wide[:2]).score, pred.score)


def test_sizes_normalise_and_bad_sizes_are_config_errors():
    assert Padim(image_size=[128, 128]).config.image_size == 128  # a square pair is an int
    assert Padim(image_size=[64, 96], crop_size=[32, 48]).input_size == (32, 48)
    for bad in (0, (64,), (64, -1), "big", True):
        with pytest.raises(ConfigError, match="image_size"):
            Padim(image_size=bad)


def test_fit_on_wrong_size_is_a_data_error():
    with pytest.raises(DataError, match="64x64"):
        Padim(**BASE).fit(batches(torch.rand(4, 3, 32, 32)))


def test_too_few_images_is_a_data_error():
    with pytest.raises(DataError, match="at least 2"):
        Padim(**BASE).fit(batches(TRAIN[:1]))
    with pytest.raises(DataError, match="at least 2"):
        Mhbc(**BASE, **MHBC).fit(batches(TRAIN[:1]))
    with pytest.raises(DataError, match="at least 1"):
        Patchcore(**BASE).fit([])


def test_reduced_dim_not_below_embedding_dim_is_a_config_error():
    with pytest.raises(ConfigError, match="reduced_dim"):
        Padim(**BASE, reduction="pca", reduced_dim=152, pca_images=2).fit(batches(TRAIN[:4]))


def test_unknown_detector_and_bad_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="unknown detector 'nope'.*mhbc.*padim.*patchcore"):
        detector_class("nope")
    assert detector_class("mhbc") is Mhbc
    with pytest.raises(ConfigError, match="n_clusters"):
        Mhbc(n_clusters="x")
    with pytest.raises(ConfigError, match="colour"):
        Padim(colour="red")
    with pytest.raises(ConfigError, match="reduction"):
        Padim(reduction="tsne")
    with pytest.raises(ConfigError, match="index"):
        Patchcore(index="ivf")
    with pytest.raises(ConfigError, match="covariance"):
        Mhbc(covariance="diagonal")
    with pytest.raises(ConfigError, match="backbone"):
        Padim(backbone="vgg_nope", **BASE).fit(batches(TRAIN[:2]))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    return fitted("padim", n_train=8).save(tmp_path_factory.mktemp("good") / "run")


def copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_load_corrupt_weights(saved_run, tmp_path):
    run = copy_run(saved_run, tmp_path / "run")
    (run / WEIGHTS_FILE).write_bytes(b"\x00garbage\xff" * 100)
    with pytest.raises(ModelFileError, match=WEIGHTS_FILE) as err:
        load_detector(run)
    assert "corrupt" in str(err.value)


def test_load_truncated_weights(saved_run, tmp_path):
    run = copy_run(saved_run, tmp_path / "run")
    data = (run / WEIGHTS_FILE).read_bytes()
    (run / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=WEIGHTS_FILE):
        load_detector(run)


def test_load_missing_weights(saved_run, tmp_path):
    run = copy_run(saved_run, tmp_path / "run")
    (run / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelFileError, match=f"{WEIGHTS_FILE} is missing"):
        load_detector(run)


def test_load_weights_of_another_detector(saved_run, tmp_path):
    run = copy_run(saved_run, tmp_path / "run")
    cfg = json.loads((run / CONFIG_FILE).read_text())
    cfg["detector"] = "mhbc"  # PaDiM's parameters are all valid MhBC parameters
    (run / CONFIG_FILE).write_text(json.dumps(cfg))
    reseal(run)  # a consistent forgery: the weights check must still catch it
    with pytest.raises(ModelFileError, match=WEIGHTS_FILE) as err:
        load_detector(run)
    assert "centroids" in str(err.value)


def test_load_foreign_config(saved_run, tmp_path):
    run = copy_run(saved_run, tmp_path / "run")
    (run / CONFIG_FILE).write_text(json.dumps({"model": "resnet", "lr": 0.1}))
    with pytest.raises(ModelFileError, match=CONFIG_FILE) as err:
        load_detector(run)
    assert "not an anomalyqc run config" in str(err.value)


def test_load_corrupt_config(saved_run, tmp_path):
    run = copy_run(saved_run, tmp_path / "run")
    (run / CONFIG_FILE).write_bytes(b"{not json\xff")
    with pytest.raises(ModelFileError, match=CONFIG_FILE):
        load_detector(run)


def test_load_other_format_version(saved_run, tmp_path):
    run = copy_run(saved_run, tmp_path / "run")
    cfg = json.loads((run / CONFIG_FILE).read_text())
    cfg["format_version"] = 99
    cfg["package_version"] = "9.9.9"
    (run / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match=CONFIG_FILE) as err:
        load_detector(run)
    assert "version 99" in str(err.value) and "9.9.9" in str(err.value)


def test_load_missing_folder_and_not_a_run(tmp_path):
    missing = tmp_path / "no_such_run"
    with pytest.raises(ModelFileError, match="no_such_run") as err:
        load_detector(missing)
    assert "does not exist" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match=CONFIG_FILE):
        load_detector(tmp_path / "empty")


def test_load_as_the_wrong_class(saved_run):
    with pytest.raises(ConfigError, match="padim"):
        Mhbc.load(saved_run)
    assert isinstance(Detector.load(saved_run), Padim)


# ------------------------------------------------------------------------------- merge

SHARD_A, SHARD_B = TRAIN[:8], TRAIN[8:16]


def test_padim_merge_equals_fit_on_both_shards():
    whole = fresh("padim", torch.cat([SHARD_A, SHARD_B]))
    merged = fresh("padim", SHARD_A).merge(fresh("padim", SHARD_B))
    assert merged.moments.count == 16
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.chol, whole.chol, rtol=1e-4, atol=1e-4)
    images = torch.cat([TEST_GOOD[:3], TEST_BAD])
    a, b = whole.predict(images), merged.predict(images)
    torch.testing.assert_close(b.score, a.score, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.anomaly_map, a.anomaly_map, rtol=1e-4, atol=1e-3)
    # and the merge really changed something: shard A alone scores differently
    only_a = fresh("padim", SHARD_A).predict(images).score
    assert not torch.allclose(only_a, a.score, rtol=1e-2)


def test_mhbc_merge_moments_exact_scores_close():
    whole = fresh("mhbc", torch.cat([SHARD_A, SHARD_B]))
    merged = fresh("mhbc", SHARD_A).merge(fresh("mhbc", SHARD_B))
    assert merged.moments.count == 16
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.chol, whole.chol, rtol=1e-4, atol=1e-4)
    assert merged.centroids.shape == whole.centroids.shape == (64, 4, 152)
    assert float(merged.kmeans.counts.sum(1).min()) == float(merged.kmeans.counts.sum(1).max()) \
        == 16.0  # every image counted once at every location
    images = torch.cat([TEST_GOOD[:3], TEST_BAD])
    a, b = whole.predict(images), merged.predict(images)
    torch.testing.assert_close(b.score, a.score, rtol=2e-2, atol=0)
    assert b.score[3:].min() > b.score[:3].max()


@pytest.mark.parametrize("name", ["padim", "mhbc"])
def test_merge_of_saved_runs_equals_merge_in_process(name, tmp_path):
    """The run folder keeps the moments (and K-Means state), so a merge after save/load is
    the same as a merge of the models still in memory."""
    in_memory = fresh(name, SHARD_A).merge(fresh(name, SHARD_B))
    a = load_detector(fresh(name, SHARD_A).save(tmp_path / "a"), merge_state=True)
    b = load_detector(fresh(name, SHARD_B).save(tmp_path / "b"), merge_state=True)
    # predicting never needs (or reads) the moments
    assert load_detector(tmp_path / "a").moments is None
    merged = a.merge(b)
    assert merged.moments.count == 16
    torch.testing.assert_close(merged.mean, in_memory.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.chol, in_memory.chol, rtol=1e-4, atol=1e-4)
    if name == "mhbc":
        torch.testing.assert_close(merged.centroids, in_memory.centroids, rtol=1e-4, atol=1e-4)


def test_merge_needs_models_that_kept_their_moments(tmp_path):
    run = fresh("padim", SHARD_B, keep_moments=False).save(tmp_path / "run")
    loaded = load_detector(run, merge_state=True)
    assert loaded.moments is None and loaded.predict(TEST_GOOD[:1]).score.shape == (1,)
    with pytest.raises(ValueError, match="keep_moments"):
        fresh("padim", SHARD_A).merge(loaded)
    coreset = fresh("mhbc", SHARD_A, clustering="coreset")
    with pytest.raises(ValueError, match="kmeans"):
        fresh("mhbc", SHARD_B).merge(coreset)


@pytest.mark.parametrize("reduction", ["pca", "srp"])
def test_merge_refuses_shards_with_different_reductions(reduction):
    params = {"reduction": reduction, "reduced_dim": 24, "pca_images": 4}
    a = fresh("padim", SHARD_A, **params)
    b = fresh("padim", SHARD_B, **params)
    assert not torch.equal(a.reduction_mean, b.reduction_mean)  # the shards disagree
    with pytest.raises((ValueError, ConfigError)):
        a.merge(b)


def _toy_mhbc_shard(points: torch.Tensor, centres: torch.Tensor, counts: list[float]) -> Mhbc:
    """An Mhbc 'fitted' on (N, 1, 2) points with given K-Means state: no backbone needed."""
    det = Mhbc(covariance="none", n_clusters=2)
    det.moments = OnlineMoments(1, 2)
    det.moments.update(points)
    det.kmeans = OnlineKMeans(1, 2, 2)
    cnt = torch.tensor([counts], dtype=torch.float64)
    det.kmeans.sums = centres.double().unsqueeze(0) * cnt.unsqueeze(-1)
    det.kmeans.counts = cnt
    return det


def test_mhbc_merge_euclidean_ablation_reclusters_in_euclidean_space():
    g = torch.Generator().manual_seed(0)
    pts = torch.stack([10 * torch.randn(50, generator=g), torch.randn(50, generator=g)], 1)
    pts = pts.unsqueeze(1)  # very anisotropic moments: sd 10 in x, 1 in y
    # heaviest centroids (0,0) and (10,2) start the re-clustering; (6,0) is Euclidean-nearer
    # (10,2) but Mahalanobis-nearer (0,0), so the two metrics give different merges
    a = _toy_mhbc_shard(pts[:25], torch.tensor([[0.0, 0.0], [10.0, 2.0]]), [10, 9])
    b = _toy_mhbc_shard(pts[25:], torch.tensor([[6.0, 0.0], [0.0, 0.0]]), [3, 1])
    km_a, km_b = OnlineKMeans(1, 2, 2), OnlineKMeans(1, 2, 2)
    km_a.sums, km_a.counts = a.kmeans.sums.clone(), a.kmeans.counts.clone()
    km_b.sums, km_b.counts = b.kmeans.sums.clone(), b.kmeans.counts.clone()
    euclid = km_a.merge(km_b).centroids().float()  # Euclidean: (6,0) joins (10,2)
    merged = a.merge(b)
    assert merged.chol is None
    got = merged.centroids[0][merged.centroids[0, :, 0].argsort()]
    want = euclid[0][euclid[0, :, 0].argsort()]
    torch.testing.assert_close(got, want)


# -------------------------------------------------------------------------- streaming


def tensors_held(obj) -> dict[str, tuple[int, ...]]:
    """Every tensor reachable through the attributes of a detector (moments, kmeans, lists)."""
    out: dict[str, tuple[int, ...]] = {}

    def walk(value, path):
        if isinstance(value, torch.Tensor):
            out[path] = tuple(value.shape)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}[{k}]")
        elif isinstance(value, (OnlineMoments, OnlineKMeans)):
            for k, v in vars(value).items():
                walk(v, f"{path}.{k}")

    for k, v in vars(obj).items():
        if k != "_extractor":  # the frozen backbone is the same whatever the data
            walk(v, k)
    return out


@pytest.mark.parametrize("name,params", [("padim", {}), ("mhbc", {}),
                                         ("mhbc", {"covariance": "global"})])
def test_memory_does_not_grow_with_training_images(name, params):
    small = fitted(name, n_train=8, **params)
    large = fitted(name, n_train=24, **params)
    assert tensors_held(small) == tensors_held(large)
    assert state_shapes(small) == state_shapes(large)
    if name == "mhbc":
        assert float(large.kmeans.counts.sum(1)[0]) == 24.0  # all images went through K-Means
        assert large.moments.count == 24


def test_patchcore_bank_grows_with_training_images():
    small = fitted("patchcore", n_train=8)
    large = fitted("patchcore", n_train=24)
    assert small.bank.shape[0] == round(0.1 * 8 * 64)
    assert large.bank.shape[0] == round(0.1 * 24 * 64)


# ------------------------------------------------------------------ estimator contract


@pytest.mark.parametrize("name", ["padim", "mhbc"])
def test_fitting_again_starts_from_scratch(name):
    det = fresh(name, SHARD_A)
    det.fit(batches(SHARD_B))
    ref = fresh(name, SHARD_B)
    torch.testing.assert_close(det.predict(TEST_GOOD[:2]).score, ref.predict(TEST_GOOD[:2]).score)


# ------------------------------------------------------------------ manifest and model id
def test_manifest_records_identity_and_load_sets_model_id(saved_run, tmp_path):
    run = copy_run(saved_run, tmp_path / "run")
    manifest = read_manifest(run)
    assert len(manifest.model_id) == 16 and manifest.detector == "padim"
    assert manifest.input_size == (64, 64) and manifest.channels == 3
    assert set(manifest.files) == {CONFIG_FILE, WEIGHTS_FILE}
    assert load_detector(run).model_id == manifest.model_id


def test_model_id_follows_the_bytes_of_config_and_weights(tmp_path):
    a = fitted("padim", n_train=6)
    a.save(tmp_path / "a")
    first = a.model_id
    a.save(tmp_path / "a2")
    assert a.model_id == first  # same model, same bytes, same id
    b = fitted("padim", n_train=7)
    b.save(tmp_path / "b")
    assert b.model_id != first


def test_edited_config_is_refused(saved_run, tmp_path):
    run = copy_run(saved_run, tmp_path / "run")
    cfg = json.loads((run / CONFIG_FILE).read_text())
    cfg["params"]["blur_sigma"] = 0.5  # still a valid config: only the manifest can tell
    (run / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match=CONFIG_FILE) as err:
        load_detector(run)
    assert "does not match" in str(err.value) and MANIFEST_FILE in str(err.value)


def test_weights_from_another_run_are_refused(tmp_path):
    a, b = fitted("padim", n_train=6), fitted("padim", n_train=7)
    run_a, run_b = a.save(tmp_path / "a"), b.save(tmp_path / "b")
    (run_a / WEIGHTS_FILE).write_bytes((run_b / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ModelFileError, match=WEIGHTS_FILE) as err:
        load_detector(run_a)
    assert "SHA-256" in str(err.value)


def test_missing_or_corrupt_manifest(saved_run, tmp_path):
    run = copy_run(saved_run, tmp_path / "run")
    (run / MANIFEST_FILE).write_text("{\"format\": \"anomalyqc-manifest\"")
    with pytest.raises(ModelFileError, match=MANIFEST_FILE) as err:
        load_detector(run)
    assert "corrupt" in str(err.value)
    (run / MANIFEST_FILE).unlink()
    with pytest.raises(ModelFileError, match=MANIFEST_FILE) as err:
        load_detector(run)
    assert "missing" in str(err.value)


def test_garbage_weights_behind_a_matching_manifest(saved_run, tmp_path):
    run = copy_run(saved_run, tmp_path / "run")
    (run / WEIGHTS_FILE).write_bytes(b"\x00garbage\xff" * 100)
    reseal(run)
    with pytest.raises(ModelFileError, match=WEIGHTS_FILE) as err:
        load_detector(run)
    assert "not a safetensors file" in str(err.value)


def test_a_random_backbone_is_the_same_network_every_time_it_is_built():
    """A run fitted with pretrained=False must meet the same features when loaded again."""
    from anomalyqc.backbones.extractor import FeatureExtractor

    torch.manual_seed(1)
    a = FeatureExtractor("efficientnet_lite0", 1, pretrained=False)
    torch.manual_seed(2)
    b = FeatureExtractor("efficientnet_lite0", 1, pretrained=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
