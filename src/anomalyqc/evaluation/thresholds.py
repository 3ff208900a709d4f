"""Choosing the image-level decision threshold from a labelled calibration set.

The decision everywhere is `score >= threshold` means defect. The choice is kept with the
reason for it (method, metric, class counts) so a run's threshold.json can explain itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from anomalyqc.errors import CalibrationError, ConfigError, ModelFileError
from anomalyqc.evaluation.metrics import ArrayLike, _labels_scores, threshold_metrics

METHODS = ("f1", "accuracy", "youden", "fixed")
_METRIC_NAMES = {"f1": "F1", "accuracy": "accuracy", "youden": "Youden J", "fixed": "accuracy"}


@dataclass
class ThresholdChoice:
    """A threshold and why it was chosen.

    metric_value is the optimised metric on the calibration set (for "fixed": the accuracy
    there, which is defined even when a class is missing).
    """

    value: float
    method: str
    metric_value: float
    n_good: int
    n_defect: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ThresholdChoice:
        """Inverse of to_dict; unknown keys (from newer versions) are ignored."""
        missing = [
            k for k in ("value", "method", "metric_value", "n_good", "n_defect") if k not in data
        ]
        if missing:
            raise ModelFileError(
                f"threshold record lacks {', '.join(missing)}; the run's threshold.json is "
                "corrupt or was written by an incompatible version (re-run `anomalyqc calibrate`)"
            )
        try:
            return cls(
                value=float(data["value"]),
                method=str(data["method"]),
                metric_value=float(data["metric_value"]),
                n_good=int(data["n_good"]),
                n_defect=int(data["n_defect"]),
            )
        except (TypeError, ValueError) as exc:
            raise ModelFileError(
                f"threshold record has a value of the wrong type ({exc}); the run's "
                "threshold.json is corrupt (re-run `anomalyqc calibrate`)"
            ) from exc

    def explain(self) -> str:
        """One line for logs and reports, e.g. 'threshold 0.512 chosen by max F1 = 0.970 ...'."""
        name = _METRIC_NAMES.get(self.method, self.method)
        counts = f"on {self.n_good} good / {self.n_defect} defect"
        if self.method == "fixed":
            return f"threshold {self.value:.4g} fixed by the user ({name} {self.metric_value:.3f} {counts})"
        return f"threshold {self.value:.4g} chosen by max {name} = {self.metric_value:.3f} {counts}"


def candidate_metric(
    method: str, tp: np.ndarray, fp: np.ndarray, n_good: int, n_defect: int
) -> np.ndarray:
    """The metric at every candidate, from true/false positive counts."""
    fn = n_defect - tp
    if method == "f1":
        den = 2 * tp + fp + fn
        return np.divide(2.0 * tp, den, out=np.zeros(tp.shape), where=den > 0)
    if method == "accuracy":
        return (tp + (n_good - fp)) / float(n_good + n_defect)
    return tp / float(n_defect) - fp / float(n_good)  # youden: TPR - FPR


def check_threshold_options(method: str, value: float | None) -> None:
    """Refuse a method/value pair select_threshold cannot use; callers check before scoring."""
    if method not in METHODS:
        raise ConfigError(f"unknown threshold method {method!r}; use one of {', '.join(METHODS)}")
    if method == "fixed":
        if value is None or not math.isfinite(float(value)):
            raise ConfigError(
                "threshold method 'fixed' needs a finite value: pass --threshold VALUE"
            )
    elif value is not None:
        raise ConfigError(
            f"a threshold value was given with method {method!r}, which would ignore it; "
            "use --threshold-method fixed to apply it, or drop --threshold"
        )


def select_threshold(
    labels: ArrayLike, scores: ArrayLike, method: str = "f1", value: float | None = None
) -> ThresholdChoice:
    """Pick the threshold that maximises `method` on a calibration set.

    Methods: "f1", "accuracy", "youden" (TPR - FPR), or "fixed" (use `value` as is).
    Candidates are every distinct score t (flag score >= t), plus "flag nothing". All are
    scored at once from cumulative counts over the sorted scores.

    Ties between candidates go to the lowest threshold: an escaped defect costs more than a
    re-inspected good unit. The returned value is then the midpoint between the chosen score
    and the next lower distinct score: the same decisions on the calibration set, but with
    a margin on both sides instead of sitting on a calibration sample, so it generalises.
    """
    check_threshold_options(method, value)
    y, s = _labels_scores(labels, scores)
    n_defect = int(np.count_nonzero(y))
    n_good = int(y.size - n_defect)

    if method == "fixed":
        assert value is not None  # checked above
        acc = threshold_metrics(y, s, float(value))["accuracy"] if y.size else 0.0
        return ThresholdChoice(float(value), "fixed", acc, n_good, n_defect)
    if n_defect == 0 or n_good == 0:
        missing = "defective" if n_defect == 0 else "good"
        raise CalibrationError(
            f"the calibration set has no {missing} images ({n_good} good, {n_defect} defect), "
            f"so method {method!r} cannot choose a threshold; add some {missing} images or use "
            "--threshold-method fixed --threshold VALUE"
        )

    order = np.argsort(-s, kind="stable")
    s_desc = s[order]
    y_desc = y[order]
    last = np.flatnonzero(np.concatenate((s_desc[1:] != s_desc[:-1], [True])))  # group ends
    distinct = s_desc[last]  # highest first
    tp = np.cumsum(y_desc)[last]
    fp = (last + 1) - tp
    # Candidate 0 flags nothing; candidate i >= 1 flags scores >= distinct[i - 1].
    tp = np.concatenate(([0], tp))
    fp = np.concatenate(([0], fp))
    metric = candidate_metric(method, tp, fp, n_good, n_defect)
    best = float(metric.max())
    i = int(np.flatnonzero(metric >= best - 1e-12)[-1])  # lowest threshold among ties

    if i == 0:  # flagging nothing wins: sit just above the highest score
        chosen = float(np.nextafter(distinct[0], np.inf))
    elif i < distinct.size:
        hi, lo = float(distinct[i - 1]), float(distinct[i])
        mid = (hi + lo) / 2.0
        chosen = mid if lo < mid <= hi else hi  # guard against float rounding
    else:  # the lowest score: nothing lower to split towards
        chosen = float(distinct[-1])
    return ThresholdChoice(chosen, method, best, n_good, n_defect)
