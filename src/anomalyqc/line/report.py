"""Write the line validation report: report.json (strict JSON), report.html and heatmap PNGs.

This is the document a QA reviewer signs, so the JSON carries the models (run folders,
model ids, file digests), the thresholds, the kits (paths and content digests), the
software versions and the date next to the figures.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from anomalyqc.fileio import atomic_write_bytes, atomic_write_json, atomic_write_png
from anomalyqc.line.inspect import InspectionResult

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
EXAMPLES = "examples"


def heatmap_panel(frame: np.ndarray, result: InspectionResult, layout_boxes: np.ndarray) -> np.ndarray:
    """Frame | frame with the heatmap over it, rejected regions boxed in red (BGR uint8).

    The heatmap is in threshold units (1.0 = the region's threshold), drawn from 0 to 2.
    """
    import cv2

    gray = frame if frame.ndim == 2 else frame[0]
    base = cv2.cvtColor(gray.astype(np.uint8), cv2.COLOR_GRAY2BGR)
    heat = np.clip(np.nan_to_num(result.heatmap, nan=2.0, posinf=2.0) / 2.0, 0, 1)
    colour = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    over = cv2.addWeighted(base, 0.55, colour, 0.45, 0)
    if result.decisions is not None:
        for v, r in zip(*np.nonzero(result.decisions["region"])):
            x0, y0, x1, y1 = (int(c) for c in layout_boxes[v, r])
            cv2.rectangle(over, (x0, y0), (x1 - 1, y1 - 1), (0, 0, 255), 1)
    gap = np.full((base.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([base, gap, over], axis=1)


def write_panel(path: Path, panel: np.ndarray) -> None:
    atomic_write_png(path, panel)


def _f(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
    return html.escape(str(v))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "\n".join("<tr>" + "".join(f"<td>{_f(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>\n{body}</table>"


def _confusion(c: dict[str, dict[str, int]]) -> str:
    cols = list(next(iter(c.values())))
    return _table(["truth \\ decision", *cols], [[k, *v.values()] for k, v in c.items()])


def _roi_use(model: dict[str, Any], report: dict[str, Any]) -> str:
    """What the model did with the layout's ROI masks."""
    rois = set(report.get("layout", {}).get("roi_masks", {}))
    have = [r for r in model["regions"] if r in rois]
    if not model.get("uses_roi"):
        return "not used by this detector" if have else "none"
    if not have:
        return "none"
    names = ", ".join(have)
    return f"{names} (others: whole patch)" if len(have) < len(model["regions"]) else names


def render_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (images linked from examples/)."""
    e = html.escape
    t1, t2, t3 = (
        report["table_10_1_region_vial"],
        report["table_10_2_strip"],
        report["table_10_3_run_policy"],
    )
    cols = list(t1)
    rows1 = [
        [name, *[t1[c][key] for c in cols]]
        for name, key in (
            ("Threshold", "threshold"),
            ("Accuracy", "accuracy"),
            ("TPR (defective rejected)", "tpr"),
            ("TNR (good accepted)", "tnr"),
            ("Mean inference time per patch (ms)", "mean_inference_ms_per_patch"),
        )
    ]
    rows1.append(
        ["Samples (good / defective)", *[f"{t1[c]['n_good']} / {t1[c]['n_defective']}" for c in cols]]
    )
    rows2 = [[f"Threshold {k}", v] for k, v in t2["thresholds"].items()] + [
        ["Accuracy", t2["accuracy"]],
        ["TPR (defective rejected)", t2["tpr"]],
        ["TNR (good accepted)", t2["tnr"]],
        ["Acquisitions (good / defective)", f"{t2['n_good']} / {t2['n_defective']}"],
        ["Mean inference time per strip (ms)", t2["mean_inference_ms_per_strip"]],
    ]
    rows3 = [[f"Threshold {k}", v] for k, v in t3["thresholds"].items()] + [
        ["Acceptance policy", t3["policy"]],
        ["Accuracy", t3["accuracy"]],
        ["TPR (defective products classified defective)", t3["tpr"]],
        ["TNR (good products classified good)", t3["tnr"]],
        ["Products (good / defective)", f"{t3['n_good']} / {t3['n_defective']}"],
    ]
    tm = report["timing"]
    rows_t = [[k, v["median"], v["p95"], v["max"]] for k, v in tm["stages"].items()]
    rows_m = [
        [k, v["detector"], ", ".join(v["regions"]), v["n_patches_per_batch"], v["median"], v["p95"],
         v["max"], v["mean_per_patch_ms"]]
        for k, v in tm.get("forward_by_model", {}).items()
    ]  # fmt: skip
    per_model = (
        "<h3>Forward pass per model (ms)</h3>"
        + _table(["model", "detector", "regions", "patches per batch", "median", "p95", "max",
                  "mean per patch"], rows_m)  # fmt: skip
        if rows_m
        else ""
    )
    conf = "".join(
        f"<h3>{e(name)}</h3>{_confusion(table['confusion'])}"
        for name, table in (*((c, t1[c]) for c in cols), ("strip (acquisition)", t2), ("product", t3))
    )
    figs = []
    for kind in ("false_rejects", "false_accepts"):
        items = report["errors"][kind]
        figs.append(f"<h3>{e(kind.replace('_', ' '))} ({len(items)})</h3>")
        for it in items:
            img = f'<img src="{e(it["heatmap"])}" alt="heatmap">' if it.get("heatmap") else ""
            wp = it["worst_patch"]
            figs.append(
                f"<figure>{img}<figcaption>{e(it['strip_id'])} run {it['run']}: worst patch "
                f"{e(wp['source'])}, vial {wp['vial']}, region {e(wp['region'])}; margin "
                f"(score - threshold) {_f(it['margin'])}</figcaption></figure>"
            )
    prod_err = _table(
        ["strip", "label", "decision", "runs rejected", "runs"],
        [
            [p["strip_id"], p["label"], p["decision"], p["runs_rejected"], p["runs"]]
            for p in report["errors"]["products"]
        ],
    )
    prov = report.get("provenance", {})
    models = _table(
        ["regions", "run", "detector", "model id", "ROIs"],
        [
            [", ".join(m["regions"]), m["run"], m["detector"], m["model_id"], _roi_use(m, report)]
            for m in report.get("models", [])
        ],
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>anomalyqc line validation report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; }}
p.pos {{ background: #eef; padding: 0.5em; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>anomalyqc line validation report</h1>
<p class="pos"><b>Positive class: defective.</b> {e(report["positive_class"])}. A false reject is
a good unit rejected; a false accept is a defective unit accepted.</p>
<p>Kit: <code>{e(str(report["kit"]["path"]))}</code> (sha256 {e(str(report["kit"]["sha256"]))});
{report["n_acquisitions"]} acquisitions; sources per acquisition: {e(", ".join(report["sources"]))}.
Date (UTC): {e(str(prov.get("utc")))}; anomalyqc {e(str(report.get("anomalyqc_version")))}.</p>
<h2>Models</h2>{models}
<h2>Table 1: per region and vial</h2>{_table(["", *cols], rows1)}
<h2>Table 2: per strip (eq. 10.3, one sample per acquisition)</h2>{_table(["", "Score"], rows2)}
<h2>Table 3: per run with the acceptance policy (one sample per product)</h2>
<p>{e(t3["policy_rule"])}.</p>{_table(["", "Score"], rows3)}
<h2>Timing of the {tm["n_patches_per_batch"]}-patch batch (ms)</h2>
<p>{tm["n_batches_timed"]} batches timed ({tm["warmup_batches_excluded"]} warm-up excluded); budget
{_f(tm["budget_ms"])} ms: p95 within budget {_f(tm["p95_within_budget"])}, max within budget
{_f(tm["max_within_budget"])}.</p>{_table(["stage", "median", "p95", "max"], rows_t)}
{per_model}
<h2>Confusion matrices</h2>{conf}
<h2>Errors per acquisition</h2>
<p>Panels: key frame {e(str(report.get("panel_frame")))} | heatmap in threshold units (0..2,
1 = the region's threshold) with rejected regions boxed.</p>
{chr(10).join(figs)}
<h2>Misclassified products</h2>{prod_err}
</body></html>
"""


def write_report(out_dir: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / REPORT_JSON, report)
    atomic_write_bytes(out_dir / REPORT_HTML, render_html(report).encode("utf-8"))
    return out_dir / REPORT_JSON, out_dir / REPORT_HTML
