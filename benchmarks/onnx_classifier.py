"""The supervised classifier's ONNX export (Grad-CAM's gradient in the graph): parity with
torch on every test image of a generated library, and torch eager vs ONNX Runtime latency.

Data: `anomalyqc synth library` (seed 0, thesis table 7.1: 100 good / 27 glass / 36
particle_cake per split, 128 px). The classifier (EfficientNet-Lite0, ImageNet weights,
Grad-CAM at stride 16) is fine-tuned a few epochs through the CLI; a short training is
enough here, since what is measured is agreement between runtimes, not accuracy
(benchmarks/classifier_library.py measures that). Then:

  - `anomalyqc export RUN --data LIB --int8`: the parity check at export (first 8 test
    images) and whether an int8 model is kept;
  - every test image through both runtimes (batches of 32): largest score, map and
    probability differences, how many maps meet the strict tolerance (atol + rtol x max|map|,
    1e-4 each) and how many predicted classes agree; and torch against itself, the same
    images one at a time, which shows how far float32 rounding alone moves the maps;
  - latency at batch 1 and 60 (anomalyqc.export.onnx.compare_runtimes: calls interleaved,
    same thread count for both runtimes).

    OMP_NUM_THREADS=1 python benchmarks/onnx_classifier.py [--work /tmp/onnx_clf] [--epochs 3]

Writes benchmarks/results/onnx_classifier.json with the load average before and after (the
machine's cores are shared).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from onnx_runtime import _cli, _json  # noqa: E402  (benchmarks/ is the script's folder)

from anomalyqc.export.onnx import ATOL, RTOL, OnnxDetector, check_images, compare_runtimes
from anomalyqc.fileio import atomic_write_json
from anomalyqc.provenance import provenance

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "n/a"


def all_test_images(run: Path, lib: Path) -> dict[str, Any]:
    """Both runtimes on every test image of `lib`."""
    from anomalyqc.models.storage import load_detector
    from anomalyqc.workflow import dataset_for, make_loader

    det, onnx = load_detector(run), OnnxDetector(run, threads=torch.get_num_threads())
    n = strict_maps = same_class = torch_strict = 0
    ds = dm = dp = dt = 0.0
    for b in make_loader(dataset_for(det, lib, "test", masks=False), 32):
        with torch.inference_mode():
            ref, got = det.predict(b.image), onnx.predict(b.image)
            # torch against itself: the same images one at a time (other kernels, other
            # rounding), the yardstick for how much float32 alone moves a Grad-CAM map
            alone = torch.cat([det.predict(b.image[i:i + 1]).anomaly_map for i in range(len(b))])
        per_image = (got.anomaly_map - ref.anomaly_map).flatten(1).abs().amax(1)
        self_diff = (alone - ref.anomaly_map).flatten(1).abs().amax(1)
        strict = ATOL + RTOL * float(ref.anomaly_map.abs().max())
        strict_maps += int((per_image <= strict).sum())
        torch_strict += int((self_diff <= strict).sum())
        dt = max(dt, float(self_diff.max()))
        same_class += int((got.extras["class_index"] == ref.extras["class_index"]).sum())
        ds = max(ds, float((got.score - ref.score).abs().max()))
        dm = max(dm, float(per_image.max()))
        dp = max(dp, float((got.extras["class_probabilities"]
                            - ref.extras["class_probabilities"]).abs().max()))
        n += len(b)
    return {"n_images": n, "max_abs_score_diff": ds, "max_abs_map_diff": dm,
            "max_abs_probability_diff": dp, "maps_within_strict_tolerance": strict_maps,
            "same_predicted_class": same_class,
            "torch_batch1_vs_batch32": {"max_abs_map_diff": dt,
                                        "maps_within_strict_tolerance": torch_strict}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/onnx_clf"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "onnx_classifier.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    started = provenance(repo=REPO)
    load_before = _uptime()
    lib, run = a.work / "lib", a.work / "clf"
    if not lib.exists():
        _cli("synth", "library", "--out", lib, "--seed", 0,
             "--counts", "good=100,glass=27,particle_cake=36")
    t = time.perf_counter()
    _cli("fit", "classifier", "--data", lib, "--out", run, "--overwrite", "--image-size", 128,
         "--epochs", a.epochs, "--batch-size", 16)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    export = _json(_cli("export", run, "--data", lib, "--int8", "--overwrite"))
    export_s = time.perf_counter() - t
    everything = all_test_images(run, lib)
    print(json.dumps(everything))
    from anomalyqc.models.storage import load_detector

    images = check_images(load_detector(run), 8, lib)
    speed = compare_runtimes(run, images, (1, 60), a.repeats,
                             int8=bool((export.get("int8") or {}).get("kept")))
    print(json.dumps(speed["batches"]))
    atomic_write_json(a.out, {
        "what": "the classifier's ONNX export (Grad-CAM gradient traced into the graph): parity "
                "at export and on every test image, torch eager vs ONNX Runtime latency",
        "data": f"synth library seed 0, 100/27/36 per split at 128 px ({lib})",
        "model": f"classifier efficientnet_lite0 (ImageNet), cam_layer stride16, {a.epochs} "
                 f"epochs",
        "threads": a.threads, "repeats": a.repeats,
        "fit_seconds": round(fit_s, 1), "export_command_seconds": round(export_s, 1),
        "export": export, "all_test_images": everything, "speed": speed,
        "load": {"before": load_before, "after": _uptime()},
        "provenance": started,
    })
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
