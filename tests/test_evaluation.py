"""Tests for anomalyqc.evaluation: metrics, threshold selection and the report."""

from __future__ import annotations

import itertools
import json
import math
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from anomalyqc.errors import CalibrationError, ConfigError, ModelFileError
from anomalyqc.evaluation import (
    ThresholdChoice,
    aupro,
    image_auroc,
    pixel_auroc,
    roc_curve_points,
    select_threshold,
    threshold_metrics,
    write_report,
)

# --------------------------------------------------------------------------- image level


def test_image_auroc_hand_example_and_tensor_input() -> None:
    # defects 0.35 and 0.8 against goods 0.1 and 0.4: 3 of 4 pairs ranked right
    labels, scores = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert image_auroc(labels, scores) == pytest.approx(0.75)
    assert image_auroc(torch.tensor(labels), torch.tensor(scores)) == pytest.approx(0.75)
    assert isinstance(image_auroc(labels, scores), float)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]])
def test_image_auroc_single_class_raises(labels: list[int]) -> None:
    with pytest.raises(CalibrationError, match="both good and defective"):
        image_auroc(labels, [0.1, 0.2, 0.3])
    with pytest.raises(CalibrationError):
        roc_curve_points(labels, [0.1, 0.2, 0.3])


def test_nan_scores_raise() -> None:
    with pytest.raises(CalibrationError, match="NaN"):
        image_auroc([0, 1], [0.1, float("nan")])


