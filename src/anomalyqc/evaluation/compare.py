"""Several runs side by side on the same data: one table (`anomalyqc compare`).

Every run is evaluated on the test split of the same data with workflow.evaluate_run (its
full report goes to OUT/runs/<label>/), and one row per run is kept:

    label, detector, model_id, input_size, channels, image_auroc, pixel_auroc, aupro,
    threshold, threshold_source, calibrated, accuracy, tpr, tnr, f1 (the last four at the
    run's own stored threshold; null for a run without one: compare never writes a
    threshold into a run, and one chosen on the compared data itself would flatter it),
    ms_per_image (median model-only time of batch-1 predictions on preloaded images, after
    one warm-up), weights_bytes, stored_values (numbers in weights.safetensors), fit_seconds.

Each calibrated row also keeps `caught`: per defect type of the test split, the share of
its images flagged at the run's threshold, and for `good` the share passed; and
`unseen_classes`, the test classes a supervised run never saw in training. They make the
per-class figure (comparison_per_class.png, in the HTML page and beside a table in the
Markdown): where a classifier trained without a class misses it, an unsupervised detector
that only learnt "good" may still flag it.

OUT/comparison.json holds the rows, the data and its SHA-256, the notes and the software;
comparison.md and comparison.html hold the table. Runs at different input sizes are
compared as they are (image metrics are per image whatever the size); pixel metrics are
computed at each run's own input size, and a note says so.
"""

from __future__ import annotations

import html
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from anomalyqc.errors import ConfigError, OutputError
from anomalyqc.fileio import atomic_folder, atomic_write_bytes, atomic_write_json
from anomalyqc.models.storage import WEIGHTS_FILE, holds_model, load_detector, read_manifest
from anomalyqc.pathtext import display
from anomalyqc.progress import Progress
from anomalyqc.types import Batch

COMPARISON_FILE = "comparison.json"
PER_CLASS_FIGURE = "comparison_per_class.png"
COLUMNS = ("label", "detector", "model_id", "input_size", "image_auroc", "pixel_auroc", "aupro",
           "calibrated", "accuracy", "tpr", "tnr", "ms_per_image", "weights_bytes")


