"""Metrics of a classifier's class decisions (scikit-learn): per-class precision, recall
and F1, the confusion matrix, macro averages, and the good-vs-defect view that compares
with the anomaly detectors (positive class = defect).

Rows of the confusion matrix are the true classes (the test folders), columns the
predicted ones. A test class the model never learnt (an "unseen" defect) is a row with no
column of its own: its images can only land in other classes, and its recall is 0 by
definition; it counts in the macro averages, as a defect the model cannot name. The
good-vs-defect view is what matters for it: predicted "good" is a miss, any defect class
a catch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

GOOD_CLASS = "good"


def classification_metrics(true: Sequence[str], predicted: Sequence[str],
                           class_names: Sequence[str], defect_scores: Sequence[float],
                           ) -> dict[str, Any]:
    """The metrics of class decisions `predicted` against the folders `true`; the model's
    classes `class_names` ("good" first); `defect_scores` = 1 - P(good) per image."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

    if len(true) != len(predicted) or len(true) != len(defect_scores) or not true:
        raise ValueError(f"classification_metrics: {len(true)} true, {len(predicted)} predicted "
                         f"classes and {len(defect_scores)} scores; need the same non-zero count")
    unseen = sorted(set(true) - set(class_names))
    labels = [*class_names, *unseen]
    p, r, f, support = precision_recall_fscore_support(true, predicted, labels=labels,
                                                       zero_division=0)
    per_class = {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                        "support": int(support[i]), "learnt": name in class_names}
                 for i, name in enumerate(labels)}
    present = [i for i, s in enumerate(support) if s > 0]
    macro = {k: float(np.mean(v[present])) if present else None
             for k, v in (("precision", p), ("recall", r), ("f1", f))}
    cm = confusion_matrix(true, predicted, labels=labels)
    y = np.array([t != GOOD_CLASS for t in true])
    y_hat = np.array([c != GOOD_CLASS for c in predicted])
    s = np.asarray(defect_scores, dtype=np.float64)
    n_def, n_good = int(y.sum()), int((~y).sum())
    binary = {
        "accuracy": float((y == y_hat).mean()),
        "tpr": float((y & y_hat).sum() / n_def) if n_def else None,
        "tnr": float((~y & ~y_hat).sum() / n_good) if n_good else None,
        "auroc": float(roc_auc_score(y, s)) if n_def and n_good and np.isfinite(s).all() else None,
        "decision": "predicted class != good (the classifier's own decision, no threshold)",
    }
    return {
        "class_names": list(class_names),
        "unseen_classes": unseen,
        "accuracy": float(np.mean([a == b for a, b in zip(true, predicted, strict=True)])),
        "per_class": per_class,
        # over the classes with test images; an unseen class counts with recall 0
        "macro": macro,
        "confusion_matrix": {"rows_true": labels, "columns_predicted": labels,
                             "counts": cm.tolist()},
        "good_vs_defect": binary,
    }


__all__ = ["classification_metrics"]
