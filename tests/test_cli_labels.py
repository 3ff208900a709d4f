"""Datasets with image labels only (no masks) through the CLI: evaluate, calibrate, benchmark.

The same generated test images are written three ways: the MVTec layout with its masks, the
MVTec layout without ground_truth/, and the plain folder layout (good/, <defect>/). Image
metrics must be those of the scores the run gives (recomputed here with scikit-learn), pixel
metrics JSON null with a note, and the report without a ground-truth column.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import invoke, stdout_json
from sklearn.metrics import roc_auc_score

from anomalyqc.evaluation import select_threshold, threshold_metrics
from anomalyqc.evaluation.report import example_width


@pytest.fixture(scope="module")
def layouts(tiny_vials: Path, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("layouts")
    no_gt = base / "mvtec_no_gt"
    shutil.copytree(tiny_vials, no_gt, ignore=shutil.ignore_patterns("ground_truth"))
    folder = base / "folder"  # good/ and one folder per defect type, no mask folder
    for type_dir in sorted((tiny_vials / "test").iterdir()):
        shutil.copytree(type_dir, folder / type_dir.name)
    return {"masks": tiny_vials, "mvtec_no_gt": no_gt, "folder": folder}


def _evaluate(run: Path, data: Path, report: Path, *extra: str) -> tuple[dict, dict, str]:
    r = invoke("evaluate", run, "--data", data, "--report", report, *extra)
    assert r.exit_code == 0, r.output
    printed = json.loads(r.stdout)  # stdout is the JSON alone: progress and notes go to stderr
    return printed, json.loads(report.read_text()), r.output


def _scores(record: dict) -> dict[str, tuple[int, float]]:
    """Per-image (label, score), keyed by type/name so the layouts can be compared."""
    return {f"{Path(i['path']).parent.name}/{Path(i['path']).name}": (i["label"], i["score"])
            for i in record["images"]}


@pytest.mark.parametrize("layout", ["mvtec_no_gt", "folder"])
def test_evaluate_with_image_labels_only(layouts, run_copy: Path, tmp_path: Path, layout: str):
    report = tmp_path / "rep" / "metrics.json"
    m, record, output = _evaluate(run_copy, layouts[layout], report)
    labels = np.array([i["label"] for i in record["images"]])
    scores = np.array([i["score"] for i in record["images"]])
    assert (labels == 0).sum() == 4 and (labels == 1).sum() == 4
    assert m["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    at = threshold_metrics(labels, scores, m["threshold"])
    for key in ("f1", "accuracy", "precision", "recall", "tpr", "tnr"):
        assert m[key] == pytest.approx(at[key]), key
    # pixel metrics: JSON null (never NaN), with a one-line note on the console and in the JSON
    assert m["pixel_auroc"] is None and m["aupro"] is None
    raw = report.read_text()
    assert '"pixel_auroc": null' in raw and '"aupro": null' in raw and "NaN" not in raw
    assert len(m["notes"]) == 1 and "no ground-truth masks" in m["notes"][0]
    assert "note: pixel_auroc and aupro are null" in output
    # the report has no ground-truth column, in the page or in the example figures
    html = (report.parent / "report.html").read_text()
    assert "ground truth" not in html and "Example panels: input | anomaly map" in html
    examples = list((report.parent / "examples").glob("*.png"))
    assert examples
    for ex in examples:
        assert cv2.imread(str(ex)).shape[1] == example_width(64, 64, 3)  # three panels


def test_same_images_score_the_same_in_every_layout(layouts, run_copy: Path, tmp_path: Path):
    with_masks, rec_masks, _ = _evaluate(run_copy, layouts["masks"], tmp_path / "a" / "m.json",
                                         "--recalibrate")
    assert with_masks["pixel_auroc"] is not None and with_masks["aupro"] is not None
    assert with_masks["notes"] == []
    html = (tmp_path / "a" / "report.html").read_text()
    assert "Example panels: input | ground truth | anomaly map" in html
    reference = _scores(rec_masks)
    for layout in ("mvtec_no_gt", "folder"):
        m, record, _ = _evaluate(run_copy, layouts[layout], tmp_path / layout / "m.json",
                                 "--recalibrate")
        assert _scores(record) == reference, layout
        assert m["image_auroc"] == pytest.approx(with_masks["image_auroc"])


@pytest.mark.parametrize("layout", ["mvtec_no_gt", "folder"])
def test_calibrate_and_benchmark_with_image_labels_only(layouts, run_copy: Path, tmp_path: Path,
                                                        layout: str):
    data = layouts[layout]
    r = invoke("calibrate", run_copy, "--data", data, "--threshold-method", "youden")
    assert r.exit_code == 0, r.output
    c = stdout_json(r.stdout)
    assert (c["n_good"], c["n_defect"]) == (4, 4)
    # the threshold is the one youden picks on this run's scores of these images
    _, record, _ = _evaluate(run_copy, data, tmp_path / "rep" / "m.json")
    labels = [i["label"] for i in record["images"]]
    scores = [i["score"] for i in record["images"]]
    assert c["threshold"] == pytest.approx(select_threshold(labels, scores, "youden").value)
    assert record["threshold"] == c["threshold"]  # evaluate used the calibrated threshold

    if layout != "folder":  # benchmark only reads the images; one layout is enough
        return
    r = invoke("benchmark", run_copy, "--data", data, "--repeats", 2, "--batch-size", 2)
    assert r.exit_code == 0, r.output
    b = stdout_json(r.stdout)
    assert b["detector"] == "padim" and b["fit"]["n_images"] == 12
    assert b["latency_batch1_end_to_end"]["n"] == 2


def test_some_masks_missing_is_an_error_unless_no_masks(layouts, run_copy: Path,
                                                        tmp_path: Path):
    partial = tmp_path / "partial"
    shutil.copytree(layouts["masks"], partial)
    victim = sorted((partial / "ground_truth").rglob("*_mask.png"))[0]
    image = partial / "test" / victim.parent.name / victim.name.replace("_mask", "")
    victim.unlink()
    r = invoke("evaluate", run_copy, "--data", partial)
    assert r.exit_code == 2, r.output
    assert str(image) in r.output and "--no-masks" in r.output and "Traceback" not in r.output

    m, _, output = _evaluate(run_copy, partial, tmp_path / "rep" / "m.json", "--no-masks")
    assert m["pixel_auroc"] is None and m["aupro"] is None
    assert "--no-masks" in m["notes"][0] and "note:" in output
    full, _, _ = _evaluate(run_copy, layouts["masks"], tmp_path / "full" / "m.json")
    assert m["image_auroc"] == pytest.approx(full["image_auroc"])

    # calibration reads image labels only: the partly annotated set is fine, flag or not
    for extra in ([], ["--no-masks"]):
        r = invoke("calibrate", run_copy, "--data", partial, *extra)
        assert r.exit_code == 0, r.output
