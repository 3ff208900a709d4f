"""Seams a careful user hits, through the CLI: a hand-edited threshold.json, file modes,
the metrics.json schema, one-class data refused before scoring, and the threshold,
crop and worker options doing what they say."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import SMALL, invoke, stdout_json
from safetensors.torch import load_file

from anomalyqc.evaluation import select_threshold


def _one_line_error(r, *needles: str) -> None:
    assert r.exit_code == 2, r.output
    # one error line; `warning:` lines about the input (e.g. unused ROIs) may come before it
    lines = [line for line in r.output.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1, r.output
    assert "Traceback" not in r.output
    for needle in needles:
        assert needle in r.output, (needle, r.output)


@pytest.fixture(scope="module")
def val(tmp_path_factory) -> Path:
    """A validation set drawn with another seed, no training images."""
    out = tmp_path_factory.mktemp("val") / "val"
    r = invoke("synth", "vials", "--out", out, "--n-train", 0, "--n-test-good", 4,
               "--n-test-defect", 4, "--seed", 9)
    assert r.exit_code == 0, r.output
    return out


def _images(report: Path) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    rows = json.loads(report.read_text())["images"]
    return (np.array([r["label"] for r in rows]), np.array([r["score"] for r in rows]), rows)


# ------------------------------------------------------------------------- threshold.json
VALID = {"value": 100.0, "method": "f1", "metric_value": 1.0, "n_good": 4, "n_defect": 4}


CORRUPT = [
    "{ not json",
    "[]",
    json.dumps({"data": "/x"}),  # no image record
    json.dumps({"image": {"value": 1.0}, "data": "/x"}),  # missing keys
    json.dumps({"image": {**VALID, "value": "high"}, "data": "/x"}),  # wrong type
    json.dumps({"image": {**VALID, "value": None}, "data": "/x"}),
    json.dumps({"image": {**VALID, "n_good": "four"}, "data": "/x"}),
    json.dumps({"image": VALID, "data": 5}),
    json.dumps({"image": VALID, "data": "/x", "written_by": "someone"}),
    b"\xff\xfe\x00garbage",
]


@pytest.mark.parametrize("content", CORRUPT)
def test_corrupt_threshold_file_is_a_model_file_error_naming_it(tmp_path: Path, content):
    from anomalyqc.errors import ModelFileError
    from anomalyqc.evaluation.threshold_file import read_threshold

    path = tmp_path / "threshold.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ModelFileError) as info:
        read_threshold(tmp_path, "0123456789abcdef")
    message = str(info.value)
    assert str(path) in message and "anomalyqc calibrate" in message and "\n" not in message


@pytest.mark.parametrize("content", [CORRUPT[0], CORRUPT[4]])
def test_corrupt_threshold_file_is_one_line_from_the_cli(run_copy: Path, tiny_vials: Path,
                                                         tmp_path: Path, content):
    (run_copy / "threshold.json").write_text(content)
    r = invoke("predict", run_copy, tiny_vials / "test" / "good", "--out", tmp_path / "p")
    _one_line_error(r, str(run_copy / "threshold.json"), "corrupt", "anomalyqc calibrate")
    assert "anomalyqc evaluate" not in r.output
    r = invoke("evaluate", run_copy, "--data", tiny_vials)
    _one_line_error(r, "threshold.json", "anomalyqc calibrate")
    # the way out the message names works, and leaves a readable file behind
    r = invoke("calibrate", run_copy, "--data", tiny_vials)
    assert r.exit_code == 0, r.output
    r = invoke("predict", run_copy, tiny_vials / "test" / "good", "--out", tmp_path / "p")
    assert r.exit_code == 0, r.output


def test_messages_after_calibrate_name_calibrate(run_copy: Path, tiny_vials: Path, val: Path):
    r = invoke("calibrate", run_copy, "--data", val)
    assert r.exit_code == 0, r.output
    assert "by `anomalyqc calibrate`" in r.output
    stored = json.loads((run_copy / "threshold.json").read_text())
    assert stored["written_by"] == "calibrate"
    m = stdout_json(invoke("evaluate", run_copy, "--data", tiny_vials).stdout)
    assert "by `anomalyqc calibrate` on" in m["threshold_source"]
    assert str(val.resolve()) in m["threshold_source"]


# ----------------------------------------------------------------------------- file modes
def test_run_and_report_files_get_the_users_umask(tiny_vials: Path, tmp_path: Path):
    old = os.umask(0o022)
    try:
        run, rep, pred = tmp_path / "run", tmp_path / "rep", tmp_path / "pred"
        assert invoke("fit", "padim", "--data", tiny_vials, "--out", run, *SMALL).exit_code == 0
        assert invoke("evaluate", run, "--data", tiny_vials,
                      "--report", rep / "metrics.json").exit_code == 0
        assert invoke("predict", run, tiny_vials / "test" / "good", "--out", pred).exit_code == 0
    finally:
        os.umask(old)
    files = [p for d in (run, rep, pred) for p in d.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"weights.safetensors", "config.json", "fit_info.json", "threshold.json",
            "metrics.json", "report.html", "roc.png", "predictions.json"} <= names
    assert any(p.parent.name == "examples" for p in files)
    assert any(p.name.endswith("_heatmap.png") for p in files)
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    for d in (run, rep, rep / "examples", pred):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d
    assert not [p for p in files if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------ metrics schema
def test_metrics_json_has_one_schema_written_once(run_copy: Path, tiny_vials: Path,
                                                  tmp_path: Path):
    report = tmp_path / "out" / "results.json"
    r = invoke("evaluate", run_copy, "--data", tiny_vials, "--report", report)
    assert r.exit_code == 0, r.output
    printed = stdout_json(r.stdout)
    record = json.loads(report.read_text())
    assert record["schema"] == "anomalyqc-metrics/1"
    assert set(record) == set(printed) | {"schema", "pixel_threshold", "images"}
    assert {k: record[k] for k in printed} == printed
    assert not (report.parent / "metrics.json").exists()  # one file, not two
    assert (report.parent / "report.html").is_file()
    labels, scores, rows = _images(report)
    assert len(rows) == printed["n_good"] + printed["n_defect"] == 8
    assert all(row["decision"] == ("defect" if row["score"] >= printed["threshold"] else "good")
               for row in rows)

    # a name that would overwrite the report page is refused, before anything is scored
    r = invoke("evaluate", run_copy, "--data", tiny_vials, "--report", tmp_path / "report.html")
    _one_line_error(r, "report.html", "metrics.json")

    # without --report the same schema goes to RUN/report/metrics.json
    r = invoke("evaluate", run_copy, "--data", tiny_vials)
    default = json.loads((run_copy / "report" / "metrics.json").read_text())
    assert set(default) == set(record) and default["image_auroc"] == record["image_auroc"]


# --------------------------------------------------------------- classes before scoring
def test_one_class_data_is_refused_before_any_image_is_scored(run_copy: Path, tiny_vials: Path,
                                                              tmp_path: Path):
    only_good = tmp_path / "only_good"
    shutil.copytree(tiny_vials / "test" / "good", only_good / "test" / "good")
    # an unreadable image: scoring would stop on it, the label check must come first
    broken = only_good / "test" / "good" / "000.png"
    broken.write_bytes(broken.read_bytes()[:60])
    r = invoke("evaluate", run_copy, "--data", only_good)
    _one_line_error(r, "no defective images", str(only_good))
    r = invoke("calibrate", run_copy, "--data", only_good)
    _one_line_error(r, "no defective images", "--threshold-method fixed")
    # a fixed threshold needs no classes, so this one does reach the broken image
    r = invoke("calibrate", run_copy, "--data", only_good, "--threshold-method", "fixed",
               "--threshold", 1)
    assert r.exit_code == 2 and "predicting" in r.output and "000.png" in r.output, r.output

    only_defect = tmp_path / "only_defect"
    shutil.copytree(tiny_vials / "test" / "scratch", only_defect / "test" / "scratch")
    r = invoke("evaluate", run_copy, "--data", only_defect, "--no-masks")
    _one_line_error(r, "no good images")
    # a bad option is refused before scoring too
    r = invoke("evaluate", run_copy, "--data", tiny_vials, "--threshold-method", "fixed")
    assert r.exit_code == 2 and "--threshold VALUE" in r.output, r.output


# ------------------------------------------------------------------ threshold options
def test_fixed_threshold_is_stored_and_decides(run_copy: Path, tiny_vials: Path,
                                               tmp_path: Path):
    report = tmp_path / "rep" / "m.json"
    m = stdout_json(invoke("evaluate", run_copy, "--data", tiny_vials, "--report", report).stdout)
    _, scores, _ = _images(report)
    t = float(np.median(scores))  # splits the 8 images 4/4, unlike any chosen threshold
    r = invoke("evaluate", run_copy, "--data", tiny_vials, "--report", report,
               "--threshold-method", "fixed", "--threshold", t)
    assert r.exit_code == 0, r.output
    m = stdout_json(r.stdout)
    assert m["threshold"] == t and m["threshold_method"] == "fixed"
    assert "fixed by --threshold" in m["threshold_source"]
    stored = json.loads((run_copy / "threshold.json").read_text())
    assert stored["image"]["value"] == t and stored["image"]["method"] == "fixed"
    _, _, rows = _images(report)
    assert sum(row["decision"] == "defect" for row in rows) == 4
    assert all(row["decision"] == ("defect" if row["score"] >= t else "good") for row in rows)
    r = invoke("predict", run_copy, tiny_vials / "test" / "good", "--out", tmp_path / "p")
    preds = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert all(p["threshold"] == t for p in preds)
    assert all(p["decision"] == ("defect" if p["score"] >= t else "good") for p in preds)

    # calibrate stores a fixed value the same way, and evaluate then uses it as stored
    r = invoke("calibrate", run_copy, "--data", tiny_vials, "--threshold-method", "fixed",
               "--threshold", 123.5)
    assert r.exit_code == 0 and stdout_json(r.stdout)["threshold"] == 123.5, r.output
    m = stdout_json(invoke("evaluate", run_copy, "--data", tiny_vials).stdout)
    assert m["threshold"] == 123.5 and m["threshold_method"] == "fixed"


def test_recalibrate_replaces_a_calibrated_threshold(run_copy: Path, tiny_vials: Path,
                                                     val: Path, tmp_path: Path):
    c = stdout_json(invoke("calibrate", run_copy, "--data", val).stdout)
    report = tmp_path / "rep" / "m.json"
    r = invoke("evaluate", run_copy, "--data", tiny_vials, "--report", report,
               "--recalibrate", "--threshold-method", "accuracy")
    assert r.exit_code == 0, r.output
    m = stdout_json(r.stdout)
    labels, scores, _ = _images(report)
    expected = select_threshold(labels, scores, "accuracy")
    assert m["threshold"] == expected.value and m["threshold_method"] == "accuracy"
    assert m["threshold"] != c["threshold"]
    assert f"chosen on {tiny_vials} (test split) itself" in m["threshold_source"]
    stored = json.loads((run_copy / "threshold.json").read_text())
    assert stored["image"]["value"] == expected.value
    assert Path(stored["data"]) == tiny_vials.resolve() and stored["written_by"] == "evaluate"
    # the next evaluation reuses it and warns that it was chosen on the same data
    m2 = stdout_json(invoke("evaluate", run_copy, "--data", tiny_vials).stdout)
    assert m2["threshold"] == expected.value and "optimistic" in m2["threshold_source"]


# ------------------------------------------------------------------ fit options
def test_crop_size_sets_the_heatmap_size(tiny_vials: Path, tmp_path: Path):
    run = tmp_path / "crop"
    r = invoke("fit", "padim", "--data", tiny_vials, "--out", run, *SMALL,
               "--crop-size", "48x40")
    assert r.exit_code == 0, r.output
    r = invoke("predict", run, tiny_vials / "test" / "good", "--out", tmp_path / "p")
    assert r.exit_code == 0, r.output
    preds = json.loads((tmp_path / "p" / "predictions.json").read_text())
    # 48x40 enlarged with whole pixels (x6) until the longer side reaches 256
    assert [cv2.imread(p["heatmap"]).shape[:2] for p in preds] == [(288, 240)] * 4
    report = tmp_path / "rep" / "m.json"
    assert invoke("evaluate", run, "--data", tiny_vials, "--report", report).exit_code == 0
    assert json.loads(report.read_text())["pixel_auroc"] is not None  # masks cropped alike


def test_two_loader_workers_fit_the_same_model(tiny_vials: Path, tmp_path: Path):
    # Both fits here, under the same torch thread count (the shared session run may have
    # been fitted under another, which changes float rounding in the backbone).
    run_copy, run = tmp_path / "w0", tmp_path / "w2"
    for out, workers in ((run_copy, 0), (run, 2)):
        r = invoke("fit", "padim", "--data", tiny_vials, "--out", out, *SMALL, "--workers",
                   workers)
        assert r.exit_code == 0, r.output
    a, b = load_file(run_copy / "weights.safetensors"), load_file(run / "weights.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    scores = []
    for each in (run_copy, run):
        rep = tmp_path / "reports" / each.name / "m.json"  # not into the run folder itself
        r = invoke("evaluate", each, "--data", tiny_vials, "--report", rep, "--recalibrate")
        assert r.exit_code == 0, r.output
        scores.append([row["score"] for row in json.loads(rep.read_text())["images"]])
    assert scores[0] == scores[1]