def test_roc_curve_points_end_to_end() -> None:
    fpr, tpr, thr = roc_curve_points([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert float(np.trapezoid(tpr, fpr)) == pytest.approx(0.75)
    assert len(thr) == len(fpr)


def test_threshold_metrics_hand_example() -> None:
    # predictions at 0.5: [good, defect, good, defect, defect] -> TP 2, FP 1, FN 1, TN 1
    m = threshold_metrics([0, 0, 1, 1, 1], [0.1, 0.6, 0.4, 0.7, 0.9], 0.5)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == m["tpr"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["tnr"] == pytest.approx(1 / 2)
    # score == threshold counts as a defect
    assert threshold_metrics([1], [0.5], 0.5)["tp"] == 1


def test_threshold_metrics_zero_denominators_are_zero_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = threshold_metrics([0, 0], [0.1, 0.2], 1.0)  # no defects, nothing flagged
        assert m["precision"] == m["recall"] == m["f1"] == 0.0
        assert m["tnr"] == 1.0 and m["accuracy"] == 1.0
        m = threshold_metrics([1, 1], [0.1, 0.2], 0.0)  # no goods
        assert m["tnr"] == 0.0 and m["recall"] == 1.0


# --------------------------------------------------------------------------- pixel level


def _random_pixel_data(seed: int, n: int = 3, size: int = 12, decimals: int | None = 2):
    """Masks with a few blobs (some touching only diagonally) and noisy maps with ties."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n - 1):  # the last image is defect-free
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 3, 2)
            masks[i, y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = True
    maps = rng.random(masks.shape) * 0.8 + masks * rng.random() * 0.6
    if decimals is not None:
        maps = np.round(maps, decimals)  # ties, also between good and defect pixels
    return masks, maps.astype(np.float32)


def test_pixel_auroc_matches_sklearn_and_accepts_4d_tensors() -> None:
    masks, maps = _random_pixel_data(0, n=4, size=20)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    got = pixel_auroc(
        torch.from_numpy(masks[:, None].astype(np.float32)), torch.from_numpy(maps[:, None])
    )
    assert got == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_needs_defect_pixels() -> None:
    with pytest.raises(CalibrationError, match="defect"):
        pixel_auroc(np.zeros((2, 4, 4)), np.random.default_rng(0).random((2, 4, 4)))
    with pytest.raises(ValueError, match="match"):
        pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))


def _reference_aupro(masks: np.ndarray, maps: np.ndarray, limit: float) -> float:
    """Slow and literal: one full pass per distinct threshold, then clipped trapezoids."""
    regions = []
    for i, mask in enumerate(masks):
        lab, n = ndimage.label(mask, structure=np.ones((3, 3)))  # 8-connectivity
        regions += [(i, lab == k) for k in range(1, n + 1)]
    good = ~masks
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        pred = maps >= t
        fpr = (pred & good).sum() / good.sum()
        pro = np.mean([pred[i][region].mean() for i, region in regions])
        points.append((float(fpr), float(pro)))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_reference(seed: int, limit: float) -> None:
    masks, maps = _random_pixel_data(seed, decimals=2 if seed % 2 else None)
    expected = _reference_aupro(masks, maps, limit)
    assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_aupro_grid_close_to_reference(seed: int) -> None:
    masks, maps = _random_pixel_data(seed, decimals=2)
    expected = _reference_aupro(masks, maps, 0.3)
    got = aupro(masks, maps, fpr_limit=0.3, num_thresholds=3000)
    assert got == pytest.approx(expected, abs=1e-3)


def test_aupro_perfect_constant_inverted() -> None:
    masks, _ = _random_pixel_data(1, size=16)
    perfect = masks.astype(np.float32) + 0.1 * np.random.default_rng(1).random(masks.shape)
    assert aupro(masks, perfect) == pytest.approx(1.0)
    assert aupro(masks, np.ones(masks.shape)) == pytest.approx(0.15)  # the diagonal: limit / 2
    assert aupro(masks, 1.0 - perfect) == pytest.approx(0.0)
    masks_t = torch.from_numpy(masks[:, None].astype(np.float32))
    assert aupro(masks_t, torch.from_numpy(perfect[:, None].astype(np.float32))) == pytest.approx(
        1.0
    )


def test_aupro_regions_are_8_connected_and_averaged_per_region() -> None:
    # A 4x4 block plus one pixel touching its corner: one 17-pixel region with 8-connectivity.
    mask = np.zeros((1, 10, 10), dtype=bool)
    mask[0, :4, :4] = True
    mask[0, 4, 4] = True
    amap = np.zeros((1, 10, 10), dtype=np.float32)
    amap[0, 4, 4] = 1.0  # only the corner pixel stands out
    # curve: (0, 0) -> (0, p) -> (1, 1) with p = 1/17; area to 0.3 / 0.3 = p + 0.15 (1 - p)
    p = 1 / 17
    assert aupro(mask, amap) == pytest.approx(p + 0.15 * (1 - p))
    # Two regions in two images, the small one found: PRO is 1/2 (per region), not 1/17.
    masks = np.zeros((2, 10, 10), dtype=bool)
    masks[0, :4, :4] = True
    masks[1, 4, 4] = True
    maps = np.zeros((2, 10, 10), dtype=np.float32)
    maps[1, 4, 4] = 1.0
    assert aupro(masks, maps) == pytest.approx(0.5 + 0.15 * 0.5)


def test_aupro_errors() -> None:
    with pytest.raises(CalibrationError, match="defect regions"):
        aupro(np.zeros((1, 5, 5)), np.zeros((1, 5, 5)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.ones((1, 5, 5)), np.zeros((1, 5, 5)), fpr_limit=0.0)


# --------------------------------------------------------------------------- thresholds

# Scores 1..10 with labels, lowest first: g D g g D D g g g D (4 defect, 6 good).
# flag >= 10: TP 1 FP 0 -> accuracy 0.7 (best), Youden 0.25 (tied best), F1 0.4
# flag >= 5:  TP 3 FP 3 -> Youden 0.75 - 0.5 = 0.25 (tied; lower threshold wins), F1 0.6
# flag >= 2:  TP 4 FP 5 -> F1 8 / 13 = 0.615 (best)
HAND_SCORES = np.arange(1.0, 11.0)
HAND_LABELS = np.array([0, 1, 0, 0, 1, 1, 0, 0, 0, 1])


@pytest.mark.parametrize(
    ("method", "value", "metric"),
    [("f1", 1.5, 8 / 13), ("accuracy", 9.5, 0.7), ("youden", 4.5, 0.25)],
)
def test_select_threshold_hand_example(method: str, value: float, metric: float) -> None:
    choice = select_threshold(HAND_LABELS, HAND_SCORES, method=method)
    assert choice.value == pytest.approx(value)
    assert choice.metric_value == pytest.approx(metric)
    assert (choice.method, choice.n_good, choice.n_defect) == (method, 6, 4)


def test_select_threshold_separable_puts_threshold_in_the_gap() -> None:
    labels = [0, 0, 0, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.7, 0.9]
    for method in ("f1", "accuracy", "youden"):
        choice = select_threshold(labels, scores, method=method)
        assert choice.value == pytest.approx(0.5), method
        assert choice.metric_value == pytest.approx(1.0), method


def test_select_threshold_ties_between_classes() -> None:
    # 0.5 is both a good and a defect score: flagging >= 0.5 gives F1 0.8, the best.
    choice = select_threshold([0, 0, 1, 1], [0.2, 0.5, 0.5, 0.9], method="f1")
    assert choice.value == pytest.approx(0.35)
    assert choice.metric_value == pytest.approx(0.8)


@pytest.mark.parametrize("method", ["f1", "accuracy", "youden"])
def test_selected_threshold_achieves_reported_metric(method: str) -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.random(60) + labels * 0.4, 2)
    choice = select_threshold(labels, scores, method=method)
    m = threshold_metrics(labels, scores, choice.value)
    achieved = m["tpr"] - (1 - m["tnr"]) if method == "youden" else m[method]
    assert achieved == pytest.approx(choice.metric_value)
    # and no other threshold does better
    for t in np.unique(scores):
        m = threshold_metrics(labels, scores, t)
        other = m["tpr"] - (1 - m["tnr"]) if method == "youden" else m[method]
        assert other <= choice.metric_value + 1e-12


@pytest.mark.parametrize("method", ["f1", "accuracy", "youden"])
def test_select_threshold_single_class_raises(method: str) -> None:
    with pytest.raises(CalibrationError, match="no defective images") as info:
        select_threshold([0, 0, 0], [0.1, 0.2, 0.3], method=method)
    assert "--threshold-method fixed --threshold VALUE" in str(info.value)
    with pytest.raises(CalibrationError, match="no good images"):
        select_threshold([1, 1], [0.1, 0.2], method=method)


def test_select_threshold_fixed() -> None:
    choice = select_threshold([0, 0, 0], [0.1, 0.2, 0.3], method="fixed", value=0.25)
    assert choice.value == 0.25 and choice.method == "fixed"
    assert choice.metric_value == pytest.approx(2 / 3)  # accuracy: 0.3 is a false alarm
    with pytest.raises(ConfigError, match="--threshold"):
        select_threshold([0, 1], [0.1, 0.2], method="fixed")
    with pytest.raises(ConfigError, match="fixed"):
        select_threshold([0, 1], [0.1, 0.2], method="f1", value=0.5)
    with pytest.raises(ConfigError, match="unknown"):
        select_threshold([0, 1], [0.1, 0.2], method="median")


def test_threshold_choice_round_trip_and_explain() -> None:
    choice = select_threshold(HAND_LABELS, HAND_SCORES, method="f1")
    back = ThresholdChoice.from_dict(json.loads(json.dumps(choice.to_dict())))
    assert back == choice
    text = back.explain()
    assert "max F1 = 0.615" in text and "6 good / 4 defect" in text
    with pytest.raises(ModelFileError, match="n_defect"):
        ThresholdChoice.from_dict({"value": 1.0, "method": "f1", "metric_value": 1, "n_good": 1})


# --------------------------------------------------------------------------- report


def _report_inputs(n: int = 10, channels: int = 3, size: int = 16):
    rng = np.random.default_rng(4)
    labels = np.array([0, 1] * (n // 2))
    masks = np.zeros((n, 1, size, size), dtype=np.float32)
    masks[labels == 1, :, 4:9, 5:10] = 1.0
    maps = (rng.random((n, 1, size, size)) * 0.5 + masks * rng.random((n, 1, 1, 1))).astype(
        np.float32
    )
    scores = maps.reshape(n, -1).max(axis=1)
    images = rng.random((n, channels, size, size)).astype(np.float32)
    paths = [f"lot 7/img_{i:03d}.png" for i in range(n)]
    return labels, scores, paths, images, masks, maps


def test_write_report_writes_everything(tmp_path: Path) -> None:
    labels, scores, paths, images, masks, maps = _report_inputs()
    metrics = {
        "image_auroc": image_auroc(labels, scores),
        "aupro": np.float32(0.5),
        "threshold_choice": ThresholdChoice(0.6, "f1", 0.9, 5, 5),
        "undefined": float("nan"),
    }
    out = tmp_path / "report"
    page = write_report(
        out, metrics, labels, scores, paths, images, masks, maps, threshold=0.6, n_examples=2
    )
    assert page == out / "report.html"
    for name in ("metrics.json", "roc.png", "report.html"):
        assert (out / name).is_file(), name
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    record = json.loads((out / "metrics.json").read_text())
    assert record["schema"] == "anomalyqc-metrics/1"
    assert record["image_auroc"] == pytest.approx(metrics["image_auroc"])
    assert record["aupro"] == pytest.approx(0.5)
    assert ThresholdChoice.from_dict(record["threshold_choice"]) == metrics["threshold_choice"]
    assert record["undefined"] is None
    assert record["threshold"] == 0.6 and (record["n_good"], record["n_defect"]) == (5, 5)
    assert [r["path"] for r in record["images"]] == paths
    assert [r["decision"] for r in record["images"]] == [
        "defect" if s >= 0.6 else "good" for s in scores
    ]

    examples = sorted((out / "examples").glob("*.png"))
    assert len(examples) == 8  # 2 each of worst/best defect/good, 5 of each class
    html = page.read_text()
    for ex in examples:
        assert ex.read_bytes()[:4] == b"\x89PNG"
        assert f"examples/{ex.name}" in html
    defect_idx = np.flatnonzero(labels == 1)
    good_idx = np.flatnonzero(labels == 0)
    worst_defect = defect_idx[np.argmin(scores[defect_idx])]
    worst_good = good_idx[np.argmax(scores[good_idx])]
    assert any(
        p.name.startswith("worst_defect") and f"img_{worst_defect:03d}" in p.name for p in examples
    )
    assert any(
        p.name.startswith("worst_good") and f"img_{worst_good:03d}" in p.name for p in examples
    )
    assert paths[worst_defect] in html and f"{scores[worst_defect]:.5g}" in html
    assert "roc.png" in html and "image_auroc" in html
    assert not list(out.rglob("*.tmp"))

    # a second report in the same folder leaves no stale examples behind
    write_report(out, metrics, labels, scores, paths, images, masks, maps, n_examples=0)
    assert not list((out / "examples").glob("*.png"))
    assert "examples/" not in page.read_text()


def test_write_report_without_images_and_grey_tensors(tmp_path: Path) -> None:
    labels, scores, paths, images, _masks, maps = _report_inputs(channels=1)
    page = write_report(tmp_path / "a", {"x": 1}, labels, scores, paths)
    assert page.is_file() and (tmp_path / "a" / "roc.png").is_file()
    assert not (tmp_path / "a" / "examples").exists()
    assert "Worst cases" not in page.read_text()

    page = write_report(
        tmp_path / "b",
        {},
        torch.tensor(labels),
        torch.tensor(scores),
        paths,
        torch.from_numpy(images),
        None,
        torch.from_numpy(maps),
        n_examples=1,
    )
    assert len(list((tmp_path / "b" / "examples").glob("*.png"))) == 4
    record = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert record["threshold"] is None and record["images"][0]["decision"] is None


def test_write_report_single_class_still_writes_roc(tmp_path: Path) -> None:
    page = write_report(tmp_path, {}, [0, 0], [0.1, 0.2], ["a.png", "b.png"])
    assert page.is_file() and (tmp_path / "roc.png").is_file()
    assert math.isclose(json.loads((tmp_path / "metrics.json").read_text())["n_good"], 2)


def test_write_report_without_masks_has_no_ground_truth_column(tmp_path: Path) -> None:
    labels, scores, paths, images, masks, maps = _report_inputs()
    with_gt = write_report(tmp_path / "gt", {}, labels, scores, paths, images, masks, maps,
                           threshold=0.6, n_examples=1)
    without = write_report(tmp_path / "labels", {"notes": ["no masks here"]}, labels, scores,
                           paths, images, None, maps, threshold=0.6, n_examples=1)
    assert "ground truth" in with_gt.read_text()
    text = without.read_text()
    assert "ground truth" not in text and "Note: no masks here" in text
    # the example figures lose a panel: three quarters of the width
    w_gt = cv2.imread(str(next((tmp_path / "gt" / "examples").glob("*.png")))).shape[1]
    w = cv2.imread(str(next((tmp_path / "labels" / "examples").glob("*.png")))).shape[1]
    assert w == pytest.approx(w_gt * 3 / 4, abs=2)


def test_write_report_metrics_file_is_one_flat_json(tmp_path: Path) -> None:
    labels, scores, paths, *_ = _report_inputs()
    write_report(tmp_path, {"image_auroc": 0.9, "threshold": 0.6}, labels, scores, paths,
                 threshold=0.6, metrics_file="results.json")
    assert not (tmp_path / "metrics.json").exists()
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["image_auroc"] == 0.9 and len(record["images"]) == len(paths)
    with pytest.raises(ValueError, match="threshold"):  # disagreeing duplicate
        write_report(tmp_path, {"threshold": 0.5}, labels, scores, paths, threshold=0.6)
    with pytest.raises(ValueError, match="images"):
        write_report(tmp_path, {"images": []}, labels, scores, paths)
    with pytest.raises(ConfigError, match="report.html"):
        write_report(tmp_path, {}, labels, scores, paths, metrics_file="report.html")
