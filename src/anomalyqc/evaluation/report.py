"""An evaluation report a QC reviewer can open without tools: JSON, ROC plot, examples, HTML.

Every file is written to a temporary name and moved into place (os.replace), so a crash or
a concurrent reader never sees a half-written report. Matplotlib is used through its
object API with the Agg canvas: no pyplot global state, no display needed, and importing
this package does not import matplotlib.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from anomalyqc.errors import CalibrationError, ConfigError
from anomalyqc.evaluation.metrics import (
    ArrayLike,
    _labels_scores,
    _to_numpy,
    rank_non_finite,
    roc_curve_points,
)
from anomalyqc.fileio import atomic_write_bytes

_EXAMPLE_NAME = re.compile(r"^(worst|best)_(defect|good)_\d+_.*\.png$")

METRICS_SCHEMA = "anomalyqc-metrics/1"
# Keys write_report fills in from its own arguments; a metrics dict may repeat them only
# with the same value.
_OWN_KEYS = ("schema", "n_good", "n_defect", "threshold", "pixel_threshold", "images")


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
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, Path):
        return str(x)
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


def _hwc(image: np.ndarray) -> np.ndarray:
    """(C, H, W) in [0, 1] to something imshow takes: (H, W) grey or (H, W, 3)."""
    image = np.clip(image.astype(np.float32, copy=False), 0.0, 1.0)
    return image[0] if image.shape[0] == 1 else np.moveaxis(image[:3], 0, -1)


def _example_png(
    image: np.ndarray,
    mask: np.ndarray | None,
    amap: np.ndarray | None,
    pixel_threshold: float | None,
    map_range: tuple[float, float],
    title: str,
    ground_truth: bool = True,
) -> bytes:
    """Panels: input, ground truth (unless ground_truth=False), heatmap over the input,
    predicted mask. A dataset without masks gets no ground-truth column at all, rather
    than an empty one that reads as "no defect here"."""
    from matplotlib.figure import Figure

    n = 4 if ground_truth else 3
    fig = Figure(figsize=(3 * n, 3.4), dpi=80)
    axes = list(fig.subplots(1, n))
    img = _hwc(image)
    grey = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}
    axes[0].imshow(img, **(grey if img.ndim == 2 else {}))
    axes[0].set_title("input")
    if ground_truth:
        if mask is not None:
            axes[1].imshow(mask[0], **grey)
        else:
            axes[1].text(0.5, 0.5, "no mask", ha="center", va="center")
        axes[1].set_title("ground truth")
    ax_map, ax_pred = axes[-2], axes[-1]
    if amap is not None:
        ax_map.imshow(img, **(grey if img.ndim == 2 else {}))
        im = ax_map.imshow(amap[0], cmap="jet", alpha=0.5, vmin=map_range[0], vmax=map_range[1])
        fig.colorbar(im, ax=ax_map, fraction=0.046, pad=0.02)
    else:
        ax_map.text(0.5, 0.5, "no anomaly map", ha="center", va="center")
    ax_map.set_title("anomaly map")
    if amap is not None and pixel_threshold is not None:
        ax_pred.imshow((amap[0] >= pixel_threshold).astype(np.float32), **grey)
        ax_pred.set_title(f"predicted (map >= {pixel_threshold:.3g})")
    else:
        ax_pred.text(0.5, 0.5, "no threshold", ha="center", va="center")
        ax_pred.set_title("predicted")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.82, wspace=0.2)
    return _png_bytes(fig)


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


def _html(
    metrics: dict[str, Any],
    examples: list[dict[str, Any]],
    threshold: float | None,
    n_good: int,
    n_defect: int,
    panels: list[str],
) -> str:
    e = html.escape
    notes = metrics.get("notes") or []
    table = {k: v for k, v in metrics.items() if k != "notes"}
    rows = "\n".join(f"<tr><th>{e(k)}</th><td>{e(_fmt(v))}</td></tr>" for k, v in _flatten(table))
    thr = "not set" if threshold is None else f"{threshold:.6g} (score &gt;= threshold is a defect)"
    note_html = "".join(f'<p class="note">Note: {e(str(n))}</p>\n' for n in notes)
    sections = []
    if examples:
        sections.append(f'<p class="panels">Example panels: {e(" | ".join(panels))}</p>')
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
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; }}
figure {{ margin: 1em 0; padding: 0.5em; border-left: 6px solid #ccc; }}
figure.ok {{ border-color: #3a3; }} figure.wrong {{ border-color: #c33; }}
p.note {{ color: #a60; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>anomalyqc evaluation report</h1>
<p>{n_good} good and {n_defect} defective images; image threshold {thr}.</p>
{note_html}<h2>Metrics</h2>
<table>
{rows}
</table>
<h2>ROC</h2>
<img src="roc.png" alt="image-level ROC curve">
{chr(10).join(sections)}
</body></html>
"""


