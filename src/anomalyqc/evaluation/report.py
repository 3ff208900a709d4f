"""An evaluation report a QC reviewer can open without tools: JSON, plots, examples, HTML.

The page leads with what a reviewer checks first: which model, threshold and data the
figures belong to (the identity block), how many images were found, scored and skipped,
and per defect type how many were caught at the threshold; then the score distributions,
the ROC curve, every metric, the skipped entries and the worst and best cases.

Everything is rendered in memory before the first file is written, so a failure while
drawing leaves the previous report as it was; each file is then written to a temporary name
and moved into place (os.replace). Example panels are composed pixel for pixel (OpenCV,
nearest-neighbour upscaling of small inputs, no font rendering of file names), so a
3-pixel defect stays visible and no file name can break them; names appear in the HTML,
escaped, with undecodable bytes written as \\xNN (anomalyqc.pathtext). Matplotlib draws
only the two plots, through its object API with the Agg canvas: no pyplot global state, no
display needed, and importing this package does not import matplotlib.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anomalyqc.errors import CalibrationError, ConfigError
from anomalyqc.evaluation.metrics import (
    ArrayLike,
    _labels_scores,
    _to_numpy,
    image_auroc,
    rank_non_finite,
    roc_curve_points,
)
from anomalyqc.fileio import atomic_write_bytes
from anomalyqc.pathtext import display

_EXAMPLE_NAME = re.compile(r"^(worst|best)_(defect|good)_\d+_.*\.png$")

METRICS_SCHEMA = "anomalyqc-metrics/1"
# Keys write_report fills in from its own arguments; a metrics dict may repeat them only
# with the same value.
_OWN_KEYS = ("schema", "n_good", "n_defect", "threshold", "pixel_threshold", "images",
             "per_defect_type")
# The report's own files: a metrics file may not take one of these names.
REPORT_FILES = ("report.html", "roc.png", "scores.png", "examples")
# Metrics keys the page shows in their own sections rather than in the metrics table.
_SECTIONED = ("notes", "identity", "per_defect_type", "skipped", "classification")
# Example panels: small inputs are upscaled (nearest neighbour, whole pixels) until the
# longer side reaches PANEL_MIN pixels, so a 3-pixel defect of a 64x64 input is 12 pixels
# wide on the page; the page shows the PNG at its own size, never shrunk.
PANEL_MIN = 256
PANEL_GAP = 6
PANEL_HEADER = 22


def _jsonable(x: Any) -> Any:
    """numpy/torch scalars and arrays to python; NaN and inf to None (strict JSON)."""
    if hasattr(x, "to_dict"):
        return _jsonable(x.to_dict())
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "detach") or isinstance(x, np.ndarray):
        return _jsonable(_to_numpy(x).tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, str):
        return display(x)  # valid UTF-8 whatever the file names held
    if isinstance(x, (int, float, bool)) or x is None:
        return x
    if isinstance(x, Path):
        return display(x)
    raise TypeError(f"cannot store a {type(x).__name__} in metrics.json")


def _png_bytes(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _roc_png(labels: np.ndarray, scores: np.ndarray) -> bytes:
    """Image-level ROC curve with the AUROC in the legend, or a note if it is undefined."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 4.5), dpi=100)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    try:
        fpr, tpr, _ = roc_curve_points(labels, scores)
        auc = float(np.trapezoid(tpr, fpr))
        ax.plot(fpr, tpr, color="C0", linewidth=2, label=f"AUROC = {auc:.4f}")
        ax.legend(loc="lower right")
    except CalibrationError as exc:  # one class only: say so instead of failing the report
        ax.text(
            0.5,
            0.5,
            "ROC undefined:\n" + str(exc).split(";")[0],
            ha="center",
            va="center",
            wrap=True,
            fontsize=8,
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (good flagged)")
    ax.set_ylabel("true positive rate (defects caught)")
    ax.set_title("Image-level ROC")
    fig.tight_layout()
    return _png_bytes(fig)


def _pick_examples(labels: np.ndarray, scores: np.ndarray, n: int) -> list[tuple[str, int]]:
    """(kind, index) for up to n of each: worst defect/good, then best defect/good.

    Worst = defect with the lowest score, good with the highest; best the opposite. An
    image already shown as a worst case is not repeated as a best case.
    """
    defect = np.flatnonzero(labels)
    good = np.flatnonzero(~labels)
    d_up = defect[np.argsort(scores[defect], kind="stable")]
    g_up = good[np.argsort(scores[good], kind="stable")]
    picks = [
        ("worst_defect", d_up[:n]),
        ("worst_good", g_up[::-1][:n]),
        ("best_defect", d_up[::-1][:n]),
        ("best_good", g_up[:n]),
    ]
    seen: set[int] = set()
    out: list[tuple[str, int]] = []
    for kind, idx in picks:
        for i in idx.tolist():
            if i not in seen:
                seen.add(i)
                out.append((kind, i))
    return out


# ------------------------------------------------------------------------- per defect type


def per_type_stats(labels: ArrayLike, scores: ArrayLike, defect_types: Sequence[str],
                   threshold: float | None) -> dict[str, dict[str, Any]]:
    """Per type: image count; for defect types, how many were caught at the threshold
    (score >= threshold) and the AUROC of that type's images against all good images; for
    the good images, how many were flagged. Figures that need what is missing (a
    threshold, good images) are None."""
    y, s = _labels_scores(labels, scores)
    types = [str(t) for t in defect_types]
    if len(types) != y.size:
        raise ValueError(f"got {len(types)} defect types for {y.size} scores")
    t = np.asarray(types, dtype=object)
    good = ~y
    out: dict[str, dict[str, Any]] = {}
    if good.any():
        n = int(good.sum())
        flagged = None if threshold is None else int((s[good] >= threshold).sum())
        out["good"] = {"count": n, "flagged": flagged,
                       "flagged_rate": None if flagged is None else flagged / n}
    for name in sorted({types[i] for i in np.flatnonzero(y)}):
        sel = y & (t == name)
        n = int(sel.sum())
        caught = None if threshold is None else int((s[sel] >= threshold).sum())
        auroc = None
        if good.any():
            both = sel | good
            auroc = image_auroc(y[both], s[both])
        out[name] = {"count": n, "caught": caught,
                     "caught_rate": None if caught is None else caught / n, "auroc": auroc}
    return out


def scores_figure(labels: np.ndarray, scores: np.ndarray, threshold: float | None) -> Any:
    """Histograms of the good and the defective images' scores on shared bins, with the
    threshold drawn: where the two overlap is where the decisions go wrong."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.5), dpi=100)
    ax = fig.add_subplot()
    n_bins = int(np.clip(scores.size // 3, 10, 40))
    edges = np.histogram_bin_edges(scores, bins=n_bins) if scores.size else np.linspace(0, 1, 11)
    for flag, name, colour in ((False, "good", "C0"), (True, "defective", "C3")):
        part = scores[labels == flag]
        if part.size:
            ax.hist(part, bins=edges.tolist(), color=colour, alpha=0.55, label=f"{name} ({part.size})",
                    edgecolor=colour, linewidth=0.8)
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", linewidth=1.5,
                   label=f"threshold {threshold:.4g}")
    ax.set_xlabel("image score (score >= threshold is a defect)")
    ax.set_ylabel("images")
    ax.set_title("Score distributions")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- example panels


def display_scale(height: int, width: int, target: int = PANEL_MIN) -> int:
    """Whole-pixel upscaling factor that brings the longer side to at least `target`."""
    return max(1, math.ceil(target / max(height, width, 1)))


def _upscale(img: np.ndarray, scale: int) -> np.ndarray:
    import cv2

    if scale == 1:
        return img
    h, w = img.shape[:2]
    return cv2.resize(img, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)


def rgb8(image: np.ndarray) -> np.ndarray:
    """(C, H, W) in [0, 1], C = 1 or 3 -> (H, W, 3) uint8 RGB."""
    img = np.clip(image.astype(np.float32, copy=False), 0.0, 1.0)
    img = np.repeat(img[:1], 3, axis=0) if img.shape[0] == 1 else img[:3]
    return (np.moveaxis(img, 0, -1) * 255).round().astype(np.uint8)


def heat_panel(rgb: np.ndarray, amap: np.ndarray, value_range: tuple[float, float],
               threshold: float | None, scale: int) -> np.ndarray:
    """The input (H, W, 3) uint8 with the (H, W) map over it in jet, upscaled by `scale`,
    with a 1-pixel white outline of map >= threshold drawn at the upscaled size."""
    import cv2

    lo, hi = value_range
    norm = np.clip((amap.astype(np.float32) - lo) / max(hi - lo, 1e-12), 0, 1)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    blend = cv2.addWeighted(rgb, 0.5, np.ascontiguousarray(heat), 0.5, 0)
    big = np.ascontiguousarray(_upscale(blend, scale))
    if threshold is not None:
        region = _upscale((amap >= threshold).astype(np.uint8), scale)
        contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(big, contours, -1, (255, 255, 255), 1)
    return big


def _text_panel(h: int, w: int, text: str) -> np.ndarray:
    import cv2

    panel = np.full((h, w, 3), 200, np.uint8)
    cv2.putText(panel, text, (8, h // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (60, 60, 60), 1,
                cv2.LINE_AA)
    return panel


def _binary_panel(mask: np.ndarray, scale: int) -> np.ndarray:
    """(H, W) 0/1 -> white on black, upscaled: every defect pixel stays a whole block."""
    white = np.where(mask > 0.5, 255, 0).astype(np.uint8)
    return np.repeat(_upscale(white, scale)[..., None], 3, axis=2)


def _example_png(
    image: np.ndarray,
    mask: np.ndarray | None,
    amap: np.ndarray | None,
    pixel_threshold: float | None,
    map_range: tuple[float, float],
    ground_truth: bool = True,
) -> bytes:
    """Panels side by side: input, ground truth (unless ground_truth=False), anomaly map
    over the input (outline: the predicted region), predicted mask. A dataset without masks
    gets no ground-truth column at all, rather than an empty one that reads as "no defect
    here". Labels are ASCII drawn by OpenCV; the file name and score go in the HTML."""
    import cv2

    rgb = rgb8(image)
    h, w = rgb.shape[:2]
    scale = display_scale(h, w)
    big_h, big_w = h * scale, w * scale
    panels: list[tuple[str, np.ndarray]] = [("input", _upscale(rgb, scale))]
    if ground_truth:
        panels.append(("ground truth", _binary_panel(mask[0], scale) if mask is not None
                       else _text_panel(big_h, big_w, "no mask")))
    if amap is not None:
        panels.append(("anomaly map", heat_panel(rgb, amap[0], map_range, pixel_threshold, scale)))
        if pixel_threshold is not None:
            panels.append((f"predicted (map >= {pixel_threshold:.3g})",
                           _binary_panel((amap[0] >= pixel_threshold).astype(np.uint8), scale)))
        else:
            panels.append(("predicted", _text_panel(big_h, big_w, "no threshold")))
    else:
        panels.append(("anomaly map", _text_panel(big_h, big_w, "no anomaly map")))
        panels.append(("predicted", _text_panel(big_h, big_w, "no threshold")))
    columns = []
    for i, (label, panel) in enumerate(panels):
        head = np.full((PANEL_HEADER, big_w, 3), 255, np.uint8)
        cv2.putText(head, label, (2, PANEL_HEADER - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (40, 40, 40), 1, cv2.LINE_AA)
        if i:
            columns.append(np.full((PANEL_HEADER + big_h, PANEL_GAP, 3), 255, np.uint8))
        columns.append(np.vstack([head, panel]))
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(np.hstack(columns)[..., ::-1]))
    if not ok:  # pragma: no cover - cv2 failure
        raise RuntimeError("could not encode an example PNG")
    return buf.tobytes()


def example_width(height: int, width: int, n_panels: int) -> int:
    """Width in pixels of an example PNG of n_panels panels for an input of that size."""
    return n_panels * width * display_scale(height, width) + (n_panels - 1) * PANEL_GAP


# ------------------------------------------------------------------------------------ HTML


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            rows.extend(_flatten(v, f"{prefix}{k}."))
        else:
            rows.append((f"{prefix}{k}", v))
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, list):
        return f"[{len(v)} values]" if len(v) > 8 else ", ".join(_fmt(x) for x in v)
    return "n/a" if v is None else str(v)


