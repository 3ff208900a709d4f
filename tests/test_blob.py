"""Blob analysis: spots found where they are, filters reject what they should, the learnt
threshold is the documented percentile, runs round-trip, the CLI fits and evaluates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anomalyqc.errors import ConfigError
from anomalyqc.models import Blob, Detector
from anomalyqc.types import Batch

SIDE = 48


def _clean(n: int, seed: int = 0) -> torch.Tensor:
    """Gray images with a gentle gradient (flattening must remove it) and mild noise."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.4, 0.7, SIDE).view(1, 1, 1, SIDE)
    return (ramp + 0.01 * torch.randn(n, 1, SIDE, SIDE, generator=g)).clamp(0, 1)


def _disc(cy: int, cx: int, radius: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    return (((yy - cy) ** 2 + (xx - cx) ** 2) <= radius**2).float()


def _fitted(**params) -> Blob:
    return Blob(image_size=SIDE, **params).fit([Batch.from_images(_clean(6))])


def test_a_dark_spot_is_found_where_it_is_and_outscores_a_clean_image() -> None:
    det = _fitted()
    spot = _disc(20, 30, 3)
    x = _clean(2, seed=1)
    x[1, 0] -= 0.25 * spot
    pred = det.predict(x)
    assert pred.anomaly_map.shape == (2, 1, SIDE, SIDE)
    assert pred.score[1] > 1 > pred.score[0]  # a blob scores above 1, a clean image below
    assert pred.extras["n_blobs"].tolist() == [0, 1]
    found = pred.anomaly_map[1, 0] > 1  # blob pixels are the ones above 1
    iou = (found & (spot > 0)).sum() / (found | (spot > 0)).sum()
    assert iou > 0.6, float(iou)
    # the map's hottest pixels are the spot's, in the clean image's map nothing reaches 1
    assert float(pred.anomaly_map[0].max()) < 1


def test_polarity_decides_which_defects_count() -> None:
    x = _clean(1, seed=2)
    x[0, 0] += 0.25 * _disc(24, 24, 3)  # a bright spot
    assert _fitted(polarity="dark").predict(x).extras["n_blobs"].item() == 0
    assert _fitted(polarity="bright").predict(x).extras["n_blobs"].item() == 1
    assert _fitted(polarity="both").predict(x).extras["n_blobs"].item() == 1
    assert _fitted(polarity="both", background="tophat").predict(x).extras["n_blobs"].item() == 1


def test_area_filters_reject_blobs_outside_the_range() -> None:
    x = _clean(1, seed=3)
    x[0, 0] -= 0.25 * _disc(24, 24, 3)  # 29 pixels
    assert _fitted().predict(x).extras["n_blobs"].item() == 1
    assert _fitted(min_area=60).predict(x).extras["n_blobs"].item() == 0
    assert _fitted(max_area=10).predict(x).extras["n_blobs"].item() == 0
    assert _fitted(min_contrast=50).predict(x).extras["n_blobs"].item() == 0


def test_shape_filters_keep_a_disc_and_reject_a_line() -> None:
    x = _clean(1, seed=4)
    x[0, 0] -= 0.25 * _disc(12, 12, 3)
    x[0, 0, 34, 8:40] -= 0.25  # a one-pixel scratch, 32 long
    det = _fitted(close_size=0)
    blobs = det.blobs(det.residual(x[0, 0].numpy()))[1]
    assert len(blobs) == 2
    line = max(blobs, key=lambda b: b["elongation"])
    disc = min(blobs, key=lambda b: b["elongation"])
    assert line["elongation"] > 10 and disc["elongation"] < 1.5
    assert line["circularity"] < 0.3 < 0.7 < disc["circularity"]
    for params in ({"max_elongation": 3.0}, {"min_circularity": 0.5}):
        kept = _fitted(close_size=0, **params).predict(x)
        assert kept.extras["n_blobs"].item() == 1, params
        assert kept.anomaly_map[0, 0, 12, 12] > 1 and kept.anomaly_map[0, 0, 34, 20] < 1


def test_learnt_threshold_is_the_exact_percentile_of_the_good_residuals() -> None:
    good = _clean(5, seed=5)
    det = Blob(image_size=SIDE, threshold_percentile=99.0, threshold_margin=1.5)
    # two batches, with a defect-labelled image fit must ignore
    bad = _clean(1, seed=6) * 0.1
    b1 = Batch(image=torch.cat([good[:2], bad]), label=torch.tensor([0, 0, 1]))
    det.fit([b1, Batch.from_images(good[2:])])
    pixels = np.concatenate([det.residual(g[0].numpy()).ravel() for g in good])
    k = math.ceil(pixels.size * 0.01)
    assert det.learnt_threshold == pytest.approx(float(np.sort(pixels)[-k]) * 1.5, rel=1e-6)
    assert det.fit_report["images_fitted"] == 5 and det.fit_report["threshold_exact"]


def test_learnt_threshold_flags_when_one_image_holds_most_high_residuals(monkeypatch) -> None:
    from anomalyqc.models.blob import model

    monkeypatch.setattr(model, "FIT_SHARE", 1)
    monkeypatch.setattr(model, "FIT_EXTRA", 0)
    good = _clean(4, seed=8)
    good[0] = (good[0] + 0.05 * torch.randn(1, SIDE, SIDE)).clamp(0, 1)  # the noisy one
    det = Blob(image_size=SIDE, threshold_percentile=99.0).fit([Batch.from_images(good)])
    pixels = np.concatenate([det.residual(g[0].numpy()).ravel() for g in good])
    truth = float(np.sort(pixels)[-math.ceil(pixels.size * 0.01)])
    assert not det.fit_report["threshold_exact"]
    assert det.learnt_threshold is not None and det.learnt_threshold <= truth


def test_save_and_load_give_identical_maps(tmp_path) -> None:
    x = _clean(2, seed=7)
    x[0, 0] -= 0.2 * _disc(10, 30, 2.5)
    for params in ({}, {"threshold": 0.05, "adaptive": True, "background": "gaussian"}):
        det = _fitted(**params)
        run = det.save(tmp_path / str(len(params)))
        back = Detector.load(run)
        assert isinstance(back, Blob) and back.config == det.config
        a, b = det.predict(x), back.predict(x)
        assert torch.equal(a.anomaly_map, b.anomaly_map) and torch.equal(a.score, b.score)


def test_a_tampered_threshold_is_refused_on_load(tmp_path) -> None:
    from conftest import reseal
    from safetensors.torch import save_file

    from anomalyqc.errors import AnomalyQCError

    run = _fitted().save(tmp_path / "run")
    for bad in (-1.0, float("inf"), float("nan")):
        save_file({"learnt_threshold": torch.tensor([bad], dtype=torch.float64)},
                  run / "weights.safetensors", metadata={"format": "anomalyqc-run:blob"})
        reseal(run)
        with pytest.raises(AnomalyQCError, match="threshold"):
            Detector.load(run)


def test_bad_parameters_and_unfitted_use_are_refused() -> None:
    with pytest.raises(ConfigError, match="max_area"):
        Blob(min_area=10, max_area=5)
    with pytest.raises(ConfigError, match="polarity"):
        Blob(polarity="grey")
    with pytest.raises(ConfigError, match="not fitted"):
        Blob(image_size=SIDE).predict(_clean(1))
    with pytest.raises(ConfigError, match="flat"):  # a constant image has no residual at all
        Blob(image_size=SIDE).fit([Batch.from_images(torch.full((2, 1, SIDE, SIDE), 0.5))])
    with pytest.raises(ConfigError, match="expects images"):
        _fitted().predict(torch.zeros(1, 3, SIDE, SIDE))


def test_cli_fit_and_evaluate_on_generated_vials(tiny_vials, tmp_path) -> None:
    from conftest import SMALL, invoke, run_commands_work, stdout_json

    run = tmp_path / "blob"
    r = invoke("fit", "blob", "--data", tiny_vials, "--out", run, *SMALL,
               "--set", "background_size=9")
    assert r.exit_code == 0, r.output
    info = stdout_json(r.output)
    assert info["detector"] == "blob" and info["n_images"] == 12 and info["learnt_threshold"] > 0
    run_commands_work(run, tiny_vials, tmp_path)
