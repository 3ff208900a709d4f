"""ONNX export: parity with the torch model checked at export, the ONNX Runtime inferencer
behind predict, stale or edited exports refused, and the CLI around them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import invoke, stdout_json

from anomalyqc.errors import ConfigError, ModelFileError
from anomalyqc.export.onnx import EXPORT_DIR, INFO_FILE, MODEL_FILE, OnnxDetector, export_run
from anomalyqc.models import Ganomaly, Mhbc, Patchcore, Resganad
from anomalyqc.types import Batch

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g)


def _fitted_run(det, tmp_path: Path) -> Path:
    det.fit([Batch.from_images(_images(4, seed=s)) for s in (1, 2)])
    return det.save(tmp_path / det.name)


@pytest.mark.parametrize("make", [
    lambda: Mhbc(image_size=64, n_clusters=2),
    lambda: Patchcore(image_size=64),
    lambda: Resganad(image_size=64, preset="small", max_steps=2, batch_size=4, width=8),
    lambda: Ganomaly(image_size=64, max_steps=2, batch_size=4, width=8, stages=3),
], ids=["mhbc", "patchcore", "resganad", "ganomaly"])
def test_export_agrees_with_torch_for_every_detector_family(make, tmp_path: Path) -> None:
    run = _fitted_run(make(), tmp_path)
    info = export_run(run)
    assert info["parity"]["within_tolerance"]
    assert info["parity"]["max_abs_score_diff"] <= info["parity"]["score_tolerance"]
    x = _images(5, seed=9)
    onnx = OnnxDetector(run).predict(x)
    from anomalyqc.models.storage import load_detector

    ref = load_detector(run).predict(x)
    scale = float(ref.score.abs().max())
    assert torch.allclose(onnx.score, ref.score, rtol=0, atol=1e-4 + 1e-4 * scale)
    assert onnx.anomaly_map.shape == ref.anomaly_map.shape


def test_padim_export_on_vials_and_the_predict_runtime_switch(run_copy: Path, tiny_vials: Path,
                                                             tmp_path: Path) -> None:
    r = invoke("export", run_copy, "--data", tiny_vials)
    assert r.exit_code == 0, r.output
    info = stdout_json(r.output)
    assert info["parity"]["within_tolerance"] and info["parity"]["n_images"] == 8
    assert info["source_model_id"] == json.loads((run_copy / "manifest.json").read_text())[
        "model_id"]
    rows = {}
    for runtime in ("torch", "onnx"):
        r = invoke("predict", run_copy, tiny_vials / "test" / "good", tiny_vials / "test" / "scratch",
                   "--out", tmp_path / runtime,
                   "--runtime", runtime)
        assert r.exit_code == 0, r.output
        rows[runtime] = json.loads((tmp_path / runtime / "predictions.json").read_text())
    assert len(rows["torch"]) == len(rows["onnx"]) > 0
    for a, b in zip(rows["torch"], rows["onnx"], strict=True):
        assert a["path"] == b["path"]
        assert abs(a["score"] - b["score"]) <= 1e-4 + 1e-4 * abs(a["score"])
    r = invoke("benchmark", run_copy, "--data", tiny_vials, "--repeats", 5, "--batch-size", 4,
               "--onnx")
    assert r.exit_code == 0, r.output
    cmp = stdout_json(r.output)["torch_vs_onnxruntime"]["batches"]
    assert set(cmp) == {"1", "4", "60"}
    assert cmp["60"]["speedup_onnxruntime"] > 0 and cmp["60"]["onnxruntime"]["n"] >= 5


def test_evaluate_on_the_onnx_runtime_gives_torchs_metrics(run_copy: Path, tiny_vials: Path,
                                                            tmp_path: Path) -> None:
    assert invoke("export", run_copy, "--data", tiny_vials).exit_code == 0
    got = {}
    for runtime in ("torch", "onnx"):
        r = invoke("evaluate", run_copy, "--data", tiny_vials, "--runtime", runtime,
                   "--report", tmp_path / runtime / "metrics.json")
        assert r.exit_code == 0, r.output
        got[runtime] = stdout_json(r.output)
    assert got["onnx"]["identity"]["runtime"] == "onnxruntime"
    assert got["torch"]["identity"]["runtime"] == "torch"
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1", "threshold"):
        assert got["onnx"][key] == pytest.approx(got["torch"][key], abs=1e-4), key
    assert (tmp_path / "onnx" / "report.html").is_file()


def test_export_outside_the_tolerance_is_refused_and_writes_nothing(run_copy: Path) -> None:
    # float32 kernels never agree to the last bit between the runtimes: zero tolerance fails
    with pytest.raises(ConfigError, match="disagrees with the torch model.*nothing was written"):
        export_run(run_copy, rtol=0.0, atol=0.0)
    assert not (run_copy / EXPORT_DIR).exists()


def test_a_looser_map_tolerance_is_the_users_to_give_and_is_recorded(run_copy: Path) -> None:
    # no tolerance fails (above); a loose map tolerance alone does not pass the scores
    with pytest.raises(ConfigError, match="disagrees"):
        export_run(run_copy, rtol=0.0, atol=0.0, map_rtol=0.5)
    r = invoke("export", run_copy, "--map-rtol", "0.5")
    assert r.exit_code == 0, r.output
    check = stdout_json(r.output)["parity"]
    assert check["map_rtol"] == 0.5 and check["map_tolerance"] > 100 * check["score_tolerance"]
    r = invoke("export", run_copy, "--map-rtol", "-1", "--overwrite")
    assert r.exit_code != 0 and "tolerances must be >= 0" in r.output


def test_stale_or_edited_exports_are_refused(run_copy: Path, tmp_path: Path) -> None:
    export_run(run_copy)
    with pytest.raises(ConfigError, match="holds an export already.*--overwrite"):
        export_run(run_copy)
    edited = tmp_path / "edited"
    shutil.copytree(run_copy, edited)
    with open(edited / EXPORT_DIR / MODEL_FILE, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelFileError, match="does not match the hash"):
        OnnxDetector(edited)
    # the run refitted (another model id) while its export stayed: stale
    from anomalyqc.models.storage import load_detector

    det = load_detector(run_copy)
    det.config.blur_sigma = 1.0
    det.save(run_copy)
    with pytest.raises(ModelFileError, match="export it again"):
        OnnxDetector(run_copy)
    with pytest.raises(ModelFileError, match="no ONNX export"):
        OnnxDetector(tmp_path)


def test_int8_is_kept_only_within_its_tolerance(run_copy: Path) -> None:
    info = export_run(run_copy, int8=True)
    q = info["int8"]
    on_disk = json.loads((run_copy / EXPORT_DIR / INFO_FILE).read_text())["int8"]
    assert on_disk["kept"] == q["kept"]
    assert (run_copy / EXPORT_DIR / "model.int8.onnx").exists() == q["kept"]
    assert q["parity"]["within_tolerance"] == q["kept"]
    if q["kept"]:
        x = _images(3, seed=4)
        from anomalyqc.models.storage import load_detector

        ref = load_detector(run_copy).predict(x).score
        got = OnnxDetector(run_copy, int8=True).predict(x).score
        assert float((got - ref).abs().max()) <= 1e-4 + q["parity"]["rtol"] * float(ref.abs().max()) * 2
    else:
        with pytest.raises(ModelFileError, match="no int8 export"):
            OnnxDetector(run_copy, int8=True)


def test_a_grdnet_trained_on_rois_exports_with_an_roi_input(tmp_path: Path) -> None:
    from anomalyqc.models import Grdnet

    x = _images(8, size=32, seed=5)
    roi = torch.zeros(8, 1, 32, 32)
    roi[:, :, 4:28, 8:24] = 1.0
    det = Grdnet(image_size=32, width=4, unet_width=4, unet_depth=2, epochs=1, batch_size=4,
                 loss_curves=False, score_window=5)
    det.fit([Batch(image=x, label=torch.zeros(8, dtype=torch.long), roi=roi)])
    assert det.needs_roi
    run = det.save(tmp_path / "grdnet")
    info = export_run(run)
    assert info["parity"]["within_tolerance"] and info["roi_input"]["name"] == "roi"
    onnx = OnnxDetector(run)
    assert onnx.needs_roi and onnx.uses_roi
    with pytest.raises(ConfigError, match="needs one per image"):
        onnx.predict(x)
    test = Batch(image=_images(3, size=32, seed=6), label=torch.zeros(3, dtype=torch.long),
                 roi=roi[:3])
    got, ref = onnx.predict(test), det.predict(test)
    assert torch.allclose(got.score, ref.score, atol=1e-4 + 1e-4 * float(ref.score.abs().max()))
    # outside the ROI the map is zero in both runtimes
    assert float(got.anomaly_map[..., :, :8].abs().max()) == 0.0
