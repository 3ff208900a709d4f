"""What a reviewer gets, through the CLI: skipped entries counted and listed, outputs refused
inside the data or over a run, the identity block, per-type figures, score histograms,
example panels where a 3-pixel defect is visible, and file names that are 255 bytes long or
not UTF-8 at all."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import invoke, stdout_json
from sklearn.metrics import roc_auc_score

from anomalyqc.data import records_for
from anomalyqc.data.fingerprint import data_sha256
from anomalyqc.evaluation.report import (
    PANEL_GAP,
    PANEL_HEADER,
    display_scale,
    scores_figure,
    write_report,
)
from anomalyqc.models.storage import run_model_id
from tests.test_listing import alarm  # noqa: F401 - fixture


def _one_line_error(r, *needles: str) -> None:
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert "Traceback" not in r.output
    for needle in needles:
        assert needle in r.output, (needle, r.output)


@pytest.fixture
def data(tiny_vials: Path, tmp_path: Path) -> Path:
    """A copy of the tiny vial set this test may change."""
    return Path(shutil.copytree(tiny_vials, tmp_path / "data"))


def _skip_reasons(entries: list[dict]) -> dict[str, str]:
    return {Path(s["path"]).name: s["reason"] for s in entries}


# ------------------------------------------------------------------ skipped, counted, listed
def test_evaluate_counts_lists_and_reports_what_it_skipped(run_copy: Path, data: Path,
                                                           tmp_path: Path, alarm) -> None:  # noqa: F811
    good = data / "test" / "good"
    os.symlink(good / "gone.png", good / "dead.png")
    os.mkfifo(good / "pipe.png")
    (good / "anim.gif").write_bytes(b"GIF89a")
    (good / "x.png").mkdir()
    shutil.copy(next(good.glob("*.png")), data / "stray.png")
    report = tmp_path / "rep" / "metrics.json"
    r = invoke("evaluate", run_copy, "--data", data, "--report", report)
    assert r.exit_code == 0, r.output
    m = stdout_json(r.stdout)
    assert m["images_found"] == m["images_scored"] == 8
    reasons = _skip_reasons(m["skipped"])
    assert set(reasons) == {"dead.png", "pipe.png", "anim.gif", "x.png", "stray.png"}
    assert "FIFO" in reasons["pipe.png"] and "dangling" in reasons["dead.png"]
    assert "8 image(s) found, 8 scored, 5 entries skipped: " in r.output
    record = json.loads(report.read_text())
    assert record["skipped"] == m["skipped"] and record["images_found"] == 8
    html = (report.parent / "report.html").read_text()
    assert "Skipped entries (5)" in html and "pipe.png" in html and "a FIFO" in html
    assert "8 found, 8 scored, 5 entries skipped" in html


def test_fit_and_calibrate_print_the_counts(run_copy: Path, data: Path, tmp_path: Path) -> None:
    (data / "train" / "good" / "notes.txt").write_text("x")
    r = invoke("fit", "padim", "--data", data, "--out", tmp_path / "run2", "--image-size", 32)
    assert r.exit_code == 0, r.output
    info = stdout_json(r.stdout)
    assert info["images_found"] == 12 and _skip_reasons(info["skipped"]) == {
        "notes.txt": "unsupported extension .txt (images are .bmp .jpeg .jpg .png .tif .tiff)"}
    assert "12 image(s) found, 12 scored, 1 entry skipped: " in r.output
    r = invoke("calibrate", run_copy, "--data", data)
    assert r.exit_code == 0, r.output
    assert stdout_json(r.stdout)["images_scored"] == 8 and "8 image(s) found" in r.output


def test_predict_lists_skipped_entries_beside_its_predictions(run_copy: Path, data: Path,
                                                              tmp_path: Path, alarm) -> None:  # noqa: F811
    folder = tmp_path / "in"
    folder.mkdir()
    for p in sorted((data / "test" / "good").glob("*.png"))[:2]:
        shutil.copy(p, folder / p.name)
    os.mkfifo(folder / "pipe.png")
    (folder / "sub").mkdir()
    shutil.copy(next(folder.glob("*.png")), folder / "sub" / "deeper.png")
    out = tmp_path / "p"
    r = invoke("predict", run_copy, folder, "--out", out)
    assert r.exit_code == 0, r.output
    rows = json.loads((out / "predictions.json").read_text())
    assert isinstance(rows, list) and len(rows) == 2  # the documented format is unchanged
    side = json.loads((out / "skipped.json").read_text())
    assert side["images_found"] == side["images_scored"] == 2
    reasons = _skip_reasons(side["skipped"])
    assert set(reasons) == {"pipe.png", "sub"} and "does not recurse" in reasons["sub"]
    assert "2 image(s) found, 2 scored, 2 entries skipped" in r.output
    # a FIFO named explicitly is an error, not a hang and not a silent skip
    _one_line_error(invoke("predict", run_copy, folder / "pipe.png", "--out", tmp_path / "q"),
                    "pipe.png", "FIFO")


def test_annotation_folder_in_the_data_is_one_line_error(run_copy: Path, data: Path) -> None:
    shutil.copytree(data / "ground_truth" / "scratch", data / "test" / "masks")
    _one_line_error(invoke("evaluate", run_copy, "--data", data), "masks", "ground_truth")


# ------------------------------------------------------------------------ where outputs go
def test_outputs_inside_the_data_or_over_a_run_are_refused_before_work(
        run_copy: Path, data: Path, tmp_path: Path) -> None:
    config = (run_copy / "config.json").read_bytes()
    _one_line_error(invoke("evaluate", run_copy, "--data", data, "--report",
                           run_copy / "config.json"), "run folder", "config.json")
    assert (run_copy / "config.json").read_bytes() == config
    assert not (run_copy / "report.html").exists()
    _one_line_error(invoke("evaluate", run_copy, "--data", data, "--report",
                           data / "reports" / "metrics.json"), "inside the data")
    assert not (data / "reports").exists()
    assert not (run_copy / "threshold.json").exists()  # refused before anything was scored
    good = data / "test" / "good"
    _one_line_error(invoke("predict", run_copy, good, "--out", good), "inside the data")
    _one_line_error(invoke("predict", run_copy, good, "--out", good / "heat"),
                    "inside the data")
    _one_line_error(invoke("predict", run_copy, next(good.glob("*.png")), "--out", good),
                    "folder of the input images")
    _one_line_error(invoke("predict", run_copy, good, "--out", run_copy), "run folder")
    assert not list(good.glob("*heatmap*")) and not (good / "heat").exists()
    # the default (RUN/report) is fine, and so is a subfolder of a named file's folder (never
    # read back: predict does not recurse)
    assert invoke("evaluate", run_copy, "--data", data).exit_code == 0
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(next(good.glob("*.png")), loose / "a.png")
    r = invoke("predict", run_copy, loose / "a.png", "--out", loose / "preds")
    assert r.exit_code == 0, r.output


# --------------------------------------------------------------------- what the report says
def test_report_identity_per_type_and_threshold_origin(run_copy: Path, data: Path,
                                                       tmp_path: Path) -> None:
    # the threshold is chosen on a copy of the data: same content, another folder
    copy = Path(shutil.copytree(data, tmp_path / "copy"))
    assert invoke("calibrate", run_copy, "--data", copy).exit_code == 0
    report = tmp_path / "rep" / "metrics.json"
    r = invoke("evaluate", run_copy, "--data", data, "--report", report)
    assert r.exit_code == 0, r.output
    m = stdout_json(r.stdout)
    ident = m["identity"]
    digest = data_sha256(records_for(data, "test"), data)
    assert ident["model_id"] == run_model_id(run_copy) and ident["detector"] == "padim"
    assert ident["run"] == str(run_copy.resolve()) and ident["data"] == str(data.resolve())
    assert ident["data_sha256"] == digest and ident["annotations_sha256"]
    origin = ident["threshold_origin"]
    assert origin["written_by"] == "calibrate" and origin["data"] == str(copy.resolve())
    assert origin["data_sha256"] == digest and origin["value"] == m["threshold"]
    assert "optimistic" in m["threshold_source"]  # same content, found by its hash
    assert ident["software"]["packages"]["torch"] and ident["software"]["python"]
    datetime.fromisoformat(ident["date"])

    rows = json.loads(report.read_text())["images"]
    per_type = m["per_defect_type"]
    labels = np.array([row["label"] for row in rows])
    scores = np.array([row["score"] for row in rows])
    types = [row["defect_type"] for row in rows]
    good = labels == 0
    assert per_type["good"]["count"] == good.sum() == 4
    assert per_type["good"]["flagged"] == int((scores[good] >= m["threshold"]).sum())
    defect_types = sorted(set(types) - {"good"})
    assert len(defect_types) == 4 and set(per_type) == {"good", *defect_types}
    for name in defect_types:
        sel = np.array([t == name for t in types])
        assert per_type[name]["count"] == sel.sum()
        assert per_type[name]["caught"] == int((scores[sel] >= m["threshold"]).sum())
        both = sel | good
        assert per_type[name]["auroc"] == pytest.approx(roc_auc_score(labels[both],
                                                                      scores[both]))
    html = (report.parent / "report.html").read_text()
    for needle in ("Identity", ident["model_id"], digest, "Per defect type", *defect_types,
                   'src="scores.png"', "anomalyqc calibrate", str(copy.resolve())):
        assert needle in html, needle
    for src in re.findall(r'<img src="([^"]+)"', html):  # every picture the page shows exists
        assert (report.parent / src).is_file(), src
    assert (report.parent / "scores.png").read_bytes()[:4] == b"\x89PNG"


def test_score_histogram_draws_the_threshold() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    fig = scores_figure(labels.astype(bool), scores, 0.5)
    ax = fig.axes[0]
    assert any(list(line.get_xdata()) == [0.5, 0.5] for line in ax.lines)
    heights = [sum(p.get_height() for p in c) for c in ax.containers]
    assert heights == [3, 2]  # every good and every defective image is in its histogram
    assert not scores_figure(labels.astype(bool), scores, None).axes[0].lines


def test_a_three_pixel_defect_is_visible_in_the_example(tmp_path: Path) -> None:
    size = 64
    rng = np.random.default_rng(0)
    images = rng.random((2, 3, size, size)).astype(np.float32) * 0.5
    masks = np.zeros((2, 1, size, size), np.float32)
    masks[1, 0, 30, 30:33] = 1  # three pixels
    maps = masks.copy()
    scores = maps.reshape(2, -1).max(axis=1)
    page = write_report(tmp_path, {}, [0, 1], scores, ["good.png", "spot.png"], images, masks,
                        maps, threshold=0.5, n_examples=1)
    html = page.read_text()
    src = re.search(r'<img src="(examples/worst_defect[^"]+)"', html).group(1)
    png = cv2.imread(str(tmp_path / src))
    s = display_scale(size, size)
    p = size * s
    assert png.shape[0] == PANEL_HEADER + p and png.shape[1] == 4 * p + 3 * PANEL_GAP

    def panel(k: int) -> np.ndarray:
        x = k * (p + PANEL_GAP)
        return png[PANEL_HEADER:, x:x + p]

    white = (panel(1) == 255).all(axis=2).sum()  # ground truth
    predicted = (panel(3) == 255).all(axis=2).sum()
    assert white >= 27 and predicted >= 27, (white, predicted)  # 3 pixels, each >= 3x3
    assert white == 3 * s * s
    assert (panel(2) == 255).all(axis=2).sum() > 0  # the outline on the heatmap


# ------------------------------------------------------------------------ hostile file names
def test_long_and_non_utf8_file_names_do_not_break_reports(run_copy: Path, data: Path,
                                                           tmp_path: Path) -> None:
    good = data / "test" / "good"
    firsts = sorted(good.glob("*.png"))
    long_name = "L" * 251 + ".png"
    assert len(os.fsencode(long_name)) == 255
    os.rename(firsts[0], good / long_name)
    odd = os.fsdecode(b"lot\xff\xfe_7.png")
    os.rename(firsts[1], good / odd)
    scratch = data / "test" / "scratch"
    img = next(scratch.glob("*.png"))
    stem = os.fsdecode(b"d\xe9faut")  # latin-1, not UTF-8
    os.rename(img, scratch / f"{stem}.png")
    os.rename(data / "ground_truth" / "scratch" / f"{img.stem}_mask.png",
              data / "ground_truth" / "scratch" / f"{stem}_mask.png")
    roi = data / "roi" / "test" / "scratch" / f"{img.stem}_roi.png"
    if roi.exists():
        os.rename(roi, roi.with_name(f"{stem}_roi.png"))

    report = tmp_path / "rep" / "metrics.json"
    r = invoke("evaluate", run_copy, "--data", data, "--report", report)
    assert r.exit_code == 0, r.output
    text = report.read_bytes().decode("utf-8")  # strict: valid UTF-8
    assert "\\udc" not in text  # no lone surrogates that strict JSON readers refuse
    paths = [row["path"] for row in json.loads(text)["images"]]
    assert any(p.endswith("lot\\xff\\xfe_7.png") for p in paths)
    assert any(p.endswith(long_name) for p in paths)
    assert any(p.endswith("d\\xe9faut.png") for p in paths)
    html = (report.parent / "report.html").read_bytes().decode("utf-8")
    assert "lot\\xff\\xfe_7.png" in html and long_name in html
    assert len(list((report.parent / "examples").glob("*.png"))) == 8  # all 8 drawn

    out = tmp_path / "pred"
    r = invoke("predict", run_copy, good, "--out", out)
    assert r.exit_code == 0, r.output
    rows = json.loads((out / "predictions.json").read_bytes().decode("utf-8"))
    assert len(rows) == 4 and all(Path(row["heatmap"]).is_file() for row in rows)
    heatmaps = [p for p in out.iterdir() if p.name.endswith("_heatmap.png")]
    assert len(heatmaps) == 4 and all(len(os.fsencode(p.name)) <= 255 for p in heatmaps)


# --------------------------------------------------------------------- in a real browser
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")
def test_report_renders_in_headless_chromium(run_copy: Path, data: Path, tmp_path: Path) -> None:
    report = tmp_path / "rep" / "metrics.json"
    assert invoke("evaluate", run_copy, "--data", data, "--report", report).exit_code == 0
    shot = tmp_path / "page.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                    f"--screenshot={shot}", "--window-size=1400,3000",
                    (report.parent / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    page = cv2.imread(str(shot))
    assert page is not None and page.shape[:2] == (3000, 1400)
    assert page.std() > 10  # something was drawn, not a blank or error page


def test_file_names_that_look_like_markup_print_as_text(run_copy: Path, tmp_path: Path) -> None:
    # rich would read "[/b]" as a closing tag (a traceback) and drop "[red]" silently
    _one_line_error(invoke("evaluate", run_copy, "--data", tmp_path / "lot[/b][red]x"),
                    "lot[/b][red]x", "does not exist")