def check_metrics_file(name: str) -> None:
    """Refuse a metrics file name that would overwrite another file of the report."""
    if name in ("report.html", "roc.png", "examples") or Path(name).name != name:
        raise ConfigError(f"the metrics file name {name!r} clashes with the report's own "
                          "files (report.html, roc.png, examples/); choose another name, "
                          "e.g. metrics.json")


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
) -> Path:
    """Write the metrics JSON, roc.png, examples/*.png and report.html to out_dir; return the
    html path.

    images (N, C, H, W) in [0, 1], masks and maps (N, 1, H, W); only the example images
    are converted, so memory stays at the size of the inputs. Without images, no examples
    are drawn; without masks (a dataset with image labels only) they have no ground-truth
    column. Examples are up to n_examples each of worst defect, worst good, best defect
    and best good (see _pick_examples). The predicted mask is map >= pixel_threshold; when
    that is None the image threshold is used, since our detectors' image score is the
    maximum of the map and so lives on the same scale.

    The metrics JSON (out_dir/metrics_file, written once) is one flat object:
    {"schema": "anomalyqc-metrics/1", **metrics, "n_good", "n_defect", "threshold" (the
    image threshold or null), "pixel_threshold", "images": [{"path", "label" (0 good, 1
    defect), "score", "decision" ("good" | "defect" | null)}]}. NaN and infinite figures
    are written as null; an image with a non-finite score ranks as the most anomalous and
    is decided "defect" (see rank_non_finite).
    """
    out = Path(out_dir)
    check_metrics_file(metrics_file)
    out.mkdir(parents=True, exist_ok=True)
    raw = _to_numpy(scores).astype(np.float64).ravel()
    y, s = _labels_scores(labels, rank_non_finite(raw, threshold))
    paths = [str(p) for p in paths]
    if len(paths) != y.size:
        raise ValueError(f"got {len(paths)} paths for {y.size} scores")
    n_defect = int(np.count_nonzero(y))
    n_good = int(y.size - n_defect)
    decisions: list[str | None] = (
        [None] * y.size if threshold is None else [_label_name(v >= threshold) for v in s.tolist()]
    )

    metrics_js = _jsonable(metrics)
    own = {
        "schema": METRICS_SCHEMA,
        "n_good": n_good,
        "n_defect": n_defect,
        "threshold": _jsonable(threshold),
        "pixel_threshold": _jsonable(pixel_threshold),
    }
    for key in _OWN_KEYS:
        if key in metrics_js and (key not in own or metrics_js[key] != own[key]):
            raise ValueError(
                f"metrics[{key!r}] = {metrics_js[key]!r} clashes with the report's own "
                f"{key!r} ({own.get(key, 'reserved')!r})"
            )
    record = {
        "schema": METRICS_SCHEMA,
        **metrics_js,
        **own,
        "images": [
            {"path": p, "label": int(lab), "score": _jsonable(sc), "decision": d}
            for p, lab, sc, d in zip(paths, y.tolist(), raw.tolist(), decisions)
        ],
    }
    atomic_write_bytes(
        out / metrics_file,
        (json.dumps(record, indent=2, allow_nan=False) + "\n").encode("utf-8"),
    )
    atomic_write_bytes(out / "roc.png", _roc_png(y, s))

    examples: list[dict[str, Any]] = []
    ex_dir = out / "examples"
    written: set[str] = set()
    if images is not None and n_examples > 0:
        ex_dir.mkdir(exist_ok=True)
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
            title = (
                f"{paths[i]}  |  score {raw[i]:.5g}  |  label {_label_name(y[i])}"
                f"  |  decision {decision or 'n/a'}"
            )
            png = _example_png(
                _to_numpy(images[i]),
                None if masks is None else _to_numpy(masks[i]),
                None if maps is None else _to_numpy(maps[i]),
                pix_thr,
                map_range,
                title,
                ground_truth=masks is not None,
            )
            atomic_write_bytes(ex_dir / name, png)
            written.add(name)
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
    if ex_dir.is_dir():  # drop examples left here by an earlier report
        for old in ex_dir.iterdir():
            if _EXAMPLE_NAME.match(old.name) and old.name not in written:
                old.unlink(missing_ok=True)

    panels = ["input", *(["ground truth"] if masks is not None else []), "anomaly map",
              "predicted mask"]
    page = out / "report.html"
    atomic_write_bytes(
        page,
        _html(metrics_js, examples, threshold, n_good, n_defect, panels).encode("utf-8"),
    )
    return page
