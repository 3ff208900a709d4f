"""End to end through the CLI on a tiny generated vial dataset: synth -> fit -> evaluate ->
predict -> benchmark, and the one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import pytest
from conftest import SMALL, invoke, stdout_json
from sklearn.metrics import roc_auc_score

from anomalyqc.evaluation import threshold_metrics

_json = stdout_json


@pytest.fixture
def vials(tiny_vials: Path) -> Path:
    """The shared tiny vial set (conftest); these tests only read it."""
    return tiny_vials


@pytest.mark.parametrize("detector,extra", [
    ("padim", []),
    ("patchcore", ["--set", "coreset_ratio=0.05"]),
    # the strips are 256x320: a rectangular size keeps their aspect ratio
    ("mhbc", ["--set", "n_clusters=4", "--image-size", "64x80"]),
])
def test_fit_evaluate_predict_benchmark(vials: Path, tmp_path: Path, detector: str, extra):
    run = tmp_path / "run"
    r = invoke("fit", detector, "--data", vials, "--out", run, *SMALL, *extra)
    assert r.exit_code == 0, r.output
    info = _json(r.stdout)
    assert info["n_images"] == 12 and info["detector"] == detector
    assert (run / "weights.safetensors").is_file() and (run / "config.json").is_file()

    report = tmp_path / "rep" / "metrics.json"
    r = invoke("evaluate", run, "--data", vials, "--report", report)
    assert r.exit_code == 0, r.output
    m = _json(r.stdout)
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1", "accuracy", "precision", "recall",
                "tpr", "tnr", "threshold"):
        assert key in m and m[key] is not None, key
    rows = json.loads(report.read_text())["images"]
    labels, scores = [r["label"] for r in rows], [r["score"] for r in rows]
    assert m["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert m["f1"] == pytest.approx(threshold_metrics(labels, scores, m["threshold"])["f1"])
    assert json.loads(report.read_text())["image_auroc"] == m["image_auroc"]
    assert (report.parent / "report.html").is_file() and (report.parent / "roc.png").is_file()
    assert (run / "threshold.json").is_file()

    # A second evaluation reuses the stored threshold and says it was chosen on this data.
    r = invoke("evaluate", run, "--data", vials)
    assert r.exit_code == 0, r.output
    m2 = _json(r.stdout)
    assert m2["threshold"] == m["threshold"] and "threshold.json" in m2["threshold_source"]
    assert "optimistic" in m2["threshold_source"]

    preds = tmp_path / "pred"
    r = invoke("predict", run, vials / "test" / "good", vials / "test" / "scratch", "--out", preds)
    assert r.exit_code == 0, r.output
    rows = json.loads((preds / "predictions.json").read_text())
    assert len(rows) == 5  # 4 good + 1 scratch (4 defect strips over 4 types)
    assert all(row["decision"] in ("good", "defect") for row in rows)
    assert all(Path(row["heatmap"]).is_file() for row in rows)
    assert len({row["heatmap"] for row in rows}) == 5  # same-named files don't collide
    heatmap = cv2.imread(rows[0]["heatmap"])
    # the model input, enlarged with whole pixels (x4 here) so small defects stay visible
    assert heatmap.shape[:2] == ((256, 320) if "64x80" in extra else (256, 256))

    r = invoke("benchmark", run, "--data", vials, "--repeats", 3, "--batch-size", 4)
    assert r.exit_code == 0, r.output
    b = _json(r.stdout)
    assert b["latency_batch1_end_to_end"]["median_ms"] > 0
    assert b["latency_batch1_model_only"]["median_ms"] <= b["latency_batch1_end_to_end"]["p95_ms"]
    assert b["fit"]["n_images"] == 12


def test_calibrate_on_validation_data_then_evaluate(vials: Path, tmp_path: Path):
    val = tmp_path / "val"  # another seed, no training images: a validation set
    r = invoke("synth", "vials", "--out", val, "--n-train", 0, "--n-test-good", 4,
               "--n-test-defect", 4, "--seed", 9)
    assert r.exit_code == 0, r.output
    run = tmp_path / "run"
    assert invoke("fit", "padim", "--data", vials, "--out", run, *SMALL).exit_code == 0
    r = invoke("predict", run, vials / "test" / "good", "--out", tmp_path / "p0")
    assert "uncalibrated" in r.output

    r = invoke("calibrate", run, "--data", val, "--threshold-method", "youden")
    assert r.exit_code == 0, r.output
    c = _json(r.stdout)
    assert c["threshold_method"] == "youden" and c["n_good"] == 4 and c["n_defect"] == 4
    stored = json.loads((run / "threshold.json").read_text())
    assert stored["image"]["value"] == c["threshold"] and Path(stored["data"]) == val.resolve()

    r = invoke("evaluate", run, "--data", vials)
    assert r.exit_code == 0, r.output
    m = _json(r.stdout)
    assert m["threshold"] == c["threshold"]
    assert str(val) in m["threshold_source"] and "optimistic" not in m["threshold_source"]
    r = invoke("predict", run, vials / "test" / "good", "--out", tmp_path / "p1")
    rows = json.loads((tmp_path / "p1" / "predictions.json").read_text())
    assert all(row["threshold"] == c["threshold"] for row in rows)

    only_good = tmp_path / "only_good"  # folder layout with good images only
    shutil.copytree(vials / "test" / "good", only_good / "good")
    r = invoke("calibrate", run, "--data", only_good)
    assert r.exit_code == 2 and "no defective images" in r.output, r.output


def test_errors_are_one_line_with_status_2(tmp_path: Path, vials: Path):
    r = invoke("fit", "padim", "--data", tmp_path / "nowhere", "--out", tmp_path / "r", *SMALL)
    assert r.exit_code == 2
    assert "nowhere" in r.output and "Traceback" not in r.output

    r = invoke("evaluate", tmp_path / "not_a_run", "--data", vials)
    assert r.exit_code == 2 and "not_a_run" in r.output

    bad_run = tmp_path / "bad_run"
    bad_run.mkdir()
    (bad_run / "config.json").write_text("{ not json")
    r = invoke("predict", bad_run, vials / "test" / "good", "--out", tmp_path / "p")
    assert r.exit_code == 2 and "config.json" in r.output

    empty = tmp_path / "empty"
    (empty / "train" / "good").mkdir(parents=True)
    r = invoke("fit", "mhbc", "--data", empty, "--out", tmp_path / "r2", *SMALL)
    assert r.exit_code == 2 and "good" in r.output

    r = invoke("fit", "padim", "--data", vials, "--out", tmp_path / "r3", *SMALL,
               "--set", "no_such_param=1")
    assert r.exit_code == 2 and "no_such_param" in r.output

    for bad_size in ("64x", "0", "64x80x3", "big"):
        r = invoke("fit", "padim", "--data", vials, "--out", tmp_path / "r4", "--image-size", bad_size)
        assert r.exit_code == 2 and "256x320" in r.output, r.output


def test_evaluate_refuses_single_class(tmp_path: Path, vials: Path):
    run = tmp_path / "run"
    assert invoke("fit", "padim", "--data", vials, "--out", run, *SMALL).exit_code == 0
    only_good = tmp_path / "only_good"
    (only_good / "train").mkdir(parents=True)
    (only_good / "train" / "good").symlink_to(vials / "train" / "good")
    (only_good / "test").mkdir()
    (only_good / "test" / "good").symlink_to(vials / "test" / "good")
    r = invoke("evaluate", run, "--data", only_good)
    assert r.exit_code == 2 and "defective" in r.output
