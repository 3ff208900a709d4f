"""Per-region thresholds for the line, chosen on a calibration kit (thesis table 10.1).

Each region (flag, shoulder, liquid, bottom) gets its own threshold. Two ways to choose them:

- per region ("accuracy", "f1"): `anomalyqc.evaluation.thresholds.select_threshold` over the
  region samples of the calibration kit: one sample per (strip, run, vial), scored by the max
  over the acquisition's patches of that region (key frames, and rank images when used),
  labelled by the kit's region ground truth (1 = defective, the positive class). Runs of
  defective strips whose region labels are unknown are left out of region calibration.
- per strip ("strip_accuracy", "strip_f1"): the thresholds that together give the best
  decision of whole acquisitions (eq. 10.3: a strip is rejected when any patch reaches its
  region's threshold), labelled by the strip's label. The line decides strips, and the
  region choice does not see that: defective region samples are a few percent of each
  region's samples, so max accuracy per region sits above most defects, and a region
  threshold that is right for its region can still reject many good strips once the max is
  taken over 60 patches. The search is a coordinate ascent (one region at a time, the others
  fixed, every distinct score of that region a candidate) from two starts, nothing rejected
  and the per-region max-accuracy thresholds when the region labels allow them; it never
  ends below its start, so on the calibration kit it is at least as good a strip rule as the
  per-region choice. Only strip labels are needed.

The thresholds file records the model id of each region's detector: scores of another model
are on another scale, so a file for other models is refused on load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anomalyqc.errors import CalibrationError, ConfigError, ModelFileError
from anomalyqc.evaluation.thresholds import ThresholdChoice, candidate_metric, select_threshold
from anomalyqc.fileio import atomic_write_json

THRESHOLDS_FORMAT = "anomalyqc-line-thresholds"
THRESHOLDS_VERSION = 1
REGION_METHODS = ("accuracy", "f1")
STRIP_METHODS = ("strip_accuracy", "strip_f1")
LINE_METHODS = REGION_METHODS + STRIP_METHODS


@dataclass
class RegionThresholds:
    """One threshold per region, with the models and settings the scores came from."""

    regions: list[str]
    choices: list[ThresholdChoice]
    model_ids: dict[str, str | None]  # region -> model id of its detector
    key_frames: tuple[int, ...]
    rank: bool
    info: dict[str, Any] = field(default_factory=dict)  # calibration kit, layout, ...

    @property
    def values(self) -> np.ndarray:
        """(R,) float64 thresholds in region order."""
        return np.array([c.value for c in self.choices], np.float64)

    def as_dict(self) -> dict[str, float]:
        return {r: c.value for r, c in zip(self.regions, self.choices)}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": THRESHOLDS_FORMAT,
            "format_version": THRESHOLDS_VERSION,
            "positive_class": "defective: a region is rejected when its score >= its threshold",
            "regions": {r: c.to_dict() for r, c in zip(self.regions, self.choices)},
            "region_order": list(self.regions),
            "model_ids": dict(self.model_ids),
            "key_frames": list(self.key_frames),
            "rank": self.rank,
            "info": self.info,
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_json(path, self.to_json())
        return path

    def check_models(self, model_ids: dict[str, str | None], source: str | Path = "thresholds") -> None:
        """Refuse thresholds calibrated on other models (scores of another model mean nothing here)."""
        if set(model_ids) != set(self.regions):
            raise ConfigError(
                f"{source}: thresholds are for regions {self.regions}, the models cover "
                f"{sorted(model_ids)}; use the layout the thresholds were calibrated with"
            )
        for r in self.regions:
            want, have = self.model_ids.get(r), model_ids[r]
            if want != have:
                raise ModelFileError(
                    f"{source}: region {r} was calibrated with model {want}, but the model given "
                    f"for it is {have}; recalibrate (`anomalyqc line calibrate`) for this model"
                )


def calibrate_thresholds(
    scores: np.ndarray,
    labels: np.ndarray,
    regions: list[str],
    method: str = "accuracy",
) -> list[ThresholdChoice]:
    """Per-region thresholds from (N, R) region scores and (N, R) labels (1 defective, 0 good,
    -1 unknown: left out). A region with no good or no defective sample is an error."""
    if method not in REGION_METHODS:
        raise ConfigError(
            f"unknown region calibration metric {method!r}; use one of {', '.join(REGION_METHODS)} "
            f"(or {', '.join(STRIP_METHODS)} through calibrate_strip_thresholds)"
        )
    s, y = np.asarray(scores, np.float64), np.asarray(labels)
    if s.shape != y.shape or s.ndim != 2 or s.shape[1] != len(regions):
        raise ValueError(f"scores {s.shape} and labels {y.shape} must both be (N, {len(regions)})")
    out = []
    for j, name in enumerate(regions):
        known = y[:, j] >= 0
        yj, sj = y[known, j], s[known, j]
        n_def = int((yj == 1).sum())
        n_good = int((yj == 0).sum())
        if n_def == 0 or n_good == 0:
            missing = "defective" if n_def == 0 else "good"
            raise CalibrationError(
                f"region {name}: the calibration kit has no {missing} samples of it ({n_good} good, "
                f"{n_def} defective region samples); add strips with {missing} {name} regions"
            )
        # A non-finite score always rejects: rank it above every finite one for the choice.
        finite = np.isfinite(sj)
        if not finite.all():
            top = float(sj[finite].max()) if finite.any() else 0.0
            sj = np.where(finite, sj, top + 1.0 + abs(top))
        out.append(select_threshold(yj, sj, method))
    return out


def _finite_ranked(m: np.ndarray) -> np.ndarray:
    """Non-finite scores (they always reject) moved above every finite one, per column."""
    m = np.array(m, np.float64)
    for j in range(m.shape[1]):
        col = m[:, j]
        finite = np.isfinite(col)
        if not finite.all():
            top = float(col[finite].max()) if finite.any() else 0.0
            col[~finite] = top + 1.0 + abs(top)
    return m


def _best_for_region(mj: np.ndarray, y: np.ndarray, others: np.ndarray, method: str) -> tuple[float, float]:
    """(threshold, metric) of region j with the other regions' rejects fixed.

    Candidates flag the acquisitions the others accept from the highest score of j down;
    ties go to the lowest threshold, and the value sits midway to the next lower score (as
    select_threshold does)."""
    n_def = int(y.sum())
    n_good = int(y.size - n_def)
    tp0, fp0 = int((others & (y == 1)).sum()), int((others & (y == 0)).sum())
    rest = ~others
    s, yr = mj[rest], y[rest]
    top = float(mj.max())
    if s.size == 0:  # the others reject everything: j changes nothing
        tp, fp = np.array([tp0]), np.array([fp0])
        name = "f1" if method == "strip_f1" else "accuracy"
        return float(np.nextafter(top, np.inf)), float(candidate_metric(name, tp, fp, n_good, n_def)[0])
    order = np.argsort(-s, kind="stable")
    s_desc, y_desc = s[order], yr[order]
    last = np.flatnonzero(np.concatenate((s_desc[1:] != s_desc[:-1], [True])))
    distinct = s_desc[last]
    tp = np.concatenate(([0], np.cumsum(y_desc)[last])) + tp0
    fp = np.concatenate(([0], (last + 1) - np.cumsum(y_desc)[last])) + fp0
    metric = candidate_metric("f1" if method == "strip_f1" else "accuracy", tp, fp, n_good, n_def)
    best = float(metric.max())
    i = int(np.flatnonzero(metric >= best - 1e-12)[-1])
    if i == 0:  # j rejects nothing the others accept: sit above every score of j
        return float(np.nextafter(top, np.inf)), best
    if i < distinct.size:
        return float((distinct[i - 1] + distinct[i]) / 2.0), best
    below = mj[mj < distinct[-1]]  # scores of acquisitions the others already reject
    lo = float(below.max()) if below.size else float(distinct[-1]) - 1.0
    return float((distinct[-1] + lo) / 2.0), best


def _strip_metric(m: np.ndarray, y: np.ndarray, t: np.ndarray, method: str) -> float:
    rej = (m >= t).any(axis=1)
    tp, fp = np.array([int((rej & (y == 1)).sum())]), np.array([int((rej & (y == 0)).sum())])
    name = "f1" if method == "strip_f1" else "accuracy"
    return float(candidate_metric(name, tp, fp, int((y == 0).sum()), int((y == 1).sum()))[0])


def calibrate_strip_thresholds(
    scores: np.ndarray,
    strip_labels: np.ndarray,
    regions: list[str],
    method: str = "strip_accuracy",
    start: np.ndarray | None = None,
    max_passes: int = 50,
) -> list[ThresholdChoice]:
    """Per-region thresholds that maximise the strip decision (eq. 10.3) on a calibration kit.

    `scores` is (A, S, V, R) patch scores of A acquisitions (or already (A, R): each
    acquisition's max per region), `strip_labels` (A,) 1 defective / 0 good. `start` is an
    optional (R,) starting point (e.g. the per-region max-accuracy thresholds); the ascent
    also starts from "reject nothing" and the better end wins. Each ThresholdChoice carries
    the strip metric reached and the strip counts.
    """
    if method not in STRIP_METHODS:
        raise ConfigError(
            f"unknown strip calibration metric {method!r}; use one of {', '.join(STRIP_METHODS)}"
        )
    s = np.asarray(scores, np.float64)
    y = np.asarray(strip_labels).astype(np.int64).ravel()
    if s.ndim == 4:
        s = s.reshape(s.shape[0], -1, s.shape[-1]).copy()
        s[~np.isfinite(s)] = np.inf
        m = s.max(axis=1)
    elif s.ndim == 2:
        m = s
    else:
        raise ValueError(f"scores must be (A, S, V, R) or (A, R), got {s.shape}")
    if m.shape != (y.size, len(regions)):
        raise ValueError(f"scores {s.shape} and labels {y.shape} do not match {len(regions)} regions")
    n_def, n_good = int((y == 1).sum()), int((y == 0).sum())
    if n_def == 0 or n_good == 0:
        missing = "defective" if n_def == 0 else "good"
        raise CalibrationError(
            f"the calibration kit has no {missing} strips ({n_good} good, {n_def} defective "
            f"acquisitions); strip-level calibration needs both: add {missing} strips"
        )
    m = _finite_ranked(m)
    starts = [np.nextafter(m.max(axis=0), np.inf)]
    if start is not None:
        starts.append(np.asarray(start, np.float64).copy())
    best_t, best_v = starts[0], -1.0
    for t in starts:
        t = t.copy()
        value = _strip_metric(m, y, t, method)
        for _ in range(max_passes):
            improved = False
            for j in range(m.shape[1]):
                others = np.asarray((np.delete(m, j, axis=1) >= np.delete(t, j)).any(axis=1))
                tj, v = _best_for_region(m[:, j], y, others, method)
                if v > value + 1e-12:
                    t[j], value, improved = tj, v, True
            if not improved:
                break
        if value > best_v + 1e-12:
            best_t, best_v = t, value
    return [ThresholdChoice(float(v), method, best_v, n_good, n_def) for v in best_t]


def load_thresholds(path: str | Path) -> RegionThresholds:
    """Read a thresholds file written by RegionThresholds.save; errors name the file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: thresholds file not found; write it with `anomalyqc line calibrate`"
        ) from None
    except (OSError, ValueError) as err:
        raise ModelFileError(
            f"{path}: not readable JSON ({err}); recalibrate with `anomalyqc line calibrate`"
        ) from None
    if not isinstance(raw, dict) or raw.get("format") != THRESHOLDS_FORMAT:
        raise ModelFileError(f'{path}: "format" must be {THRESHOLDS_FORMAT!r}; not a line thresholds file')
    if raw.get("format_version") != THRESHOLDS_VERSION:
        raise ModelFileError(
            f"{path}: format_version {raw.get('format_version')!r} is not supported "
            f"(expected {THRESHOLDS_VERSION}); recalibrate"
        )
    try:
        order = [str(r) for r in raw["region_order"]]
        choices = [ThresholdChoice.from_dict(raw["regions"][r]) for r in order]
        ids = {str(k): (None if v is None else str(v)) for k, v in raw["model_ids"].items()}
        key_frames = tuple(int(k) for k in raw["key_frames"])
        rank = bool(raw["rank"])
    except (KeyError, TypeError, ValueError) as err:
        raise ModelFileError(f"{path}: missing or malformed field ({err}); recalibrate") from None
    except ModelFileError as err:
        raise ModelFileError(f"{path}: {err}") from None
    if not all(np.isfinite(c.value) for c in choices):
        raise ModelFileError(f"{path}: a threshold is not a finite number; recalibrate")
    return RegionThresholds(order, choices, ids, key_frames, rank, dict(raw.get("info") or {}))