def _label_name(label: bool) -> str:
    return "defect" if label else "good"


def _pct(part: int | None, whole: int) -> str:
    if part is None:
        return "n/a (no threshold)"
    return f"{part} of {whole} ({100 * part / whole:.1f}%)" if whole else "0"


def _identity_html(metrics: dict[str, Any]) -> str:
    """Which model, threshold, data and software the figures belong to."""
    e = html.escape
    ident = metrics.get("identity") or {}
    found, scored = metrics.get("images_found"), metrics.get("images_scored")
    skipped = metrics.get("skipped")
    rows: list[tuple[str, str]] = []
    if ident:
        rows += [("model id", f"<code>{e(_fmt(ident.get('model_id')))}</code>"),
                 ("detector", e(_fmt(ident.get("detector")))),
                 ("run folder", f"<code>{e(_fmt(ident.get('run')))}</code>")]
        origin = ident.get("threshold_origin") or {}
        if origin:
            by = origin.get("written_by")
            digest = origin.get("data_sha256") or "not recorded"
            rows.append(("threshold origin", (
                f"{e(_fmt(origin.get('value')))} ({e(_fmt(origin.get('method')))}), chosen"
                + (f" by <code>anomalyqc {e(by)}</code>" if by else "")
                + f" on <code>{e(_fmt(origin.get('data')))}</code>, data SHA-256 "
                f"<code>{e(_fmt(digest))}</code>")))
        rows += [("evaluated data", f"<code>{e(_fmt(ident.get('data')))}</code>"),
                 ("evaluated data SHA-256", f"<code>{e(_fmt(ident.get('data_sha256')))}</code>")]
    if found is not None:
        n_skip = len(skipped) if isinstance(skipped, list) else 0
        rows.append(("images", f"{e(_fmt(found))} found, {e(_fmt(scored))} scored, "
                               f"{n_skip} entr{'y' if n_skip == 1 else 'ies'} skipped"
                               + (' (listed below)' if n_skip else '')))
    if ident:
        soft = ident.get("software") or {}
        pk = soft.get("packages") or {}
        versions = ", ".join(f"{k} {v}" for k, v in pk.items() if v)
        rows += [("software", e(f"python {soft.get('python', '?')}, {versions}")),
                 ("date (UTC)", e(_fmt(ident.get("date"))))]
    if not rows:
        return ""
    body = "\n".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<h2>Identity</h2>\n<table class="identity">\n{body}\n</table>\n'


