"""Measured speed and memory of a fitted run: what the benchmarks/ scripts and the
`anomalyqc benchmark` command print. Figures are measured, never assumed.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalyqc.data import records_for
from anomalyqc.data.io import read_image, read_mask
from anomalyqc.errors import DataError
from anomalyqc.models.storage import load_detector
from anomalyqc.options import at_least
from anomalyqc.types import Batch
from anomalyqc.workflow import FIT_INFO_FILE, check_roi_option, check_rois, peak_rss_mb, transform_for


def _summary(ms: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(ms), 2),
            "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "n": len(ms)}


def benchmark_run(run: str | Path, data: str | Path, batch_size: int = 16,
                  repeats: int = 50, warmup: int = 3,
                  roi_dir: str | None = None, onnx: bool = False) -> dict[str, Any]:
    """Timings of the run on the test images of `data` (with their ROIs, read as part of
    the end-to-end time, for a detector that uses them; roi_dir as for evaluate). onnx=True
    adds torch eager against ONNX Runtime on the same images, at batch 1, batch_size and
    the line's 60-patch batch (the run must have been exported)."""
    at_least(batch_size, 1, "batch_size")
    at_least(repeats, 1, "repeats")
    at_least(warmup, 0, "warmup")
    run = Path(run)
    det = load_detector(run)
    check_roi_option(det, roi_dir)
    tf = transform_for(det)
    records = records_for(data, "test", masks=False, roi_dir=roi_dir)
    if not records:
        raise DataError(f"{data} has no test images to time")
    if det.needs_roi:
        check_rois(records, data, f"this {det.name} model was trained with ROIs and needs one "
                                  f"for every image")
    with_roi = det.uses_roi and all(r.roi_path is not None for r in records)
    files = [r.path for r in records]
    roi_of = {r.path: r.roi_path for r in records if r.roi_path is not None}

    def load(path: Path) -> torch.Tensor:
        return tf.image(read_image(path, det.config.channels))

    def batch_of(paths: list[Path], images: torch.Tensor) -> torch.Tensor | Batch:
        if not with_roi:
            return images
        rois = torch.stack([tf.mask(read_mask(roi_of[p])) for p in paths])
        return Batch(image=images, label=torch.zeros(len(paths), dtype=torch.long), roi=rois)

    # End to end, batch 1: file read + decode + resize + model.
    e2e, model_only, backbone, scoring = [], [], [], []
    for i in range(warmup + repeats):
        t = time.perf_counter()
        path = files[i % len(files)]
        x = batch_of([path], load(path).unsqueeze(0))
        t_loaded = time.perf_counter()
        pred = det.predict(x)
        done = time.perf_counter()
        if i >= warmup:
            e2e.append((done - t) * 1000)
            model_only.append((done - t_loaded) * 1000)
            backbone.append(pred.timings.get("backbone_ms", 0.0))
            scoring.append(pred.timings.get("scoring_ms", 0.0))

    # Batch N: model only and end to end.
    n = min(batch_size, len(files))
    batch_paths = [files[i % len(files)] for i in range(n)]
    stacked = batch_of(batch_paths, torch.stack([load(p) for p in batch_paths]))
    det.predict(stacked)  # warm-up at this batch size
    model_n, e2e_n = [], []
    rounds = max(3, repeats // max(1, n))
    for _ in range(rounds):
        t = time.perf_counter()
        det.predict(stacked)
        model_n.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        det.predict(batch_of(batch_paths, torch.stack([load(p) for p in batch_paths])))
        e2e_n.append((time.perf_counter() - t) * 1000)

    fit_info = {}
    if (run / FIT_INFO_FILE).is_file():
        fit_info = json.loads((run / FIT_INFO_FILE).read_text())
    med_n = statistics.median(model_n)
    runtimes = None
    if onnx:
        from anomalyqc.export.onnx import compare_runtimes, read_export

        int8 = bool((read_export(run).get("int8") or {}).get("kept"))
        runtimes = compare_runtimes(run, stacked if isinstance(stacked, Batch)
                                    else Batch.from_images(stacked), (1, n, 60),
                                    max(5, repeats // 5), int8=int8)
    return {
        "detector": det.name,
        "run": str(run),
        "params": det.config.model_dump(mode="json"),
        "fit": fit_info,
        "latency_batch1_end_to_end": _summary(e2e),
        "latency_batch1_model_only": _summary(model_only),
        "batch1_split_ms": {"backbone": round(statistics.median(backbone), 2),
                            "scoring_and_map": round(statistics.median(scoring), 2)},
        f"latency_batch{n}_model_only": _summary(model_n),
        f"latency_batch{n}_end_to_end": _summary(e2e_n),
        "throughput_images_per_s_model_only": round(n / (med_n / 1000), 2),
        "throughput_images_per_s_end_to_end": round(n / (statistics.median(e2e_n) / 1000), 2),
        "peak_rss_mb_benchmark_process": round(peak_rss_mb(), 1),
        **({"torch_vs_onnxruntime": runtimes} if runtimes else {}),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
