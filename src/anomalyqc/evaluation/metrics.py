"""Image- and pixel-level metrics for anomaly detectors.

Everything takes numpy arrays or torch tensors and returns plain python floats, so results
can go straight into JSON. Pixel metrics are written for whole evaluation sets (about a
hundred 256x256 maps): they sort float32 values in place rather than calling scikit-learn,
which would copy everything to float64 and sort it several times.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from anomalyqc.errors import CalibrationError

ArrayLike = Any  # numpy array, torch tensor or sequence of numbers


# --------------------------------------------------------------------------- input helpers


def _to_numpy(x: ArrayLike) -> np.ndarray:
    """A numpy view of x (no copy for CPU tensors and arrays)."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _labels_scores(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validated 1-D (bool defect flags, float64 scores) for image-level metrics."""
    y = _to_numpy(labels).ravel()
    s = _to_numpy(scores).astype(np.float64, copy=False).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {s.size}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (good) or 1 (defect)")
    bad = int(np.count_nonzero(~np.isfinite(s)))
    if bad:
        raise CalibrationError(
            f"{bad} of {s.size} anomaly scores are NaN or infinite; the detector produced "
            "invalid output (check the model file and the input images)"
        )
    return y.astype(bool), s


def rank_non_finite(values: ArrayLike, above: float | None = None) -> np.ndarray:
    """A float copy of `values` in which every NaN or infinite value is replaced by one
    number larger than every finite value and than `above` (a threshold).

    A non-finite score means the detector failed on that image, and a failure must never
    pass as good: it ranks as the most anomalous image for AUROC and thresholds, and it is
    rejected at any threshold <= `above`. The metric functions themselves refuse non-finite
    input, so a caller has to choose this treatment (and say so) explicitly.
    """
    v = np.array(_to_numpy(values), dtype=np.float64)
    bad = ~np.isfinite(v)
    if not bad.any():
        return v
    finite = v[~bad]
    top = float(finite.max()) if finite.size else 0.0
    if above is not None and math.isfinite(above):
        top = max(top, float(above))
    sub = top + max(1.0, abs(top))
    v[bad] = sub if math.isfinite(sub) else np.nextafter(top, np.inf)
    return v


def _require_both_classes(y: np.ndarray, what: str) -> None:
    """Ranking metrics are undefined without both classes; say which one is missing."""
    n_defect = int(np.count_nonzero(y))
    n_good = int(y.size - n_defect)
    if n_defect == 0 or n_good == 0:
        missing = "defective" if n_defect == 0 else "good"
        raise CalibrationError(
            f"{what} needs both good and defective images, but the set has {n_good} good and "
            f"{n_defect} defective; add {missing} images to the evaluation set"
        )


def _masks_maps(masks: ArrayLike, maps: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) bool masks and float32 maps; (N, 1, H, W) inputs are squeezed, not copied."""
    m = _to_numpy(masks)
    a = _to_numpy(maps)
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if m.ndim == 2:
        m = m[None]
    if a.ndim == 2:
        a = a[None]
    if m.shape != a.shape or m.ndim != 3:
        raise ValueError(
            f"masks and anomaly maps must both be (N, H, W) or (N, 1, H, W) and match; "
            f"got {tuple(_to_numpy(masks).shape)} and {tuple(_to_numpy(maps).shape)}"
        )
    m = m > 0.5 if m.dtype != bool else m
    a = a.astype(np.float32, copy=False)
    bad = int(np.count_nonzero(~np.isfinite(a)))
    if bad:
        raise CalibrationError(
            f"{bad} anomaly-map pixels are NaN or infinite; the detector produced invalid output"
        )
    return m, a


# --------------------------------------------------------------------------- image level


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the image-level ROC curve (label 1 = defect, higher score = more anomalous)."""
    from sklearn.metrics import roc_auc_score  # slow to import; only needed here

    y, s = _labels_scores(labels, scores)
    _require_both_classes(y, "image AUROC")
    return float(roc_auc_score(y, s))


