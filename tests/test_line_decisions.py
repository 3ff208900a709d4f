"""Line decisions: region/vial/strip rules, the k-of-n policy, per-region thresholds, inspection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from anomalyqc.errors import CalibrationError, ConfigError, DataError, ModelFileError
from anomalyqc.evaluation.thresholds import ThresholdChoice
from anomalyqc.line.decisions import AcceptancePolicy, acquisition_decisions, region_scores, strip_margin
from anomalyqc.line.inspect import LineModels, inspect_acquisition, prepare_patches
from anomalyqc.line.layout import default_layout
from anomalyqc.line.patches import cut
from anomalyqc.line.thresholds import (
    RegionThresholds,
    calibrate_strip_thresholds,
    calibrate_thresholds,
    load_thresholds,
)
from anomalyqc.models.padim import Padim
from anomalyqc.synth.vials import VialStripConfig
from anomalyqc.types import Batch

pytestmark = pytest.mark.usefixtures("one_thread")
STRIP = VialStripConfig(height=96, vial_pitch=24)
LAYOUT = default_layout(STRIP, 32)
REGIONS = LAYOUT.region_names


# ------------------------------------------------------------------ decisions


def test_region_vial_strip_rules() -> None:
    t = np.array([1.0, 2.0, 3.0, 4.0])
    s = np.zeros((3, 5, 4))  # sources x vials x regions
    s[1, 2, 1] = 2.0  # at the shoulder threshold: rejects (>=)
    s[0, 4, 3] = 3.99  # under the bottom threshold
    s[2, 0, 0] = 0.999  # under the flag threshold
    d = acquisition_decisions(s, t)
    assert d["patch"].sum() == 1 and d["patch"][1, 2, 1]
    assert d["region"].shape == (5, 4) and d["region"][2, 1] and d["region"].sum() == 1
    assert d["vial"].tolist() == [False, False, True, False, False]
    assert bool(d["strip"])
    s[1, 2, 1] = 1.99
    assert not bool(
        acquisition_decisions(s, t)["strip"]
    )  # the same score passes a region with a higher threshold
    assert bool(acquisition_decisions(s, np.array([1.0, 1.5, 3.0, 4.0]))["strip"])


def test_non_finite_scores_always_reject() -> None:
    t = np.array([1.0, 2.0, 3.0, 4.0])
    for bad in (np.nan, np.inf, -np.inf):
        s = np.zeros((3, 5, 4))
        s[0, 1, 2] = bad
        d = acquisition_decisions(s, t)
        assert d["region"][1, 2] and d["vial"][1] and bool(d["strip"])
        assert np.isinf(strip_margin(s, t))
    s = np.zeros((2, 1, 4))
    s[1, 0, 0] = np.nan
    assert np.isnan(region_scores(s)[0, 0])


def test_strip_margin_is_eq_10_3_against_region_thresholds() -> None:
    t = np.array([1.0, 2.0, 3.0, 4.0])
    s = np.zeros((4, 3, 5, 4))  # 4 acquisitions
    s[0, 0, 0, 3] = 4.5
    s[1, 2, 4, 0] = 0.5
    s[2, 1, 1, 1] = 2.0
    m = strip_margin(s, t)
    assert m[0] == pytest.approx(0.5) and m[1] == pytest.approx(-0.5) and m[2] == pytest.approx(0.0)
    assert ((m >= 0) == acquisition_decisions(s, t)["strip"]).all()


def test_acceptance_policy_k_of_n() -> None:
    p = AcceptancePolicy()  # 7 of 10
    assert (p.k, p.n) == (7, 10)
    runs = np.zeros((6, 10), bool)
    runs[1, :3] = True  # 7 accept -> good
    runs[2, :4] = True  # 6 accept, 4 reject -> undecided
    runs[3, :7] = True  # 7 reject -> defective
    runs[4, :6] = True  # 6 reject -> undecided
    runs[5, :] = True
    assert p.decide(runs).tolist() == ["good", "good", "undecided", "defective", "undecided", "defective"]
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert p.correct(runs, labels).tolist() == [True, True, False, True, False, True]
    assert p.correct(runs, 1 - labels).tolist() == [False, False, False, False, False, False]
    assert AcceptancePolicy.parse("2/3") == AcceptancePolicy(2, 3)
    assert AcceptancePolicy(1, 1).decide(np.array([[True], [False]])).tolist() == ["defective", "good"]


@pytest.mark.parametrize("text", ["5/10", "0/3", "4/3", "7-10", "a/b"])
def test_acceptance_policy_refuses_ambiguous_or_malformed(text: str) -> None:
    with pytest.raises(ConfigError, match="acceptance policy"):
        AcceptancePolicy.parse(text)


def test_acceptance_policy_needs_n_runs_per_product() -> None:
    with pytest.raises(ConfigError, match="needs 10 runs"):
        AcceptancePolicy().decide(np.zeros((2, 3), bool))


# ------------------------------------------------------------------ thresholds


def _cal_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = (rng.random((200, 4)) < 0.3).astype(int)
    s = rng.normal(size=(200, 4)) + y * np.array([1.0, 2.0, 4.0, 8.0])  # each region its own scale
    return s, y


def test_per_region_thresholds_differ_and_max_accuracy() -> None:
    s, y = _cal_data()
    choices = calibrate_thresholds(s, y, REGIONS, "accuracy")
    for j, c in enumerate(choices):
        acc = ((s[:, j] >= c.value) == y[:, j]).mean()
        grid = np.unique(s[:, j])
        assert acc >= max(((s[:, j] >= g) == y[:, j]).mean() for g in grid) - 1e-12
        assert c.method == "accuracy" and c.n_defect == int(y[:, j].sum())
    assert len({round(c.value, 3) for c in choices}) == 4
    f1 = calibrate_thresholds(s, y, REGIONS, "f1")
    assert all(c.method == "f1" for c in f1)


def test_unknown_labels_are_left_out_and_a_missing_class_is_an_error() -> None:
    s, y = _cal_data()
    y2 = y.copy()
    y2[:, 2] = np.where(y[:, 2] == 1, -1, 0)  # liquid: only good samples known
    with pytest.raises(CalibrationError, match="region liquid: .* no defective samples"):
        calibrate_thresholds(s, y2, REGIONS)
    y3 = y.copy()
    y3[:50, 0] = -1
    assert (
        calibrate_thresholds(s, y3, REGIONS)[0].n_good + calibrate_thresholds(s, y3, REGIONS)[0].n_defect
        == 150
    )
    with pytest.raises(ConfigError, match="metric"):
        calibrate_thresholds(s, y, REGIONS, "youden")


def test_non_finite_calibration_scores_count_as_rejects() -> None:
    s, y = _cal_data()
    s[y[:, 3] == 1, 3] = np.nan  # every defective bottom failed to score
    c = calibrate_thresholds(s, y, REGIONS)[3]
    assert np.isfinite(c.value) and c.metric_value == pytest.approx(1.0)


def test_thresholds_file_round_trip_and_model_id_check(tmp_path: Path) -> None:
    s, y = _cal_data()
    ids = {r: f"id-{r}" for r in REGIONS}
    thr = RegionThresholds(REGIONS, calibrate_thresholds(s, y, REGIONS), ids, (1, 8, 16), False, {"k": 1})
    path = thr.save(tmp_path / "t.json")
    back = load_thresholds(path)
    assert back.regions == REGIONS and np.array_equal(back.values, thr.values)
    assert back.key_frames == (1, 8, 16) and back.model_ids == ids
    back.check_models(ids, path)
    with pytest.raises(ModelFileError, match="id-shoulder.*other"):
        back.check_models({**ids, "shoulder": "other"}, path)
    raw = json.loads(path.read_text())
    raw["regions"]["flag"]["value"] = None
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(ModelFileError, match="bad.json"):
        load_thresholds(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="not found"):
        load_thresholds(tmp_path / "none.json")


# ------------------------------------------------------------------ inspection


def _frames(seed: int = 0, n: int = 4) -> np.ndarray:
    from anomalyqc.synth.acquisition import AcquisitionConfig, acquire, make_strip

    cfg = AcquisitionConfig(strip=STRIP, n_frames=n, body_diameter_mm=6.0)
    return acquire(make_strip(np.random.default_rng(seed), cfg), 1, cfg).frames


@pytest.fixture(scope="module")
def padim() -> Padim:
    frames = np.concatenate([_frames(s) for s in range(3)])
    x = cut(torch.from_numpy(frames).float()[:, None] / 255, LAYOUT, 32).reshape(-1, 1, 32, 32)
    return Padim(image_size=32, pretrained=False, allow_download=False).fit([Batch.from_images(x)])


def test_one_batched_forward_pass_per_model(padim: Padim, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = padim.predict
    monkeypatch.setattr(padim, "predict", lambda x: (calls.append(x.shape[0]), real(x))[1])
    frames = _frames(7)
    res = inspect_acquisition(frames, LAYOUT, LineModels.shared(padim, REGIONS), key_frames=(1, 2, 4))
    assert calls == [60] and res.scores.shape == (3, 5, 4) and res.decisions is None
    assert set(res.timings_ms) == {"cut", "forward", "aggregate", "total"}
    # the scores are the detector's on the patches cut from the key frames
    x = cut(torch.from_numpy(frames[[0, 1, 3]]).float()[:, None] / 255, LAYOUT, 32).reshape(-1, 1, 32, 32)
    np.testing.assert_allclose(res.scores.ravel(), real(x).score.numpy(), rtol=1e-4, atol=1e-5)
    assert res.heatmap.shape == LAYOUT.image_size
    calls.clear()
    res2 = inspect_acquisition(
        frames, LAYOUT, LineModels.shared(padim, REGIONS), key_frames=(1, 2, 4), use_rank=True
    )
    assert calls == [100] and res2.sources[-2:] == ["rank_min", "rank_max"]


def test_model_per_region_and_thresholded_decisions(padim: Padim) -> None:
    other = Padim(image_size=40, pretrained=False, allow_download=False)
    frames = np.concatenate([_frames(s) for s in range(3)])
    x = cut(torch.from_numpy(frames).float()[:, None] / 255, LAYOUT, 40).reshape(-1, 1, 40, 40)
    other.fit([Batch.from_images(x)])
    models = LineModels({"flag": other, "shoulder": padim, "liquid": padim, "bottom": other})
    assert [sorted(i) for _, i in models.groups()] == [[0, 3], [1, 2]]
    base = inspect_acquisition(_frames(9), LAYOUT, models, key_frames=(1, -1))
    t = np.median(base.scores, axis=(0, 1))
    choices = [ThresholdChoice(float(v), "fixed", 0.0, 0, 0) for v in t]
    thr = RegionThresholds(REGIONS, choices, {r: None for r in REGIONS}, (1, -1), False)
    res = inspect_acquisition(_frames(9), LAYOUT, models, thr, key_frames=(1, -1))
    assert res.decisions is not None
    np.testing.assert_array_equal(res.decisions["region"], (base.scores >= t).any(axis=0))
    assert res.rejected == bool((base.scores >= t).any())


def test_patch_conversion(padim: Padim) -> None:
    rgb = Padim(image_size=24, crop_size=16, channels=3, pretrained=False, allow_download=False)
    p = torch.rand(5, 1, 32, 32)
    out = prepare_patches(p, rgb)
    assert out.shape == (5, 3, 16, 16)
    gray = Padim(image_size=32, channels=1, pretrained=False, allow_download=False)
    assert prepare_patches(torch.rand(2, 3, 32, 32), gray).shape == (2, 1, 32, 32)
    with pytest.raises(DataError, match="2 channels"):
        prepare_patches(torch.rand(2, 2, 32, 32), gray)


def test_inspect_refuses_bad_input(padim: Padim) -> None:
    models = LineModels.shared(padim, REGIONS)
    with pytest.raises(ConfigError, match="key frame 8 does not exist"):
        inspect_acquisition(_frames(1), LAYOUT, models)
    with pytest.raises(ConfigError, match="nothing to inspect"):
        inspect_acquisition(_frames(1), LAYOUT, models, key_frames=())
    with pytest.raises(DataError, match="int64"):
        inspect_acquisition(_frames(1).astype(np.int64), LAYOUT, models, key_frames=(1,))
    with pytest.raises(ConfigError, match="regions"):
        inspect_acquisition(_frames(1), LAYOUT, LineModels.shared(padim, REGIONS[:3]), key_frames=(1,))


def test_named_rank_images(padim: Padim) -> None:
    f = _frames(2)
    res = inspect_acquisition(
        {"rank_min": f.min(0), "rank_max": f.max(0)}, LAYOUT, LineModels.shared(padim, REGIONS)
    )
    ref = inspect_acquisition(f, LAYOUT, LineModels.shared(padim, REGIONS), key_frames=(), use_rank=True)
    assert res.sources == ["rank_min", "rank_max"]
    np.testing.assert_allclose(res.scores, ref.scores, rtol=1e-5)


# ------------------------------------------------------------------ report tables


def _kit_scores() -> tuple:
    """4 strips x 3 runs with hand-set scores (thresholds all 1.0): see the test for the cases."""
    from anomalyqc.line.kit import Kit, RunRecord, StripRecord
    from anomalyqc.line.validate import KitScores

    def regions(v: int | None, r: int | None) -> np.ndarray:
        a = np.zeros((5, 4), np.uint8)
        if v is not None:
            a[v, r] = 1
        return a

    spec = [("A", 0, (None, None)), ("B", 0, (None, None)), ("C", 1, (0, 2)), ("D", 1, (1, 1))]
    strips = [
        StripRecord(sid, lab, [], [RunRecord(sid, k, [], [], regions(*where)) for k in (1, 2, 3)])
        for sid, lab, where in spec
    ]
    kit = Kit(Path("kit"), LAYOUT, strips, 4, {})
    s = np.zeros((12, 2, 5, 4))
    s[0, 1, 2, 3] = np.nan  # A run 1: a failed score (bottom of vial 2) rejects
    s[3, 0, 4, 0] = s[4, 1, 4, 0] = 5.0  # B runs 1, 2: flag of vial 4
    s[6, 0, 0, 2] = s[7, 1, 0, 2] = 1.0  # C runs 1, 2: liquid of vial 0, at the threshold
    s[8, 0, 0, 2] = 0.99  # C run 3: just under
    s[9, 0, 3, 0] = 2.0  # D run 1: flag of vial 3 (not where D's defect is)
    acqs = [(i, k) for i in range(4) for k in (1, 2, 3)]
    labels = np.stack([r.regions for st in strips for r in st.runs]).astype(np.int8)
    timings = [
        {"cut": 1.0, "forward": 10.0 * (a + 1), "aggregate": 1.0, "total": 12.0 + 10 * a} for a in range(12)
    ]
    thr = RegionThresholds(REGIONS, [ThresholdChoice(1.0, "fixed", 0.0, 0, 0)] * 4, {}, (1, 2), False)
    return KitScores(kit, ["frame_1", "frame_2"], acqs, s, labels, timings), thr


def test_report_tables_by_hand() -> None:
    from anomalyqc.line.validate import build_report

    ks, thr = _kit_scores()
    rep = build_report(ks, thr, AcceptancePolicy(2, 3), budget_ms=100.0)
    t2 = rep["table_10_2_strip"]
    assert t2["confusion"] == {
        "good": {"accepted": 3, "rejected": 3},
        "defective": {"accepted": 3, "rejected": 3},
    }
    assert t2["tpr"] == 0.5 and t2["tnr"] == 0.5 and t2["accuracy"] == 0.5
    t3 = rep["table_10_3_run_policy"]  # A good (2 of 3 accept), B defective, C defective (2 of 3), D good
    assert t3["confusion"] == {
        "good": {"good": 1, "defective": 1, "undecided": 0},
        "defective": {"good": 1, "defective": 1, "undecided": 0},
    }
    assert (t3["accuracy"], t3["tpr"], t3["tnr"]) == (0.5, 0.5, 0.5)
    assert sorted(p["strip_id"] for p in rep["errors"]["products"]) == ["B", "D"]
    t1 = rep["table_10_1_region_vial"]
    assert t1["liquid"]["confusion"] == {
        "good": {"accepted": 57, "rejected": 0},
        "defective": {"accepted": 1, "rejected": 2},
    }
    assert t1["flag"]["confusion"]["good"]["rejected"] == 3 and t1["flag"]["tpr"] is None
    assert t1["shoulder"]["confusion"]["defective"] == {"accepted": 3, "rejected": 0}
    assert t1["bottom"]["confusion"]["good"]["rejected"] == 1  # the NaN
    assert t1["vial"]["confusion"] == {
        "good": {"accepted": 50, "rejected": 4},
        "defective": {"accepted": 4, "rejected": 2},
    }
    fr = rep["errors"]["false_rejects"]
    assert [(e["strip_id"], e["run"]) for e in fr] == [
        ("A", 1),
        ("B", 1),
        ("B", 2),
    ]  # NaN first, then by margin
    assert fr[0]["worst_patch"] == {"source": "frame_2", "vial": 2, "region": "bottom"}
    assert {(e["strip_id"], e["run"]) for e in rep["errors"]["false_accepts"]} == {
        ("C", 3),
        ("D", 2),
        ("D", 3),
    }
    tm = rep["timing"]  # first batch left out as warm-up: totals 22, 32, ..., 122
    assert tm["n_batches_timed"] == 11 and tm["median"] == 72.0 and tm["max"] == 122.0
    assert tm["p95_within_budget"] is False and tm["n_patches_per_batch"] == 40
    assert tm["mean_per_patch_ms"] == pytest.approx(72.0 / 40)
    json.dumps(rep, allow_nan=False)  # strict JSON as it stands


# ------------------------------------------------------------------ strip-level thresholds


def _line_scores(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, S, V, R) patch scores, (A,) strip labels, (A, V, R) region labels: half the strips
    defective, each with one faint defective patch (+1 to +4 sd) in one vial and region, 3
    sources x 5 vials. A defective region sample is 1 in 40, so max accuracy per region sits
    high, above most of these defects."""
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(n, 3, 5, 4))
    y = (np.arange(n) % 2).astype(int)
    lab = np.zeros((n, 5, 4), int)
    for a in np.flatnonzero(y):
        v, r = rng.integers(5), rng.integers(4)
        s[a, rng.integers(3), v, r] += rng.uniform(1.0, 4.0)
        lab[a, v, r] = 1
    return s, y, lab


