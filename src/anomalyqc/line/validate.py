"""Score a line test kit and build the validation report (thesis tables 10.1-10.3).

The positive class is "defective" everywhere: TPR = defective units rejected / defective
units, TNR = good units accepted / good units; a false reject is a good unit rejected, a
false accept a defective unit accepted.

Levels:
- region: one sample per (strip, run, vial, region) with a known region label, scored by the
  max over the acquisition's patches of that region; each region has its own threshold;
- vial: one sample per (strip, run, vial), rejected when any of its regions is;
- strip: one sample per acquisition (strip, run), rejected when any of its patches is (eq. 10.3);
- product (per run, with the acceptance policy): one sample per strip over its n runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anomalyqc.errors import CalibrationError, ConfigError
from anomalyqc.line.decisions import (
    PRODUCT_DEFECTIVE,
    PRODUCT_GOOD,
    PRODUCT_UNDECIDED,
    AcceptancePolicy,
    acquisition_decisions,
    region_scores,
    strip_margin,
)
from anomalyqc.line.inspect import LineModels, inspect_acquisition
from anomalyqc.line.kit import Kit
from anomalyqc.line.layout import ProductLayout
from anomalyqc.line.rank import KEY_FRAMES
from anomalyqc.line.thresholds import (
    STRIP_METHODS,
    RegionThresholds,
    calibrate_strip_thresholds,
    calibrate_thresholds,
)
from anomalyqc.progress import Progress, tracked

POSITIVE = "defective (label 1): reject = predicted defective; TPR = defective rejected, TNR = good accepted"


@dataclass
class KitScores:
    """Patch scores of every acquisition of a kit, with its labels and timings."""

    kit: Kit
    sources: list[str]
    acquisitions: list[tuple[int, int]]  # (strip index, run number) per acquisition
    scores: np.ndarray  # (A, S, V, R)
    region_labels: np.ndarray  # (A, V, R) int8: 1 defective, 0 good, -1 unknown
    timings_ms: list[dict[str, float]]  # per acquisition: cut, forward, aggregate, total
    # per acquisition: forward time of each model (LineModels.model_keys), and the models
    model_timings_ms: list[dict[str, float]] = field(default_factory=list)
    models: list[dict[str, Any]] = field(default_factory=list)  # LineModels.describe()

    @property
    def strip_labels(self) -> np.ndarray:
        """(A,) label of the strip of each acquisition."""
        return np.array([self.kit.strips[i].label for i, _ in self.acquisitions], np.int64)


def check_kit_layout(kit: Kit, layout: ProductLayout, source: str | Path = "--layout") -> None:
    """The layout cuts the kit's frames and its regions are those the kit's labels name."""
    k = kit.layout
    if (layout.image_size, layout.n_vials, layout.region_names) != (k.image_size, k.n_vials, k.region_names):
        raise ConfigError(
            f"{source}: layout {layout.name!r} ({layout.image_height}x{layout.image_width}, "
            f"{layout.n_vials} vials, regions {layout.region_names}) does not match the kit "
            f"{kit.root} ({k.image_height}x{k.image_width}, {k.n_vials} vials, regions "
            f"{k.region_names}); use the kit's layout.yaml or one with the same vials and regions"
        )


def score_kit(
    kit: Kit,
    layout: ProductLayout,
    models: LineModels,
    key_frames: tuple[int, ...] = KEY_FRAMES,
    use_rank: bool = False,
    progress: Progress | None = None,
) -> KitScores:
    """Inspect every acquisition of the kit (no thresholds: scores and timings only)."""
    check_kit_layout(kit, layout)
    runs = [(i, r) for i, s in enumerate(kit.strips) for r in s.runs]
    models.check_layout(layout)
    scores, labels, timings, model_timings, acqs = [], [], [], [], []
    sources: list[str] = []
    shape = (layout.n_vials, layout.n_regions)
    for i, run in tracked(runs, progress, f"Inspecting {kit.root.name}"):
        res = inspect_acquisition(run.load_frames(), layout, models, None, key_frames, use_rank)
        sources = res.sources
        scores.append(res.scores)
        timings.append(res.timings_ms)
        model_timings.append(res.model_timings_ms)
        acqs.append((i, run.run))
        labels.append(np.full(shape, -1, np.int8) if run.regions is None else run.regions.astype(np.int8))
    return KitScores(
        kit, sources, acqs, np.stack(scores), np.stack(labels), timings, model_timings, models.describe()
    )


def calibrate(
    kit_scores: KitScores, method: str, models: LineModels, key_frames: tuple[int, ...], use_rank: bool
) -> RegionThresholds:
    """Per-region thresholds from a scored calibration kit (see line.thresholds)."""
    regions = kit_scores.kit.layout.region_names
    rs = region_scores(kit_scores.scores).reshape(-1, len(regions))  # (A * V, R)
    lab = kit_scores.region_labels.reshape(-1, len(regions))
    if method in STRIP_METHODS:
        try:  # the per-region choice is one start of the ascent, when the labels allow it
            start = np.array([c.value for c in calibrate_thresholds(rs, lab, regions, "accuracy")])
        except CalibrationError:
            start = None
        choices = calibrate_strip_thresholds(
            kit_scores.scores, kit_scores.strip_labels, regions, method, start
        )
        sample = "one per acquisition (strip, run), labelled by its strip; eq. 10.3 over its patches"
    else:
        choices = calibrate_thresholds(rs, lab, regions, method)
        sample = "one per (strip, run, vial), max over the region's patches"
    info = {
        "calibration_kit": str(kit_scores.kit.root),
        "calibration_kit_sha256": kit_digest(kit_scores.kit.root),
        "metric": method,
        "sample": sample,
    }
    return RegionThresholds(regions, choices, models.model_ids(), tuple(key_frames), use_rank, info)


def kit_digest(root: str | Path) -> str:
    """sha256 over every file of the kit (relative path and bytes, in sorted order)."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts):
            h.update(str(p.relative_to(root)).encode())
            h.update(b"\0")
            h.update(p.read_bytes())
    return h.hexdigest()


