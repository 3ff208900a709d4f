"""`anomalyqc compare`: several runs evaluated on the same data, one table; runs are read,
never changed."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import invoke, stdout_json

from anomalyqc.errors import ConfigError, OutputError
from anomalyqc.evaluation.compare import compare_runs


@pytest.fixture(scope="module")
def blob_run(tiny_vials: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cmp") / "blob"
    r = invoke("fit", "blob", "--data", tiny_vials, "--out", run, "--image-size", 32,
               "--set", "background_size=7")
    assert r.exit_code == 0, r.output
    return run


def test_cli_compare_two_runs_writes_one_table(tiny_vials, run_copy, blob_run, tmp_path) -> None:
    # the PaDiM run is calibrated (on the same data: flagged), the blob run is not
    r = invoke("calibrate", run_copy, "--data", tiny_vials)
    assert r.exit_code == 0, r.output
    blob_files = sorted(p.name for p in blob_run.iterdir())
    out = tmp_path / "cmp"
    r = invoke("compare", run_copy, blob_run, "--data", tiny_vials, "--out", out,
               "--timing-images", 2)
    assert r.exit_code == 0, r.output
    result = stdout_json(r.output)
    assert result == json.loads((out / "comparison.json").read_text())
    padim, blob = result["rows"]
    assert (padim["detector"], blob["detector"]) == ("padim", "blob")
    assert padim["label"] == "run" and blob["label"] == "blob"
    for row in (padim, blob):
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            assert 0 <= row[key] <= 1, (row["label"], key)
        assert row["ms_per_image"] > 0 and row["timed_images"] == 2
        assert row["weights_bytes"] == (Path(row["run"]) / "weights.safetensors").stat().st_size
        # each run's figures are evaluate's own, its full report beside the table
        metrics = json.loads((out / "runs" / row["label"] / "metrics.json").read_text())
        assert metrics["image_auroc"] == row["image_auroc"] and metrics["model_id"] == row["model_id"]
        assert (out / row["report"]).is_file()
    assert padim["calibrated"] and math.isfinite(padim["accuracy"]) and padim["threshold"] is not None
    assert not blob["calibrated"] and blob["accuracy"] is None and blob["tpr"] is None
    assert blob["stored_values"] == 1 and padim["stored_values"] > 1000
    assert padim["input_size"] == [64, 64] and blob["input_size"] == [32, 32]
    notes = " ".join(result["notes"])
    assert "different input sizes" in notes and "optimistic" in notes and "null" in notes
    table = (out / "comparison.md").read_text()
    assert "| run | padim |" in table and "| blob | blob |" in table and "32x32" in table
    assert "blob/report.html" in (out / "comparison.html").read_text()
    # per class: the calibrated run's caught shares are evaluate's, at its threshold
    per_type = metrics_of(out, "run")["per_defect_type"]
    assert padim["caught"] == {t: (1 - v["flagged_rate"]) if t == "good" else v["caught_rate"]
                               for t, v in per_type.items()}
    assert len(padim["caught"]) >= 3 and blob["caught"] is None and padim["unseen_classes"] == []
    assert "## Caught per class" in table and "| run | " in table.split("## Caught per class")[1]
    assert (out / "comparison_per_class.png").read_bytes()[:4] == b"\x89PNG"
    assert "comparison_per_class.png" in (out / "comparison.html").read_text()
    # the uncalibrated run was not given a threshold: compare never writes into a run
    assert sorted(p.name for p in blob_run.iterdir()) == blob_files
    # an earlier comparison is replaced; a folder of something else is not
    r = invoke("compare", blob_run, "--data", tiny_vials, "--out", out, "--timing-images", 1)
    assert r.exit_code == 0, r.output
    assert [row["label"] for row in json.loads((out / "comparison.json").read_text())["rows"]] \
        == ["blob"]
    assert not (out / "runs" / "run").exists()


def metrics_of(out: Path, label: str) -> dict:
    return json.loads((out / "runs" / label / "metrics.json").read_text())


def test_per_class_table_marks_the_classes_a_run_never_saw() -> None:
    from anomalyqc.evaluation.compare import caught_table, per_class_png

    rows = [{"label": "classifier", "caught": {"glass": 0.7, "foam": 0.1, "good": 0.6},
             "unseen_classes": ["foam"]},
            {"label": "padim", "caught": {"glass": 0.37, "foam": 0.87, "good": 0.76},
             "unseen_classes": []},
            {"label": "blob", "caught": None, "unseen_classes": []}]
    table = caught_table(rows)
    assert table.splitlines()[0] == "| run | foam | glass | good |"
    assert "| classifier | 0.100 (unseen) | 0.700 | 0.600 |" in table
    assert "| padim | 0.870 | 0.370 | 0.760 |" in table and "blob" not in table
    assert per_class_png(rows)[:4] == b"\x89PNG"
    assert caught_table([rows[2]]) == ""


def test_compare_refusals(tiny_vials, blob_run, tmp_path) -> None:
    with pytest.raises(ConfigError, match="not a run folder"):
        compare_runs([blob_run, tmp_path], tiny_vials, tmp_path / "out")
    with pytest.raises(ConfigError, match="inside the data"):
        compare_runs([blob_run], tiny_vials, tiny_vials / "cmp")
    with pytest.raises(ConfigError, match="run folder"):
        compare_runs([blob_run], tiny_vials, blob_run)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not an earlier comparison"):
        compare_runs([blob_run], tiny_vials, busy)
    assert (busy / "notes.txt").read_text() == "mine"


def test_the_same_folder_name_twice_gets_distinct_labels(tiny_vials, blob_run, tmp_path) -> None:
    other = tmp_path / "b" / "blob"
    shutil.copytree(blob_run, other)
    result = compare_runs([blob_run, other], tiny_vials, tmp_path / "out", timing_images=1)
    assert [r["label"] for r in result["rows"]] == ["blob_1", "blob_2"]
    assert result["rows"][0]["image_auroc"] == result["rows"][1]["image_auroc"]
    assert not any("input sizes" in n for n in result["notes"])