def _per_type_html(per_type: dict[str, dict[str, Any]]) -> str:
    if not per_type:
        return ""
    e = html.escape
    rows = []
    for name, st in per_type.items():
        if name == "good" and "flagged" in st:
            rows.append(f'<tr class="good"><th>good</th><td>{st["count"]}</td>'
                        f'<td>flagged: {e(_pct(st["flagged"], st["count"]))}</td><td>-</td></tr>')
        else:
            auroc = "n/a" if st.get("auroc") is None else f"{st['auroc']:.4f}"
            rows.append(f"<tr><th>{e(name)}</th><td>{st['count']}</td>"
                        f"<td>caught: {e(_pct(st.get('caught'), st['count']))}</td>"
                        f"<td>{auroc}</td></tr>")
    return ("<h2>Per defect type</h2>\n<table>\n<tr><th>type</th><th>images</th>"
            "<th>at the threshold</th><th>AUROC against the good images</th></tr>\n"
            + "\n".join(rows) + "\n</table>\n")


def _classification_html(c: Any) -> str:
    """A classifier's section (evaluation.classification): per class, confusion matrix,
    macro averages and the good-vs-defect view."""
    if not isinstance(c, dict) or "per_class" not in c:
        return ""
    e = html.escape

    def num(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    rows = "\n".join(
        f"<tr><th>{e(name)}{'' if st.get('learnt') else ' (not learnt)'}</th>"
        f"<td>{st['support']}</td><td>{num(st['precision'])}</td><td>{num(st['recall'])}</td>"
        f"<td>{num(st['f1'])}</td></tr>" for name, st in c["per_class"].items())
    m = c.get("macro") or {}
    rows += (f"\n<tr><th>macro average</th><td>-</td><td>{num(m.get('precision'))}</td>"
             f"<td>{num(m.get('recall'))}</td><td>{num(m.get('f1'))}</td></tr>")
    cm = c["confusion_matrix"]
    head = "".join(f"<th>{e(n)}</th>" for n in cm["columns_predicted"])
    body = "\n".join(f"<tr><th>{e(n)}</th>" + "".join(f"<td>{v}</td>" for v in counts) + "</tr>"
                     for n, counts in zip(cm["rows_true"], cm["counts"], strict=True))
    b = c.get("good_vs_defect") or {}
    return ("<h2>Classes</h2>\n"
            f"<p>Class accuracy {num(c.get('accuracy'))}. Good against defect (the predicted "
            f"class, no threshold): accuracy {num(b.get('accuracy'))}, TPR {num(b.get('tpr'))}, "
            f"TNR {num(b.get('tnr'))}, AUROC of 1 - P(good) {num(b.get('auroc'))}. The "
            "anomaly maps below are the class activation maps (LayerCAM or Grad-CAM, as "
            "configured) of the most probable defect class.</p>\n"
            "<table>\n<tr><th>class</th><th>images</th><th>precision</th><th>recall</th>"
            f"<th>F1</th></tr>\n{rows}\n</table>\n"
            "<p>Confusion matrix (rows: true class, columns: predicted).</p>\n"
            f"<table>\n<tr><th></th>{head}</tr>\n{body}\n</table>\n")


def _skipped_html(skipped: Any, limit: int = 200) -> str:
    if not isinstance(skipped, list) or not skipped:
        return ""
    e = html.escape
    rows = "\n".join(f"<tr><td><code>{e(str(s.get('path')))}</code></td>"
                     f"<td>{e(str(s.get('reason')))}</td></tr>"
                     for s in skipped[:limit] if isinstance(s, dict))
    more = (f"<p>... and {len(skipped) - limit} more, listed in the metrics JSON.</p>"
            if len(skipped) > limit else "")
    return (f"<h2>Skipped entries ({len(skipped)})</h2>\n<p>Found in the data folder but not "
            f"read, and why.</p>\n<table>\n<tr><th>path</th><th>reason</th></tr>\n{rows}\n"
            f"</table>\n{more}")


def _html(
    metrics: dict[str, Any],
    examples: list[dict[str, Any]],
    threshold: float | None,
    n_good: int,
    n_defect: int,
    panels: list[str],
    map_range: tuple[float, float] | None,
) -> str:
    e = html.escape
    notes = metrics.get("notes") or []
    table = {k: v for k, v in metrics.items() if k not in _SECTIONED}
    rows = "\n".join(f"<tr><th>{e(k)}</th><td>{e(_fmt(v))}</td></tr>" for k, v in _flatten(table))
    thr = "not set" if threshold is None else f"{threshold:.6g} (score &gt;= threshold is a defect)"
    per_type = metrics.get("per_defect_type") or {}
    summary = ""
    if threshold is not None and per_type:
        caught = sum(v.get("caught") or 0 for k, v in per_type.items() if k != "good")
        flagged = (per_type.get("good") or {}).get("flagged") or 0
        summary = (f'<p class="summary">At the threshold: <b>{caught} of {n_defect}</b> defective '
                   f"images caught, <b>{flagged} of {n_good}</b> good images flagged.</p>")
    note_html = "".join(f'<p class="note">Note: {e(str(n))}</p>\n' for n in notes)
    sections = []
    if examples:
        scale = ("" if map_range is None else
                 f" Anomaly map colours: blue = {map_range[0]:.4g} to red = {map_range[1]:.4g}, "
                 "the same scale in every example; white outline = the predicted region.")
        sections.append(f'<p class="panels">Example panels: {e(" | ".join(panels))}.{e(scale)} '
                        "Small inputs are enlarged with whole pixels (nearest neighbour).</p>")
    for title, prefix in (("Worst cases", "worst_"), ("Best cases", "best_")):
        items = []
        for ex in (x for x in examples if x["kind"].startswith(prefix)):
            status = "" if ex["correct"] is None else (" ok" if ex["correct"] else " wrong")
            items.append(
                f'<figure class="ex{status}"><img src="{e(ex["file"])}" alt="{e(ex["path"])}">'
                f"<figcaption>{e(ex['kind'].replace('_', ' '))}: <code>{e(ex['path'])}</code><br>"
                f"score {ex['score']:.5g}, label {e(ex['label'])}, "
                f"decision {e(ex['decision'] or 'n/a')}</figcaption></figure>"
            )
        if items:
            sections.append(f"<h2>{title}</h2>\n" + "\n".join(items))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>anomalyqc evaluation report</title>
<style>
body {{ font-family: sans-serif; margin: 1em 1.2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; vertical-align: top; }}
td code, figcaption code {{ overflow-wrap: anywhere; }}
table.identity td {{ max-width: 60em; }}
figure {{ margin: 1em 0; padding: 0.3em 0.4em; border-left: 6px solid #ccc; overflow-x: auto; }}
figure.ok {{ border-color: #3a3; }} figure.wrong {{ border-color: #c33; }}
figure img {{ max-width: none; image-rendering: pixelated; }}
p.note {{ color: #a60; }}
p.summary {{ font-size: 1.15em; }}
.plots img {{ max-width: 48%; vertical-align: top; }}
</style></head><body>
<h1>anomalyqc evaluation report</h1>
<p>{n_good} good and {n_defect} defective images; image threshold {thr}.</p>
{summary}
{note_html}{_identity_html(metrics)}{_per_type_html(per_type)}\
{_classification_html(metrics.get("classification"))}<h2>Scores</h2>
<div class="plots">
<img src="scores.png" alt="score distributions of good and defective images, threshold drawn">
<img src="roc.png" alt="image-level ROC curve"></div>
<h2>Metrics</h2>
<table>
{rows}
</table>
{_skipped_html(metrics.get("skipped"))}{chr(10).join(sections)}
</body></html>
"""


def check_metrics_file(name: str) -> None:
    """Refuse a metrics file name that would overwrite another file of the report."""
    if name in REPORT_FILES or Path(name).name != name:
        raise ConfigError(f"the metrics file name {name!r} clashes with the report's own "
                          "files (report.html, roc.png, scores.png, examples/); choose another "
                          "name, e.g. metrics.json")


def write_report(
    out_dir: str | os.PathLike[str],
    metrics: dict[str, Any],
    labels: ArrayLike,
    scores: ArrayLike,
    paths: list[str],
    images: ArrayLike | None = None,
    masks: ArrayLike | None = None,
    maps: ArrayLike | None = None,
    threshold: float | None = None,
    n_examples: int = 4,
    pixel_threshold: float | None = None,
    metrics_file: str = "metrics.json",
    defect_types: Sequence[str] | None = None,
) -> Path:
    """Write the metrics JSON, roc.png, scores.png, examples/*.png and report.html to
    out_dir; return the html path.

    images (N, C, H, W) in [0, 1], masks and maps (N, 1, H, W); only the example images
    are converted, so memory stays at the size of the inputs. Without images, no examples
    are drawn; without masks (a dataset with image labels only) they have no ground-truth
    column. Examples are up to n_examples each of worst defect, worst good, best defect
    and best good (see _pick_examples). The predicted mask is map >= pixel_threshold; when
    that is None the image threshold is used, since our detectors' image score is the
    maximum of the map and so lives on the same scale. defect_types (one per image) adds
    the per-type table (per_type_stats) and a "defect_type" to each image row.

    metrics may carry sections the page shows on their own: "identity" (model id,
    detector, run, threshold_origin, data, data_sha256, software, date), "images_found",
    "images_scored" and "skipped" (a list of {"path", "reason"}), and "notes".

    The metrics JSON (out_dir/metrics_file, written once) is one flat object:
    {"schema": "anomalyqc-metrics/1", **metrics, "n_good", "n_defect", "threshold" (the
    image threshold or null), "pixel_threshold", "per_defect_type" (with defect_types),
    "images": [{"path", "label" (0 good, 1 defect), "score", "decision" ("good" | "defect"
    | null), "defect_type"}]}. NaN and infinite figures are written as null; an image with a
    non-finite score ranks as the most anomalous and is decided "defect" (see
    rank_non_finite); file names that are not valid UTF-8 have their odd bytes written as
    \\xNN.
    """
    out = Path(out_dir)
    check_metrics_file(metrics_file)
    raw = _to_numpy(scores).astype(np.float64).ravel()
    y, s = _labels_scores(labels, rank_non_finite(raw, threshold))
    paths = [display(p) for p in paths]
    if len(paths) != y.size:
        raise ValueError(f"got {len(paths)} paths for {y.size} scores")
    n_defect = int(np.count_nonzero(y))
    n_good = int(y.size - n_defect)
    decisions: list[str | None] = (
        [None] * y.size if threshold is None else [_label_name(v >= threshold) for v in s.tolist()]
    )

    metrics_js = _jsonable(metrics)
    own: dict[str, Any] = {
        "schema": METRICS_SCHEMA,
        "n_good": n_good,
        "n_defect": n_defect,
        "threshold": _jsonable(threshold),
        "pixel_threshold": _jsonable(pixel_threshold),
    }
    if defect_types is not None:
        own["per_defect_type"] = _jsonable(per_type_stats(y, s, defect_types, threshold))
    for key in _OWN_KEYS:
        if key in metrics_js and (key not in own or metrics_js[key] != own[key]):
            raise ValueError(
                f"metrics[{key!r}] = {metrics_js[key]!r} clashes with the report's own "
                f"{key!r} ({own.get(key, 'reserved')!r})"
            )
    rows = [{"path": p, "label": int(lab), "score": _jsonable(sc), "decision": d}
            for p, lab, sc, d in zip(paths, y.tolist(), raw.tolist(), decisions, strict=True)]
    if defect_types is not None:
        for row, t in zip(rows, defect_types, strict=True):
            row["defect_type"] = display(str(t))
    record = {"schema": METRICS_SCHEMA, **metrics_js, **own, "images": rows}

    # Everything is rendered before anything is written (see the module docstring).
    files: dict[str, bytes] = {
        metrics_file: (json.dumps(record, indent=2, allow_nan=False) + "\n").encode("utf-8"),
        "roc.png": _roc_png(y, s),
        "scores.png": _png_bytes(scores_figure(y, s, threshold)),
    }
    examples: list[dict[str, Any]] = []
    map_range: tuple[float, float] | None = None
    if images is not None and n_examples > 0:
        pix_thr = pixel_threshold if pixel_threshold is not None else threshold
        map_range = (0.0, 1.0)
        if maps is not None:
            map_range = (float(maps.min()), float(maps.max()))
            if map_range[1] <= map_range[0]:
                map_range = (map_range[0], map_range[0] + 1e-6)
        for rank, (kind, i) in enumerate(_pick_examples(y, s, n_examples)):
            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(paths[i]).stem)[:60] or "image"
            name = f"{kind}_{rank:02d}_{stem}.png"
            decision = decisions[i]
            files[f"examples/{name}"] = _example_png(
                _to_numpy(images[i]),
                None if masks is None else _to_numpy(masks[i]),
                None if maps is None else _to_numpy(maps[i]),
                pix_thr,
                map_range,
                ground_truth=masks is not None,
            )
            examples.append(
                {
                    "kind": kind,
                    "file": f"examples/{name}",
                    "path": paths[i],
                    "score": float(raw[i]),
                    "label": _label_name(y[i]),
                    "decision": decision,
                    "correct": None if decision is None else decision == _label_name(y[i]),
                }
            )
    panels = ["input", *(["ground truth"] if masks is not None else []), "anomaly map",
              "predicted mask"]
    page_metrics = {**metrics_js, **own}
    files["report.html"] = _html(page_metrics, examples, threshold, n_good, n_defect, panels,
                                 map_range if maps is not None else None).encode("utf-8")

    out.mkdir(parents=True, exist_ok=True)
    ex_dir = out / "examples"
    if examples:
        ex_dir.mkdir(exist_ok=True)
    for name, data in files.items():
        if name != "report.html":
            atomic_write_bytes(out / name, data)
    if ex_dir.is_dir():  # drop examples left here by an earlier report
        written = {Path(n).name for n in files if n.startswith("examples/")}
        for old in ex_dir.iterdir():
            if _EXAMPLE_NAME.match(old.name) and old.name not in written:
                old.unlink(missing_ok=True)
    page = out / "report.html"
    atomic_write_bytes(page, files["report.html"])  # last: the page appears when all it shows has
    return page