def _binary(labels: np.ndarray, rejects: np.ndarray) -> dict[str, Any]:
    """Confusion matrix and ratios, defective positive."""
    y, p = np.asarray(labels).astype(bool), np.asarray(rejects).astype(bool)
    tp, fn = int((y & p).sum()), int((y & ~p).sum())
    fp, tn = int((~y & p).sum()), int((~y & ~p).sum())
    n = tp + fn + fp + tn

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {
        "n": n,
        "n_good": tn + fp,
        "n_defective": tp + fn,
        "accuracy": ratio(tp + tn, n),
        "tpr": ratio(tp, tp + fn),
        "tnr": ratio(tn, tn + fp),
        "precision": ratio(tp, tp + fp),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "confusion": {
            "good": {"accepted": tn, "rejected": fp},
            "defective": {"accepted": fn, "rejected": tp},
        },
    }


def _percentile_stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, np.float64)
    return {
        "median": float(np.median(a)),
        "p95": float(np.percentile(a, 95)),
        "max": float(a.max()),
        "mean": float(a.mean()),
    }


def timing_summary(
    timings: list[dict[str, float]],
    n_patches: int,
    budget_ms: float,
    model_timings: list[dict[str, float]] | None = None,
    models: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Batch timings per stage, and the forward pass per model (`model_timings`, described by
    `models` = LineModels.describe()); the first acquisition (model warm-up) is left out when
    there are more."""
    used = timings[1:] if len(timings) > 1 else timings
    stages = {k: _percentile_stats([t[k] for t in used]) for k in ("cut", "forward", "aggregate", "total")}
    total = stages["total"]
    by_model: dict[str, Any] = {}
    if model_timings:
        used_m = model_timings[1:] if len(model_timings) > 1 else model_timings
        n_regions = sum(len(m["regions"]) for m in models or []) or 1
        for m in models or []:
            k = m["key"]
            if not all(k in t for t in used_m):
                continue
            stats = _percentile_stats([t[k] for t in used_m])
            n_model = n_patches * len(m["regions"]) // n_regions
            by_model[k] = {
                "detector": m["detector"],
                "model_id": m["model_id"],
                "regions": m["regions"],
                "n_patches_per_batch": n_model,
                **stats,
                "mean_per_patch_ms": stats["mean"] / max(n_model, 1),
            }
    return {
        "unit": "ms",
        "n_patches_per_batch": n_patches,
        "n_batches_timed": len(used),
        "warmup_batches_excluded": len(timings) - len(used),
        "budget_ms": budget_ms,
        "stages": stages,
        # the "forward" stage split by model: input preparation and one predict per model
        "forward_by_model": by_model,
        "median": total["median"],
        "p95": total["p95"],
        "max": total["max"],
        "mean_per_patch_ms": total["mean"] / n_patches,  # eq. 10.2
        "p95_within_budget": total["p95"] <= budget_ms,
        "max_within_budget": total["max"] <= budget_ms,
    }


def build_report(
    test: KitScores, thresholds: RegionThresholds, policy: AcceptancePolicy, budget_ms: float
) -> dict[str, Any]:
    """The three tables, confusion matrices, errors and timing (without provenance)."""
    layout = test.kit.layout
    regions = layout.region_names
    t = thresholds.values
    dec = acquisition_decisions(test.scores, t)
    n_patches = int(np.prod(test.scores.shape[1:]))
    timing = timing_summary(test.timings_ms, n_patches, budget_ms, test.model_timings_ms, test.models)
    per_patch = timing["mean_per_patch_ms"]

    lab = test.region_labels  # (A, V, R)
    table1: dict[str, Any] = {}
    for j, name in enumerate(regions):
        known = lab[..., j] >= 0
        row = _binary(lab[..., j][known], dec["region"][..., j][known])
        table1[name] = {"threshold": float(t[j]), **row, "mean_inference_ms_per_patch": per_patch}
    vial_known = (lab >= 0).all(axis=-1)
    vial_lab = (lab == 1).any(axis=-1)
    table1["vial"] = {
        "threshold": None,
        **_binary(vial_lab[vial_known], dec["vial"][vial_known]),
        "mean_inference_ms_per_patch": None,
    }

    y_acq = test.strip_labels
    table2 = {
        "thresholds": thresholds.as_dict(),
        **_binary(y_acq, dec["strip"]),
        "mean_inference_ms_per_strip": timing["stages"]["total"]["mean"],
    }

    n_strips = len(test.kit.strips)
    per_strip: list[list[bool]] = [[] for _ in range(n_strips)]
    for (i, _), rej in zip(test.acquisitions, dec["strip"]):
        per_strip[i].append(bool(rej))
    counts = {len(r) for r in per_strip}
    if counts != {policy.n}:
        raise ConfigError(
            f"acceptance policy {policy}: the kit's strips have {sorted(counts)} runs; "
            f"give --accept K/N with N the runs per strip"
        )
    run_rejects = np.array(per_strip, bool)
    y_strip = test.kit.labels
    prod = policy.decide(run_rejects)
    correct = policy.correct(run_rejects, y_strip)
    conf = {
        name: {
            d: int(((y_strip == lbl) & (prod == d)).sum())
            for d in (PRODUCT_GOOD, PRODUCT_DEFECTIVE, PRODUCT_UNDECIDED)
        }
        for name, lbl in (("good", 0), ("defective", 1))
    }
    n_def, n_good = int((y_strip == 1).sum()), int((y_strip == 0).sum())
    table3 = {
        "thresholds": thresholds.as_dict(),
        "policy": str(policy),
        "policy_rule": policy.describe(),
        "n": n_strips,
        "n_good": n_good,
        "n_defective": n_def,
        "accuracy": float(correct.mean()),
        "tpr": float(correct[y_strip == 1].mean()) if n_def else None,
        "tnr": float(correct[y_strip == 0].mean()) if n_good else None,
        "confusion": conf,
    }

    margin = strip_margin(test.scores, t)
    errors: dict[str, list[dict[str, Any]]] = {"false_rejects": [], "false_accepts": []}
    for a, ((i, run), rej) in enumerate(zip(test.acquisitions, dec["strip"])):
        if bool(rej) == bool(y_acq[a]):
            continue
        s_idx, v_idx, r_idx = np.unravel_index(
            int(np.nanargmax(np.where(np.isfinite(test.scores[a]), test.scores[a] - t, np.inf))),
            test.scores[a].shape,
        )
        errors["false_rejects" if rej else "false_accepts"].append(
            {
                "strip_id": test.kit.strips[i].strip_id,
                "run": run,
                "acquisition": a,
                # score - threshold of the worst patch; null when a score was not finite
                "margin": float(margin[a]) if np.isfinite(margin[a]) else None,
                "non_finite_score": not bool(np.isfinite(margin[a])),
                "worst_patch": {"source": test.sources[s_idx], "vial": int(v_idx), "region": regions[r_idx]},
                "defect_types": test.kit.strips[i].defect_types,
            }
        )
    # most confident errors first: a false reject far over, a false accept far under
    errors["false_rejects"].sort(key=lambda e: -(e["margin"] if e["margin"] is not None else np.inf))
    errors["false_accepts"].sort(key=lambda e: e["margin"])
    product_errors = [
        {
            "strip_id": s.strip_id,
            "label": "defective" if s.label else "good",
            "decision": str(prod[i]),
            "runs_rejected": int(run_rejects[i].sum()),
            "runs": policy.n,
        }
        for i, s in enumerate(test.kit.strips)
        if not correct[i]
    ]
    return {
        "positive_class": POSITIVE,
        "table_10_1_region_vial": table1,
        "table_10_2_strip": table2,
        "table_10_3_run_policy": table3,
        "errors": {**errors, "products": product_errors},
        "timing": timing,
        "sources": test.sources,
        "n_acquisitions": len(test.acquisitions),
    }