def _strip_accuracy(scores: np.ndarray, y: np.ndarray, t: np.ndarray) -> float:
    return float((acquisition_decisions(scores, t)["strip"] == y.astype(bool)).mean())


def test_strip_thresholds_beat_region_max_accuracy_as_a_strip_rule() -> None:
    s, y, lab = _line_scores(0, 600)
    region = calibrate_thresholds(region_scores(s).reshape(-1, 4), lab.reshape(-1, 4), REGIONS, "accuracy")
    t_region = np.array([c.value for c in region])
    strip = calibrate_strip_thresholds(s, y, REGIONS, "strip_accuracy", start=t_region)
    t_strip = np.array([c.value for c in strip])
    assert all(c.method == "strip_accuracy" and (c.n_good, c.n_defect) == (300, 300) for c in strip)
    assert not np.allclose(t_region, t_strip)
    acc_region, acc_strip = _strip_accuracy(s, y, t_region), _strip_accuracy(s, y, t_strip)
    assert strip[0].metric_value == pytest.approx(acc_strip)
    assert acc_strip > acc_region + 0.05
    assert (t_strip <= t_region + 1e-12).all()  # lower: the strip rule wants more of the faint ones
    # not an artefact of the calibration draw: the same holds on fresh strips
    s2, y2, _ = _line_scores(1, 4000)
    assert _strip_accuracy(s2, y2, t_strip) > _strip_accuracy(s2, y2, t_region) + 0.02


