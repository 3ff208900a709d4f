"""Fail-safe decisions and early refusals (issue 7, sections 1 and 4): a NaN or infinite
value on the way to a decision is never "good", every JSON file is strict, and options or
parameters that cannot work are refused in one line before any work starts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL, invoke, reseal, stdout_json
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score

from anomalyqc.errors import ConfigError, ModelFileError
from anomalyqc.evaluation.metrics import rank_non_finite
from anomalyqc.fileio import atomic_write_json
from anomalyqc.models import Mhbc, Padim, Patchcore
from anomalyqc.models.storage import load_detector
from anomalyqc.types import Batch, Prediction

pytestmark = pytest.mark.usefixtures("one_thread")


def strict_json(path: Path):
    """Parse as strict JSON: NaN, Infinity and -Infinity are errors, as in most readers."""
    def refuse(name: str):
        raise ValueError(f"{path} holds {name}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def one_line_error(r, *needles: str) -> None:
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert "Traceback" not in r.output
    for needle in needles:
        assert needle in r.output, (needle, r.output)


# ------------------------------------------------------------------------------ strict JSON
def test_json_files_are_strict_with_non_finite_floats_as_null(tmp_path: Path):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"a": math.nan, "b": [math.inf, 1.5, -math.inf],
                             "c": {"d": np.float64("nan")}, "e": (2.0, math.nan)})
    assert strict_json(path) == {"a": None, "b": [None, 1.5, None], "c": {"d": None},
                                 "e": [2.0, None]}


def test_rank_non_finite_puts_failures_above_every_score_and_the_threshold():
    s = rank_non_finite([1.0, math.nan, 3.0, math.inf, -math.inf], above=10.0)
    assert s[0] == 1.0 and s[2] == 3.0
    assert all(s[i] > 10.0 and math.isfinite(s[i]) for i in (1, 3, 4))
    s = rank_non_finite([math.nan, -2.0])
    assert s[0] > -2.0 and s[1] == -2.0
    assert np.isfinite(rank_non_finite([math.nan, math.nan])).all()


# --------------------------------------------------------------------- non-finite scores
def _poison(monkeypatch, value: float, path_part: str | None = None) -> None:
    """Make Padim.predict return `value` as the score (and map) of one image per call: the
    one whose path contains `path_part` for a Batch, the first of a plain tensor."""
    original = Padim.predict

    def predict(self, images):
        pred = original(self, images)
        score, amap = pred.score.clone(), pred.anomaly_map.clone()
        if isinstance(images, Batch):
            hit = [i for i, p in enumerate(images.path) if path_part and path_part in p]
        else:
            hit = [0]
        for i in hit:
            score[i] = value
            amap[i] = value
        return Prediction(score=score, anomaly_map=amap, timings=pred.timings)

    monkeypatch.setattr(Padim, "predict", predict)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_predict_rejects_a_non_finite_score_with_a_reason(monkeypatch, run_copy: Path,
                                                          tiny_vials: Path, tmp_path: Path,
                                                          value: float):
    # a threshold above every real score: all four images would be "good"
    r = invoke("calibrate", run_copy, "--data", tiny_vials, "--threshold-method", "fixed",
               "--threshold", 1e9)
    assert r.exit_code == 0, r.output
    _poison(monkeypatch, value)
    out = tmp_path / "p"
    r = invoke("predict", run_copy, tiny_vials / "test" / "good", "--out", out)
    assert r.exit_code == 0, r.output
    rows = strict_json(out / "predictions.json")
    assert len(rows) == 4
    bad, *rest = rows
    assert bad["score"] is None and bad["decision"] == "defect"
    assert bad["reason"] == "non-finite score: rejected"
    assert all(row["decision"] == "good" and row["reason"] == "score < threshold"
               and row["score"] < 1e9 for row in rest)
    assert r.output.count("warning:") == 1
    assert f"warning: {bad['path']}: non-finite score: rejected" in r.output
    assert Path(bad["heatmap"]).is_file()


def test_a_non_finite_score_is_a_defect_even_uncalibrated(monkeypatch, tiny_run: Path,
                                                         tiny_vials: Path, tmp_path: Path):
    _poison(monkeypatch, math.nan)
    out = tmp_path / "p"
    r = invoke("predict", tiny_run, tiny_vials / "test" / "good", "--out", out)
    assert r.exit_code == 0, r.output
    rows = strict_json(out / "predictions.json")
    assert [row["decision"] for row in rows] == ["defect", None, None, None]
    assert [row["reason"] for row in rows] == ["non-finite score: rejected"] + \
        ["uncalibrated"] * 3


def test_decision_reasons_follow_the_threshold(run_copy: Path, tiny_vials: Path,
                                               tmp_path: Path):
    r = invoke("evaluate", run_copy, "--data", tiny_vials, "--report", tmp_path / "rep" / "m.json")
    assert r.exit_code == 0, r.output
    out = tmp_path / "p"
    r = invoke("predict", run_copy, *sorted((tiny_vials / "test").iterdir()), "--out", out)
    assert r.exit_code == 0, r.output
    rows = strict_json(out / "predictions.json")
    assert {row["reason"] for row in rows} == {"score >= threshold", "score < threshold"}
    for row in rows:
        above = row["score"] >= row["threshold"]
        assert row["decision"] == ("defect" if above else "good")
        assert row["reason"] == ("score >= threshold" if above else "score < threshold")


def test_evaluate_counts_a_non_finite_score_as_rejected_and_says_so(monkeypatch, run_copy: Path,
                                                                    tiny_vials: Path,
                                                                    tmp_path: Path):
    _poison(monkeypatch, math.nan, path_part="good/000")
    report = tmp_path / "rep" / "metrics.json"
    r = invoke("evaluate", run_copy, "--data", tiny_vials, "--report", report,
               "--threshold-method", "fixed", "--threshold", 1e9)
    assert r.exit_code == 0, r.output
    m = stdout_json(r.stdout)
    record = strict_json(report)
    rows = {Path(row["path"]).parent.name + "/" + Path(row["path"]).name: row
            for row in record["images"]}
    bad = rows["good/000.png"]
    assert bad["score"] is None and bad["decision"] == "defect"
    # every other image is below 1e9: good; the failed good image is a false positive
    assert sum(row["decision"] == "defect" for row in record["images"]) == 1
    assert m["tnr"] == 0.75 and m["tpr"] == 0.0
    assert m["n_non_finite_scores"] == 1 and record["n_non_finite_scores"] == 1
    assert any("1 of 8 images had a non-finite" in n and "000.png" in n for n in m["notes"])
    assert "note: 1 of 8 images had a non-finite" in r.output
    # it ranks as the most anomalous image for AUROC
    labels = [row["label"] for row in record["images"]]
    ranked = [math.inf if row["score"] is None else row["score"] for row in record["images"]]
    ranked = [max(s for s in ranked if s != math.inf) + 1 if s == math.inf else s
              for s in ranked]
    assert m["image_auroc"] == pytest.approx(roc_auc_score(labels, ranked))
    assert m["pixel_auroc"] is not None  # the NaN map ranks high too, it does not fail


def test_calibrate_counts_a_non_finite_score_and_says_so(monkeypatch, run_copy: Path,
                                                         tiny_vials: Path):
    _poison(monkeypatch, math.inf, path_part="good/001")
    r = invoke("calibrate", run_copy, "--data", tiny_vials)
    assert r.exit_code == 0, r.output
    c = stdout_json(r.stdout)
    assert c["n_non_finite_scores"] == 1 and math.isfinite(c["threshold"])
    assert "good/001.png" in c["notes"][0] and "note: 1 of 8 images" in r.output
    assert c["calibration_tnr"] <= 0.75  # the failed good image is rejected at any threshold
    strict_json(run_copy / "threshold.json")


# ------------------------------------------------------------------ non-finite model files
@pytest.mark.parametrize("tensor_name,value", [("mean", math.nan), ("chol", math.inf),
                                               ("moments.sum", -math.inf)])
def test_non_finite_weights_are_refused_naming_file_and_tensor(run_copy: Path, tiny_vials: Path,
                                                               tmp_path: Path, tensor_name: str,
                                                               value: float):
    weights = run_copy / "weights.safetensors"
    tensors = load_file(weights)
    t = tensors[tensor_name].clone()
    t.view(-1)[3] = value
    tensors[tensor_name] = t
    save_file(tensors, weights)
    reseal(run_copy)  # a consistent forgery: the finiteness check must catch it
    if tensor_name.startswith("moments."):  # read only when merging
        with pytest.raises(ModelFileError, match=f"'{tensor_name}'"):
            load_detector(run_copy, merge_state=True)
        return
    with pytest.raises(ModelFileError, match=rf"weights\.safetensors.*'{tensor_name}'.*1 NaN"):
        load_detector(run_copy)
    r = invoke("predict", run_copy, tiny_vials / "test" / "good", "--out", tmp_path / "p")
    one_line_error(r, str(weights), f"'{tensor_name}'", "NaN or infinite")
    assert not (tmp_path / "p" / "predictions.json").exists()


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_non_finite_threshold_file_is_refused(run_copy: Path, tiny_vials: Path,
                                                tmp_path: Path, text: str):
    record = ('{"image": {"value": VALUE, "method": "f1", "metric_value": 1.0, "n_good": 4, '
              '"n_defect": 4}, "data": "/x", "written_by": "calibrate"}')
    (run_copy / "threshold.json").write_text(record.replace("VALUE", text))
    r = invoke("predict", run_copy, tiny_vials / "test" / "good", "--out", tmp_path / "p")
    one_line_error(r, "threshold.json", "not a finite number", "anomalyqc calibrate")


@pytest.mark.parametrize("params,needles", [
    ({"eps": "abc"}, ["eps='abc'"]),
    ({"eps": -1}, ["eps=-1", "> 0"]),
    ({"image_size": 4}, ["image_size=4x4", "at least 16"]),
    ({"patch_size": True}, ["patch_size=True"]),
    ({"surprise": 1}, ["unknown parameter 'surprise'"]),
    ([1, 2], ['"params" is list']),
])
def test_bad_params_in_config_json_are_a_model_file_error(run_copy: Path, tiny_vials: Path,
                                                          tmp_path: Path, params, needles):
    cfg_path = run_copy / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["params"] = {**cfg["params"], **params} if isinstance(params, dict) else params
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="config.json.*does not match"):
        load_detector(run_copy)  # the manifest catches any edit
    reseal(run_copy)  # a consistent forgery: the params check must catch it
    with pytest.raises(ModelFileError, match="config.json"):
        load_detector(run_copy)
    r = invoke("predict", run_copy, tiny_vials / "test" / "good", "--out", tmp_path / "p")
    one_line_error(r, str(cfg_path), *needles)


# ------------------------------------------------------------------ detector parameters
@pytest.mark.parametrize("cls,params,needles", [
    (Mhbc, {"reduction": "srp", "reduced_dim": 0}, ["reduced_dim=0", ">= 1"]),
    (Mhbc, {"n_clusters": 0}, ["n_clusters=0", ">= 1"]),
    (Mhbc, {"eps": -1}, ["eps=-1", "> 0"]),
    (Padim, {"eps": 0}, ["eps=0", "> 0"]),
    (Padim, {"eps": math.nan}, ["eps=nan", "finite"]),
    (Padim, {"blur_sigma": -0.5}, ["blur_sigma=-0.5", ">= 0"]),
    (Padim, {"patch_size": 2}, ["patch_size=2", "odd"]),
    (Patchcore, {"coreset_ratio": 0}, ["coreset_ratio=0", "> 0"]),
    (Patchcore, {"coreset_ratio": 1.5}, ["coreset_ratio=1.5", "<= 1"]),
    (Mhbc, {"clustering": "coreset", "coreset_ratio": 2}, ["coreset_ratio=2", "<= 1"]),
    (Patchcore, {"n_neighbors": 0}, ["n_neighbors=0", ">= 1"]),
    (Mhbc, {"init_images": 0}, ["init_images=0", ">= 1"]),
    (Padim, {"seed": -1}, ["seed=-1", ">= 0"]),
    (Padim, {"channels": 2}, ["channels=2", "1 (gray), 3 (RGB)"]),
    (Mhbc, {"n_clusters": True}, ["n_clusters=True", "not true/false"]),
    (Padim, {"image_size": 8}, ["image_size=8x8", "at least 16"]),
    (Padim, {"image_size": (64, 15)}, ["image_size=64x15", "at least 16"]),
    (Padim, {"image_size": 64, "crop_size": 12}, ["crop_size=12x12", "at least 16"]),
    (Padim, {"image_size": 64, "crop_size": (32, 80)}, ["crop_size 32x80", "image_size 64x64"]),
    (Padim, {"backbone": "vgg_nope"}, ["backbone='vgg_nope'", "efficientnet_lite0"]),
    (Padim, {"reduction": "tsne"}, ["reduction='tsne'", "'srp'"]),
])
def test_bad_detector_parameters_are_one_line_naming_value_and_range(cls, params, needles):
    with pytest.raises(ConfigError) as info:
        cls(**params)
    message = str(info.value)
    assert "\n" not in message and "errors.pydantic.dev" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_the_smallest_size_the_backbone_takes_works_and_is_the_real_minimum():
    from anomalyqc.backbones.extractor import FeatureExtractor

    fe = FeatureExtractor("efficientnet_lite0", 1, pretrained=False)
    assert fe(torch.rand(1, 3, 16, 16)).shape[-2:] == (2, 2)
    with pytest.raises(RuntimeError):  # one pixel less and the network itself fails
        fe(torch.rand(1, 3, 15, 16))
    det = Padim(image_size=16, pretrained=False, allow_download=False)
    det.fit([Batch.from_images(torch.rand(3, 3, 16, 16))])
    assert torch.isfinite(det.predict(torch.rand(1, 3, 16, 16)).score).all()


# ----------------------------------------------------------------------------- CLI misuse
def _fit(data: Path, out: Path, *extra) -> tuple:
    return ("fit", "padim", "--data", data, "--out", out, *SMALL, *extra)


@pytest.mark.parametrize("extra,needles", [
    (["--batch-size", 0], ["--batch-size must be at least 1, got 0"]),
    (["--workers", -1], ["--workers must be at least 0, got -1"]),
    (["--set", "image_size=128"], ["--set image_size=128", "--image-size"]),
    (["--set", "crop_size=[32,32]"], ["--set crop_size=[32, 32]", "--crop-size"]),
    (["--set", "backbone=\"resnet18\""], ["--set backbone=\"resnet18\"", "--backbone"]),
    (["--set", "foo=1"], ["unknown parameter 'foo'", "valid parameters:", "blur_sigma, "]),
    (["--image-size", 3], ["image_size=3x3", "at least 16"]),
    (["--image-size", 8], ["image_size=8x8", "at least 16"]),
    (["--set", "eps=-1"], ["eps=-1", "> 0"]),
    (["--set", "eps=NaN"], ["eps=nan", "finite"]),
])
def test_fit_misuse_is_refused_before_the_data_is_read(tmp_path: Path, extra, needles):
    # the data folder does not exist: an option checked after reading it would say so
    r = invoke(*_fit(tmp_path / "nowhere", tmp_path / "run"), *extra)
    one_line_error(r, *needles)
    assert "nowhere" not in r.output and not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra,needles", [
    (["--set", "reduction=\"srp\"", "--set", "reduced_dim=0"], ["reduced_dim=0", ">= 1"]),
    (["--set", "n_clusters=0"], ["n_clusters=0", ">= 1"]),
    (["--set", "eps=-1"], ["eps=-1", "> 0"]),
])
def test_mhbc_parameters_from_the_issue_are_refused(tmp_path: Path, extra, needles):
    r = invoke("fit", "mhbc", "--data", tmp_path / "nowhere", "--out", tmp_path / "run", *extra)
    one_line_error(r, "invalid mhbc parameters", *needles)


def test_fit_and_predict_out_may_not_be_an_existing_file(tiny_run: Path, tiny_vials: Path,
                                                         tmp_path: Path):
    file = tmp_path / "taken.txt"
    file.write_text("keep me")
    one_line_error(invoke(*_fit(tmp_path / "nowhere", file)), str(file), "is an existing file")
    one_line_error(invoke(*_fit(tmp_path / "nowhere", file / "run")), str(file),
                   "is a file, not a folder")
    r = invoke("predict", tiny_run, tiny_vials / "test" / "good", "--out", file)
    one_line_error(r, "--out", str(file), "is an existing file")
    r = invoke("merge", tiny_run, tiny_run, "--out", file)
    one_line_error(r, "--out", str(file))
    assert file.read_text() == "keep me"


@pytest.mark.parametrize("batch", [0, -1])
def test_predict_batch_size_below_one_is_refused(tiny_run: Path, tiny_vials: Path,
                                                 tmp_path: Path, batch: int):
    out = tmp_path / "p"
    r = invoke("predict", tiny_run, tiny_vials / "test" / "good", "--out", out,
               "--batch-size", batch)
    one_line_error(r, f"--batch-size must be at least 1, got {batch}")
    assert not out.exists()


def test_evaluate_calibrate_benchmark_misuse_is_refused_before_scoring(run_copy: Path,
                                                                       tiny_vials: Path,
                                                                       tmp_path: Path):
    run, data = run_copy, tiny_vials
    cases = [
        (("evaluate", run, "--data", data, "--batch-size", 0), ["--batch-size must be at"]),
        (("calibrate", run, "--data", data, "--batch-size", 0), ["--batch-size must be at"]),
        (("benchmark", run, "--data", data, "--repeats", 0), ["--repeats must be at least 1"]),
        (("benchmark", run, "--data", data, "--batch-size", 0), ["--batch-size must be at"]),
        (("benchmark", run, "--data", data, "--out", tmp_path), ["is a folder"]),
        (("calibrate", run, "--data", data, "--threshold", 3),
         ["--threshold 3 is only used with --threshold-method fixed"]),
        (("calibrate", run, "--data", data, "--threshold-method", "fixed"),
         ["--threshold-method fixed needs --threshold VALUE"]),
        (("evaluate", run, "--data", data, "--threshold-method", "fixed"),
         ["--threshold-method fixed needs --threshold VALUE"]),
        (("evaluate", run, "--data", data, "--threshold", 3),
         ["--threshold 3 is only used with --threshold-method fixed"]),
        (("evaluate", run, "--data", data, "--report", tmp_path), ["is a folder"]),
    ]
    for args, needles in cases:
        one_line_error(invoke(*args), *needles)
    assert not (run / "threshold.json").exists() and not (run / "report").exists()


def test_evaluate_never_replaces_a_calibrated_threshold_by_accident(run_copy: Path,
                                                                    tiny_vials: Path,
                                                                    tmp_path: Path):
    r = invoke("calibrate", run_copy, "--data", tiny_vials, "--threshold-method", "youden")
    assert r.exit_code == 0, r.output
    before = (run_copy / "threshold.json").read_bytes()
    r = invoke("evaluate", run_copy, "--data", tiny_vials, "--recalibrate", "--threshold", 3)
    one_line_error(r, "--recalibrate", "would ignore --threshold 3",
                   "--threshold-method fixed --threshold 3")
    r = invoke("evaluate", run_copy, "--data", tiny_vials, "--threshold-method", "accuracy")
    one_line_error(r, "already has a threshold", "--threshold-method accuracy would be ignored",
                   "--recalibrate")
    assert (run_copy / "threshold.json").read_bytes() == before
    # the ways out the messages name both work
    r = invoke("evaluate", run_copy, "--data", tiny_vials, "--report", tmp_path / "ra" / "a.json",
               "--recalibrate", "--threshold-method", "fixed", "--threshold", 3)
    assert r.exit_code == 0 and stdout_json(r.stdout)["threshold"] == 3, r.output
    r = invoke("evaluate", run_copy, "--data", tiny_vials, "--report", tmp_path / "rb" / "b.json",
               "--recalibrate", "--threshold-method", "accuracy")
    assert r.exit_code == 0 and stdout_json(r.stdout)["threshold_method"] == "accuracy"


def test_report_may_not_replace_a_file_that_is_not_a_metrics_file(run_copy: Path,
                                                                  tiny_vials: Path,
                                                                  tmp_path: Path):
    config = run_copy / "config.json"
    before = config.read_bytes()
    r = invoke("evaluate", run_copy, "--data", tiny_vials, "--report", config)
    one_line_error(r, str(config.parent), "run folder")
    assert config.read_bytes() == before and not (run_copy / "report.html").exists()
    # a metrics file an earlier evaluate wrote may be replaced
    report = tmp_path / "rep" / "m.json"  # a report replaces its folder: one of its own
    assert invoke("evaluate", run_copy, "--data", tiny_vials, "--report", report).exit_code == 0
    r = invoke("evaluate", run_copy, "--data", tiny_vials, "--report", report)
    assert r.exit_code == 0, r.output
