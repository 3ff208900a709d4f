"""`anomalyqc synth kit`, `line layout`, `line calibrate` and `line validate`, end to end on a
tiny generated kit, with the tables checked against decisions computed here by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import invoke, stdout_json

from anomalyqc.line.kit import read_kit
from anomalyqc.line.layout import load_layout
from anomalyqc.line.patches import cut
from anomalyqc.models.padim import Padim
from anomalyqc.models.storage import load_detector
from anomalyqc.types import Batch

pytestmark = pytest.mark.usefixtures("one_thread")
KIT = [
    "--height",
    96,
    "--frames",
    4,
    "--patch-size",
    32,
    "--defect-types",
    "black_spot,stuck_particle,scratch",
]
KEY = ["--key-frames", "1,2,4"]
P = 16  # model input: patches are cut straight at it (the kit's layout says 32)


def _kit(out: Path, seed: int, good: int, defect: int, runs: int) -> Path:
    r = invoke(
        "synth",
        "kit",
        "--out",
        out,
        "--seed",
        seed,
        "--n-good",
        good,
        "--n-defect",
        defect,
        "--runs",
        runs,
        *KIT,
    )
    assert r.exit_code == 0, r.output
    assert stdout_json(r.output)["n_images"] == (good + defect) * runs * 4
    return out


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("line")
    train = _kit(root / "train", 1, 4, 0, 2)
    # seed 4: the 3 defective calibration strips touch all four regions
    cal = _kit(root / "cal", 4, 3, 3, 3)
    test = _kit(root / "test", 3, 3, 3, 3)
    kit = read_kit(train)
    frames = np.concatenate([r.load_frames() for s in kit.strips for r in s.runs])
    x = cut(torch.from_numpy(frames).float()[:, None] / 255, kit.layout, P).reshape(-1, 1, P, P)
    # pretrained weights (shipped in a pip package): a pretrained=False backbone is drawn at
    # random each time a run is loaded, so its saved statistics would not match on reload
    det = Padim(image_size=P, allow_download=False).fit([Batch.from_images(x)])
    det.save(root / "run")
    return {"root": root, "cal": cal, "test": test, "run": root / "run"}


def test_line_layout_writes_default_layout(tmp_path: Path) -> None:
    r = invoke("line", "layout", "--out", tmp_path / "l.yaml", "--height", 96, "--patch-size", 48)
    assert r.exit_code == 0, r.output
    lay = load_layout(tmp_path / "l.yaml")
    assert (lay.image_height, lay.image_width, lay.patch_size, lay.n_vials) == (96, 120, 48, 5)
    assert lay.region_names == ["flag", "shoulder", "liquid", "bottom"]


def _hand_scores(test: Path, run: Path) -> tuple[list, np.ndarray]:
    """Scores of every acquisition computed here: key frames 1, 2, 4 cut at 32 px, one predict."""
    kit = read_kit(test)
    det = load_detector(run)
    acqs, scores = [], []
    for s in kit.strips:
        for r in s.runs:
            f = r.load_frames()[[0, 1, 3]]
            x = cut(torch.from_numpy(f).float()[:, None] / 255, kit.layout, P).reshape(-1, 1, P, P)
            with torch.inference_mode():
                scores.append(det.predict(x).score.numpy().reshape(3, 5, 4))
            acqs.append((s, r))
    return acqs, np.stack(scores)


def test_validate_tables_match_hand_computed_decisions(line: dict[str, Path]) -> None:
    thr_file = line["root"] / "thr.json"
    r = invoke("line", "calibrate", "--model", line["run"], "--kit", line["cal"], "--out", thr_file, *KEY)
    assert r.exit_code == 0, r.output
    out = line["root"] / "report"
    r = invoke(
        "line",
        "validate",
        "--model",
        line["run"],
        "--kit",
        line["test"],
        "--thresholds",
        thr_file,
        "--out",
        out,
        "--accept",
        "2/3",
        "--max-examples",
        2,
        *KEY,
    )
    assert r.exit_code == 0, r.output
    text = (out / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    rep = json.loads(text)
    thr = json.loads(thr_file.read_text())
    t = np.array([thr["regions"][n]["value"] for n in thr["region_order"]])

    acqs, s = _hand_scores(line["test"], line["run"])
    region_rej = (s >= t).any(axis=1)  # (A, V, R)
    strip_rej = region_rej.any(axis=(1, 2))
    y = np.array([st.label for st, _ in acqs])
    t2 = rep["table_10_2_strip"]
    assert t2["confusion"]["defective"]["rejected"] == int((strip_rej & (y == 1)).sum())
    assert t2["confusion"]["good"]["rejected"] == int((strip_rej & (y == 0)).sum())
    assert t2["accuracy"] == pytest.approx(float((strip_rej == (y == 1)).mean()))

    lab = np.stack([r.regions for _, r in acqs]).astype(bool)
    t1 = rep["table_10_1_region_vial"]
    for j, name in enumerate(thr["region_order"]):
        assert t1[name]["threshold"] == pytest.approx(t[j])
        assert t1[name]["confusion"]["defective"]["rejected"] == int((region_rej[..., j] & lab[..., j]).sum())
        assert t1[name]["confusion"]["good"]["rejected"] == int((region_rej[..., j] & ~lab[..., j]).sum())
    vial_rej, vial_lab = region_rej.any(-1), lab.any(-1)
    assert t1["vial"]["tpr"] == pytest.approx((vial_rej & vial_lab).sum() / vial_lab.sum())
    assert t1["vial"]["tnr"] == pytest.approx((~vial_rej & ~vial_lab).sum() / (~vial_lab).sum())

    # per product, 2 of 3: correct when at least 2 runs give the true label
    ids = sorted({st.strip_id for st, _ in acqs})
    correct = []
    for sid in ids:
        rows = [i for i, (st, _) in enumerate(acqs) if st.strip_id == sid]
        right = sum(strip_rej[i] == (y[i] == 1) for i in rows)
        correct.append(right >= 2)
    t3 = rep["table_10_3_run_policy"]
    assert t3["policy"] == "2/3" and t3["accuracy"] == pytest.approx(np.mean(correct))
    assert len(rep["errors"]["products"]) == len(ids) - sum(correct)

    n_fr = int((strip_rej & (y == 0)).sum())
    assert len(rep["errors"]["false_rejects"]) == n_fr
    for kind in ("false_rejects", "false_accepts"):
        items = rep["errors"][kind]
        assert [bool(e.get("heatmap")) for e in items] == [i < 2 for i in range(len(items))]
        assert all((out / e["heatmap"]).is_file() for e in items[:2])
    assert rep["timing"]["n_patches_per_batch"] == 60 and rep["timing"]["budget_ms"] == 500.0
    assert set(rep["timing"]["stages"]) == {"cut", "forward", "aggregate", "total"}
    assert rep["models"][0]["model_id"] == load_detector(line["run"]).model_id
    assert len(rep["kit"]["sha256"]) == 64 and rep["provenance"]["utc"]
    assert rep["positive_class"].startswith("defective")
    html = (out / "report.html").read_text()
    assert "Positive class: defective" in html and "Table 3" in html


def test_validate_calibrates_inline_and_refuses_other_models(line: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "rep"
    r = invoke(
        "line",
        "validate",
        "--model",
        line["run"],
        "--kit",
        line["test"],
        "--calibration",
        line["cal"],
        "--out",
        out,
        "--accept",
        "2/3",
        "--metric",
        "f1",
        *KEY,
    )
    assert r.exit_code == 0, r.output
    thr = json.loads((out / "thresholds.json").read_text())
    assert {c["method"] for c in thr["regions"].values()} == {"f1"}
    # thresholds for another model id are refused, naming both ids
    thr["model_ids"]["liquid"] = "0" * 16
    (tmp_path / "other.json").write_text(json.dumps(thr))
    r = invoke(
        "line",
        "validate",
        "--model",
        line["run"],
        "--kit",
        line["test"],
        "--thresholds",
        tmp_path / "other.json",
        "--out",
        tmp_path / "x",
        "--accept",
        "2/3",
        *KEY,
    )
    assert r.exit_code == 2 and "0000000000000000" in r.output and "region liquid" in r.output


def test_validate_clear_errors(line: dict[str, Path], tmp_path: Path) -> None:
    base = [
        "line",
        "validate",
        "--model",
        line["run"],
        "--kit",
        line["test"],
        "--calibration",
        line["cal"],
        "--out",
        tmp_path / "r",
    ]
    r = invoke(*base, *KEY)  # default 7/10 on a 3-run kit
    assert r.exit_code == 2 and "K/N" in r.output
    r = invoke(*base, "--accept", "1/2", *KEY)
    assert r.exit_code == 2 and "more than n/2" in r.output
    r = invoke(*base, "--accept", "2/3")  # key frame 8 of 4 frames
    assert r.exit_code == 2 and "key frame 8" in r.output
    r = invoke(*base, "--accept", "2/3", "--model", f"neck={line['run']}", *KEY)
    assert r.exit_code == 2 and "no region 'neck'" in r.output
    train_only = line["root"] / "train"
    r = invoke(*base[:6], "--calibration", train_only, "--out", tmp_path / "r", "--accept", "2/3", *KEY)
    assert r.exit_code == 2 and "no defective samples" in r.output


def test_validate_output_is_written_whole_and_never_over_other_files(
    line: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = ["line", "validate", "--model", line["run"], "--kit", line["test"], "--calibration",
            line["cal"], "--accept", "2/3", *KEY]
    # a folder holding anything but an earlier report is refused before any scoring
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.docx").write_text("keep me")
    r = invoke(*base, "--out", other)
    assert r.exit_code == 2 and "notes.docx" in r.output
    assert (other / "notes.docx").read_text() == "keep me" and len(list(other.iterdir())) == 1
    # a run that fails while writing leaves the earlier report as it was, and no half folder
    out = tmp_path / "rep"
    assert invoke(*base, "--out", out).exit_code == 0
    before = (out / "report.json").read_bytes()
    import anomalyqc.line.workflow as lw

    def broken(out_dir: Path, report: dict) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lw, "write_report", broken)
    r = invoke(*base, "--out", out)
    assert r.exit_code != 0
    assert (out / "report.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "rep"]


def test_calibrate_strip_accuracy_is_the_best_strip_rule_of_the_calibration_kit(
    line: dict[str, Path], tmp_path: Path
) -> None:
    files = {}
    for metric in ("accuracy", "strip_accuracy"):
        files[metric] = tmp_path / f"{metric}.json"
        r = invoke("line", "calibrate", "--model", line["run"], "--kit", line["cal"], "--out", files[metric],
                   "--metric", metric, *KEY)  # fmt: skip
        assert r.exit_code == 0, r.output
    thr = {k: json.loads(f.read_text()) for k, f in files.items()}
    strip = thr["strip_accuracy"]
    assert {c["method"] for c in strip["regions"].values()} == {"strip_accuracy"}
    assert strip["info"]["metric"] == "strip_accuracy" and "per acquisition" in strip["info"]["sample"]

    acqs, s = _hand_scores(line["cal"], line["run"])
    y = np.array([st.label for st, _ in acqs]) == 1

    def strip_accuracy(t: dict) -> float:
        v = np.array([t["regions"][n]["value"] for n in t["region_order"]])
        return float(((s >= v).any(axis=(1, 2, 3)) == y).mean())

    acc = strip_accuracy(strip)
    assert acc == pytest.approx(strip["regions"]["flag"]["metric_value"])
    assert acc >= strip_accuracy(thr["accuracy"])  # the per-region choice is one of its starts


def test_the_line_runs_on_the_onnx_export_with_the_same_decisions(line: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(line["run"], run)
    r = invoke("export", run)
    assert r.exit_code == 0, r.output
    thr = tmp_path / "thr.json"
    r = invoke("line", "calibrate", "--model", run, "--kit", line["cal"], "--out", thr, *KEY)
    assert r.exit_code == 0, r.output
    reports = {}
    for runtime in ("torch", "onnx"):
        out = tmp_path / runtime
        r = invoke("line", "validate", "--model", run, "--kit", line["test"], "--thresholds", thr,
                   "--out", out, "--accept", "2/3", "--runtime", runtime, *KEY)
        assert r.exit_code == 0, r.output
        reports[runtime] = json.loads((out / "report.json").read_text())
    torch_rep, onnx_rep = reports["torch"], reports["onnx"]
    assert [m["runtime"] for m in onnx_rep["models"]] == ["onnxruntime"]

    def decisions(obj):  # the tables without their timings, which differ by runtime
        if isinstance(obj, dict):
            return {k: decisions(v) for k, v in obj.items() if "_ms" not in k}
        return obj

    for table in ("table_10_1_region_vial", "table_10_2_strip", "table_10_3_run_policy"):
        assert decisions(onnx_rep[table]) == decisions(torch_rep[table])
