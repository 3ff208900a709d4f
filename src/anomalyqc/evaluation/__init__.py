"""Evaluation: metrics, threshold selection and the HTML report."""

from anomalyqc.evaluation.metrics import (
    aupro,
    image_auroc,
    pixel_auroc,
    roc_curve_points,
    threshold_metrics,
)
from anomalyqc.evaluation.report import write_report
from anomalyqc.evaluation.thresholds import METHODS, ThresholdChoice, select_threshold

__all__ = [
    "METHODS",
    "ThresholdChoice",
    "aupro",
    "image_auroc",
    "pixel_auroc",
    "roc_curve_points",
    "select_threshold",
    "threshold_metrics",
    "write_report",
]