def _labels(runs: Sequence[Path]) -> list[str]:
    """Each run's folder name, made unique with its position where names repeat."""
    names = [r.resolve().name or "run" for r in runs]
    return [f"{n}_{i + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _replaceable(folder: Path) -> None:
    if holds_model(folder):
        raise OutputError(f"{folder} is a run folder: refusing to write a comparison over it; "
                          f"choose a new or empty folder")
    if any(folder.iterdir()) and not (folder / COMPARISON_FILE).is_file():
        raise OutputError(f"{folder} is not empty and is not an earlier comparison (no "
                          f"{COMPARISON_FILE}): refusing to replace it; choose a new or empty "
                          f"folder")


def time_predictions(run: Path, data: str | Path, images: int = 16) -> dict[str, Any]:
    """Median milliseconds of det.predict on one preloaded test image at a time (the first
    `images` test images of `data`)."""
    from anomalyqc.workflow import dataset_for

    det = load_detector(run)
    dataset = dataset_for(det, data, "test", masks=False)
    n = min(images, len(dataset))
    # one-image batches, with their ROIs for a detector that reads them (a GRD-Net run
    # trained on ROIs refuses an image without one)
    xs = [Batch.collate([dataset[i]]) for i in range(n)]
    det.predict(xs[0])  # warm-up: first-call allocations and lazy set-up
    ms = []
    for x in xs:
        t = time.perf_counter()
        det.predict(x)
        ms.append((time.perf_counter() - t) * 1000)
    return {"ms_per_image": round(statistics.median(ms), 3), "timed_images": n,
            "torch_threads": torch.get_num_threads()}


def compare_runs(runs: Sequence[str | Path], data: str | Path, out: str | Path,
                 batch_size: int = 8, masks: bool = True, timing_images: int = 16,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Evaluate every run on the test split of `data` and write the table to `out` (see
    the module docstring); returns what comparison.json holds."""
    from anomalyqc.evaluation.threshold_file import read_threshold
    from anomalyqc.placement import check_output_folder
    from anomalyqc.provenance import package_versions
    from anomalyqc.workflow import _read_fit_info, check_output_early, evaluate_run

    if not runs:
        raise ConfigError("compare needs at least one run folder")
    paths = [Path(r) for r in runs]
    for run in paths:
        if not holds_model(run):
            raise ConfigError(f"{display(run)} is not a run folder (no model files); pass "
                              f"folders written by `anomalyqc fit`")
        check_output_folder(out, "--out folder", [data], run,
                            "choose a folder outside the data and the run folders")
    out = Path(out)
    check_output_early(out, _replaceable)
    manifests = [read_manifest(r) for r in paths]  # checks each run's files before any work
    labels = _labels(paths)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    digests: set[str] = set()
    with atomic_folder(out, _replaceable) as tmp:
        for run, label, manifest in zip(paths, labels, manifests, strict=True):
            det = load_detector(run)
            stored = read_threshold(run, det.model_id or "")
            metrics = evaluate_run(run, data, tmp / "runs" / label / "metrics.json",
                                   calibrate=False, batch_size=batch_size, progress=progress,
                                   masks=masks, save_threshold=False)
            digests.add(metrics["identity"]["data_sha256"])
            calibrated = stored is not None
            at = {k: metrics[k] if calibrated else None for k in ("accuracy", "tpr", "tnr", "f1")}
            if calibrated and "this same data" in metrics["threshold_source"]:
                notes.append(f"{label}: its threshold was chosen on this same data, so its "
                             f"accuracy/TPR/TNR are optimistic")
            caught = None
            if calibrated:
                caught = {t: (1.0 - v["flagged_rate"]) if t == "good" else v["caught_rate"]
                          for t, v in sorted(metrics["per_defect_type"].items())
                          if (v.get("caught_rate") if t != "good" else v.get("flagged_rate"))
                          is not None}
            unseen = list((metrics.get("classification") or {}).get("unseen_classes") or [])
            tensors = det.state_tensors()
            fit = _read_fit_info(run)
            rows.append({
                "label": label, "run": display(run.resolve()), "detector": det.name,
                "model_id": det.model_id, "input_size": list(manifest.input_size),
                "channels": manifest.channels,
                "image_auroc": metrics["image_auroc"], "pixel_auroc": metrics["pixel_auroc"],
                "aupro": metrics["aupro"],
                "threshold": metrics["threshold"] if calibrated else None,
                "threshold_source": stored.describe() if stored is not None else
                "none: run `anomalyqc calibrate` on validation data",
                "calibrated": calibrated, **at,
                **time_predictions(run, data, timing_images),
                "weights_bytes": (run / WEIGHTS_FILE).stat().st_size,
                "stored_values": int(sum(t.numel() for t in tensors.values())),
                "fit_seconds": fit.get("fit_seconds"),
                "report": f"runs/{label}/report.html",
                "caught": caught, "unseen_classes": unseen,
            })
        sizes = {tuple(r["input_size"]) for r in rows}
        if len(sizes) > 1:
            notes.append("the runs take different input sizes ("
                         + ", ".join(f"{r['label']} {r['input_size'][0]}x{r['input_size'][1]}"
                                     for r in rows)
                         + "): image metrics compare directly; pixel metrics are computed at "
                           "each run's own input size, against masks resized to it")
        if any(not r["calibrated"] for r in rows):
            notes.append("accuracy/TPR/TNR are null for runs without a stored threshold "
                         "(calibrate them on validation data, not on the compared data)")
        result = {"data": display(Path(data).resolve()), "data_sha256": sorted(digests)[0],
                  "rows": rows, "notes": notes, "software": package_versions()}
        atomic_write_json(tmp / COMPARISON_FILE, result)
        table = markdown_table(rows)
        per_class = caught_table(rows)
        if per_class:
            atomic_write_bytes(tmp / PER_CLASS_FIGURE, per_class_png(rows))
        atomic_write_bytes(tmp / "comparison.md", (
            f"# Comparison on {result['data']}\n\n{table}\n"
            + "".join(f"\n- {n}" for n in notes) + ("\n" if notes else "")
            + (f"\n## Caught per class at each run's threshold (good: passed)\n\n{per_class}\n"
               f"\n![per class]({PER_CLASS_FIGURE})\n" if per_class else "")).encode())
        atomic_write_bytes(tmp / "comparison.html", html_page(result).encode())
    return result


def cell(row: dict[str, Any], key: str) -> str:
    """One table cell as text: metrics to 4 decimals, sizes as HxW, null as n/a."""
    v = row[key]
    if v is None:
        return "n/a"
    if key == "input_size":
        return f"{v[0]}x{v[1]}"
    if isinstance(v, float):
        return f"{v:.4f}" if key != "ms_per_image" else f"{v:.2f}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table of COLUMNS."""
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "\n".join("| " + " | ".join(cell(r, k).replace("|", "\\|") for k in COLUMNS)
                             + " |" for r in rows)


def _classes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The test classes of the calibrated rows: defect types sorted, "good" last."""
    found = {t for r in rows for t in (r.get("caught") or {})}
    return sorted(found - {"good"}) + (["good"] if "good" in found else [])


def caught_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per calibrated run, one column per class (caught; good: passed),
    a class the run never saw in training marked "(unseen)"; "" when no run is calibrated."""
    classes = _classes(rows)
    shown = [r for r in rows if r.get("caught")]
    if not shown:
        return ""
    head = "| run | " + " | ".join(classes) + " |\n|" + "---|" * (len(classes) + 1) + "\n"
    lines = []
    for r in shown:
        cells = []
        for c in classes:
            v = r["caught"].get(c)
            text = "n/a" if v is None else f"{v:.3f}"
            cells.append(text + (" (unseen)" if c in r.get("unseen_classes", []) else ""))
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines)


def per_class_png(rows: Sequence[dict[str, Any]]) -> bytes:
    """Grouped bars: per class, each calibrated run's caught share (good: passed); the bar
    of a class a run never saw in training is hatched and labelled."""
    import numpy as np
    from matplotlib.figure import Figure

    from anomalyqc.evaluation.report import _png_bytes

    classes = _classes(rows)
    shown = [r for r in rows if r.get("caught")]
    fig = Figure(figsize=(max(5.0, 1.3 * len(classes) + 2.0), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(shown), 1)
    for k, r in enumerate(shown):
        xs = np.arange(len(classes)) + (k - (len(shown) - 1) / 2) * width
        ys = [r["caught"].get(c) or 0.0 for c in classes]
        bars = ax.bar(xs, ys, width, label=r["label"])
        for bar, c, v in zip(bars, classes, ys, strict=True):
            unseen = c in r.get("unseen_classes", [])
            if unseen:
                bar.set_hatch("//")
            ax.text(bar.get_x() + bar.get_width() / 2, v + 0.01,
                    f"{v:.2f}" + ("\nunseen" if unseen else ""), ha="center", fontsize=6)
    ax.set_xticks(np.arange(len(classes)), [c if c != "good" else "good (passed)" for c in classes])
    ax.set_ylim(0, 1.3)
    ax.set_ylabel("flagged at the run's threshold")
    ax.set_title("Caught per class (hatched: a class the run never saw in training)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return _png_bytes(fig)


def html_page(result: dict[str, Any]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in COLUMNS)
    body = "".join(
        "<tr>" + "".join(
            f"<td><a href=\"{e(r['report'])}\">{e(r['label'])}</a></td>" if c == "label" else
            f"<td>{e(cell(r, c))}</td>"
            for c in COLUMNS) + "</tr>"
        for r in result["rows"])
    notes = "".join(f"<li>{e(n)}</li>" for n in result["notes"])
    figure = (f"<h2>Caught per class at each run's threshold</h2><img src=\"{PER_CLASS_FIGURE}\" "
              f"alt=\"caught per class\">" if caught_table(result["rows"]) else "")
    return (f"<!doctype html><meta charset=\"utf-8\"><title>anomalyqc comparison</title>"
            f"<h1>Comparison on <code>{e(result['data'])}</code></h1>"
            f"<p>data SHA-256 <code>{e(result['data_sha256'])}</code></p>"
            f"<table border=\"1\" cellpadding=\"4\"><tr>{head}</tr>{body}</table>"
            + (f"<ul>{notes}</ul>" if notes else "") + figure)


__all__ = ["caught_table", "compare_runs", "markdown_table", "per_class_png", "time_predictions"]