def test_strip_thresholds_are_a_local_optimum_and_f1_is_selectable() -> None:
    s, y, _ = _line_scores(2, 120)
    m = s.reshape(len(s), -1, 4).max(axis=1)
    for method in ("strip_accuracy", "strip_f1"):
        t = np.array([c.value for c in calibrate_strip_thresholds(s, y, REGIONS, method)])
        rej = (m >= t).any(axis=1)
        tp, fp, fn = (rej & (y == 1)).sum(), (rej & (y == 0)).sum(), (~rej & (y == 1)).sum()
        best = (rej == y).mean() if method == "strip_accuracy" else 2 * tp / (2 * tp + fp + fn)
        for j in range(4):  # no single region's threshold, moved to any score, does better
            for g in np.concatenate([m[:, j], [np.inf]]):
                t2 = t.copy()
                t2[j] = g
                r2 = (m >= t2).any(axis=1)
                tp, fp, fn = (r2 & (y == 1)).sum(), (r2 & (y == 0)).sum(), (~r2 & (y == 1)).sum()
                v = (r2 == y).mean() if method == "strip_accuracy" else 2 * tp / (2 * tp + fp + fn)
                assert v <= best + 1e-12
    # (A, R) maxima give the same as (A, S, V, R) scores; a NaN patch rejects its strip
    t4 = [c.value for c in calibrate_strip_thresholds(s, y, REGIONS)]
    assert t4 == [c.value for c in calibrate_strip_thresholds(m, y, REGIONS)]
    s[0, 0, 0, 0] = np.nan
    t5 = np.array([c.value for c in calibrate_strip_thresholds(s, y, REGIONS)])
    assert bool(acquisition_decisions(s[0], t5)["strip"])


def test_strip_thresholds_clear_errors() -> None:
    s, y, _ = _line_scores(0, 20)
    with pytest.raises(CalibrationError, match="no defective strips"):
        calibrate_strip_thresholds(s, np.zeros_like(y), REGIONS)
    with pytest.raises(ConfigError, match="strip_accuracy"):
        calibrate_strip_thresholds(s, y, REGIONS, "accuracy")
    with pytest.raises(ConfigError, match="strip_accuracy"):
        calibrate_thresholds(s[:, 0, 0], y[:, None].repeat(4, 1), REGIONS, "strip_accuracy")
