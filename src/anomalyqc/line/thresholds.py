"""Per-region thresholds for the line, chosen on a calibration kit (thesis table 10.1).

Each region (flag, shoulder, liquid, bottom) gets its own threshold, chosen by
`anomalyqc.evaluation.thresholds.select_threshold` (max accuracy or max F1) over the region
samples of the calibration kit: one sample per (strip, run, vial), scored by the max over
the acquisition's patches of that region (key frames, and rank images when used), labelled
by the kit's region ground truth (1 = defective, the positive class). Runs of defective
strips whose region labels are unknown are left out of region calibration.

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
from anomalyqc.evaluation.thresholds import ThresholdChoice, select_threshold
from anomalyqc.fileio import atomic_write_json

THRESHOLDS_FORMAT = "anomalyqc-line-thresholds"
THRESHOLDS_VERSION = 1
LINE_METHODS = ("accuracy", "f1")


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
    if method not in LINE_METHODS:
        raise ConfigError(f"unknown calibration metric {method!r}; use one of {', '.join(LINE_METHODS)}")
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