def roc_curve_points(
    labels: ArrayLike, scores: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of the image-level ROC curve, for plotting.

    thresholds[0] is +inf (nothing flagged), as in scikit-learn.
    """
    from sklearn.metrics import roc_curve

    y, s = _labels_scores(labels, scores)
    _require_both_classes(y, "an ROC curve")
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr, thr


def _ratio(num: float, den: float) -> float:
    """num / den, or 0.0 when den is 0 (a metric with nothing to measure is reported as 0)."""
    return float(num) / float(den) if den else 0.0


def threshold_metrics(labels: ArrayLike, scores: ArrayLike, threshold: float) -> dict[str, float]:
    """Confusion-matrix figures of the decision `score >= threshold` means defect.

    Keys: accuracy, precision, recall, f1, tpr, tnr (floats; 0.0 where a denominator is 0)
    and the counts tp, fp, tn, fn (ints).
    """
    y, s = _labels_scores(labels, scores)
    pred = s >= float(threshold)
    tp = int(np.count_nonzero(pred & y))
    fp = int(np.count_nonzero(pred & ~y))
    fn = int(np.count_nonzero(~pred & y))
    tn = int(y.size - tp - fp - fn)
    recall = _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, y.size),
        "precision": _ratio(tp, tp + fp),
        "recall": recall,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "tpr": recall,
        "tnr": _ratio(tn, tn + fp),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


# --------------------------------------------------------------------------- pixel level


def pixel_auroc(masks: ArrayLike, maps: ArrayLike) -> float:
    """ROC AUC over every pixel of every image (mask 1 = defect pixel).

    Computed as the Mann-Whitney statistic: sort the defect and the good pixel values
    separately and count, for each defect pixel, the good pixels below it (ties count half).
    Two float32 sorts and no index arrays keep 100 x 256x256 maps well under a second.
    """
    m, a = _masks_maps(masks, maps)
    pos = np.sort(a[m], kind="quicksort")
    neg = np.sort(a[~m], kind="quicksort")
    if pos.size == 0 or neg.size == 0:
        raise CalibrationError(
            "pixel AUROC needs both defect and defect-free pixels, but the ground-truth masks "
            f"have {pos.size} defect and {neg.size} good pixels; evaluate on a set with "
            "annotated defect images"
        )
    below = np.searchsorted(neg, pos, side="left").sum(dtype=np.float64)
    below_or_equal = np.searchsorted(neg, pos, side="right").sum(dtype=np.float64)
    return float((below + below_or_equal) / 2.0 / (float(pos.size) * float(neg.size)))


def _region_weights(m: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Defect-pixel values and weights 1 / (n_regions * region_size).

    Summing the weights of the defect pixels above a threshold gives the PRO at that
    threshold (mean over regions of the fraction of the region detected). Regions are the
    8-connected components of each ground-truth mask.
    """
    values: list[np.ndarray] = []
    inv_sizes: list[np.ndarray] = []
    n_regions = 0
    for mask, amap in zip(m, a):
        if not mask.any():
            continue
        n, comp = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        sizes = np.bincount(comp.ravel(), minlength=n).astype(np.float64)
        inside = comp[mask]
        values.append(amap[mask])
        inv_sizes.append(1.0 / sizes[inside])
        n_regions += n - 1
    if n_regions == 0:
        return np.empty(0, np.float32), np.empty(0, np.float64)
    return np.concatenate(values), np.concatenate(inv_sizes) / n_regions


def _area_to_limit(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoidal area under a curve with non-decreasing x, from x[0] to x == limit.

    The last segment is cut at limit by linear interpolation; repeated x values (vertical
    steps) add no area.
    """
    i = int(np.searchsorted(x, limit, side="right"))  # first point past the limit
    area = float(np.trapezoid(y[:i], x[:i])) if i > 1 else 0.0
    if 0 < i < x.size:
        x0, x1, y0, y1 = float(x[i - 1]), float(x[i]), float(y[i - 1]), float(y[i])
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (limit - x0) * (y0 + y_lim) / 2.0
    return area


def aupro(
    masks: ArrayLike, maps: ArrayLike, fpr_limit: float = 0.3, num_thresholds: int | None = None
) -> float:
    """Normalised area under the per-region-overlap curve up to fpr_limit (MVTec AD).

    For a threshold t, PRO(t) is the mean over all 8-connected ground-truth defect regions
    of the fraction of the region's pixels with map >= t, and FPR(t) the fraction of good
    pixels with map >= t. PRO is integrated over FPR in [0, fpr_limit] (trapezoids, the
    curve cut at fpr_limit by interpolation) and divided by fpr_limit: 1.0 is perfect.

    num_thresholds=None (default) is exact: every distinct map value is a threshold. The
    curve only moves right at values taken by good pixels, so it is evaluated at the
    distinct good values (one float32 sort) with the PRO just above and at each of them
    (searchsorted into the sorted defect values); this is the same curve as a pass over all
    distinct values, at a fraction of the cost. An integer num_thresholds instead uses that
    many evenly spaced thresholds between the map minimum and maximum, as grid-based tools
    do (an approximation, kept for comparing with them).
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    m, a = _masks_maps(masks, maps)
    d_val, d_w = _region_weights(m, a)
    good = a[~m]  # a copy, sorted (or partitioned) in place below
    n_good = good.size
    if d_val.size == 0 or n_good == 0:
        raise CalibrationError(
            "AUPRO needs ground-truth defect regions and defect-free pixels, but the masks have "
            f"{d_val.size} defect and {n_good} good pixels; evaluate on a set with "
            "annotated defect images"
        )
    order = np.argsort(d_val, kind="stable")
    d_val = d_val[order]
    cum_w = np.concatenate(([0.0], np.cumsum(d_w[order])))  # cum_w[i] = weight of i lowest
    total_w = cum_w[-1]

    def pro_at_least(t: np.ndarray) -> np.ndarray:
        return total_w - cum_w[np.searchsorted(d_val, t, side="left")]

    if num_thresholds is not None:
        if num_thresholds < 2:
            raise ValueError(f"num_thresholds must be >= 2, got {num_thresholds}")
        good.sort(kind="quicksort")
        lo = min(float(good[0]), float(d_val[0]))
        hi = max(float(good[-1]), float(d_val[-1]))
        t = np.linspace(hi, lo, num_thresholds)
        fpr_t = (n_good - np.searchsorted(good, t, side="left")) / n_good
        x = np.concatenate(([0.0], fpr_t))
        y = np.concatenate(([0.0], pro_at_least(t)))
        return _area_to_limit(x, y, fpr_limit) / fpr_limit

    # Only the good values that keep FPR <= fpr_limit, and the first one past it, matter:
    # find that cut with a linear-time partition and sort just the part above it.
    j0 = max(0, n_good - int(np.floor(fpr_limit * n_good)) - 1)
    good.partition(j0)
    v0 = good[j0]  # the highest good value whose FPR exceeds the limit
    tied_below = int(np.count_nonzero(good[:j0] == v0))
    tail = np.sort(good[j0:], kind="quicksort")
    del good
    starts = np.flatnonzero(np.concatenate(([True], tail[1:] != tail[:-1])))
    first = j0 + starts  # index of each distinct value's first copy in all good values
    first[0] -= tied_below
    g = tail[starts][::-1]  # distinct good values, highest first
    fpr = (n_good - first[::-1]) / n_good  # fraction of good pixels >= g
    pro_above = total_w - cum_w[np.searchsorted(d_val, g, side="right")]  # map > g
    pro_at = pro_at_least(g)  # map >= g
    # Each good value g is a vertical step to (previous FPR, PRO above g), then a segment to
    # (FPR at g, PRO at g); defect-only thresholds between them lie on the vertical step.
    x = np.empty(2 * g.size + 1)
    y = np.empty(2 * g.size + 1)
    x[0] = y[0] = 0.0
    x[1::2] = np.concatenate(([0.0], fpr[:-1]))
    y[1::2] = pro_above
    x[2::2] = fpr
    y[2::2] = pro_at
    return _area_to_limit(x, y, fpr_limit) / fpr_limit
