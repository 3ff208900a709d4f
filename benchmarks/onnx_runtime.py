"""ONNX export parity and ONNX Runtime against torch eager, per detector, in one run.

For each detector: fit a run through the CLI (`anomalyqc fit`), export it with the parity
check on the data's own test images (`anomalyqc export --data ... --int8`), then time torch
eager and ONNX Runtime (float, and int8 where it was kept) on the same images, call by call
interleaved, at batch 1 and at the line's 60-patch batch (anomalyqc.export.onnx
.compare_runtimes). Two data sets:

- generated vial-region patches (`anomalyqc synth vials --patches`, 64x64 gray, seed 2;
  embedding detectors at 128x128, the trained ones at 64x64 with their small preset and a
  2-minute budget): the inline case, where the 60-patch batch matters;
- MVTec AD bottle from ../shared (skipped when absent): embedding detectors at 256x256 on
  the first 60 training images (parity does not depend on how many were fitted).

    .venv/bin/python benchmarks/onnx_runtime.py [--work /tmp/onnx_bench] [--threads 1]

Writes benchmarks/results/onnx_runtime.json. Both runtimes get the same number of threads.
The machine's 2 cores are shared: the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from anomalyqc.export.onnx import check_images, compare_runtimes
from anomalyqc.fileio import atomic_write_json
from anomalyqc.provenance import provenance

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CLI = [sys.executable, "-m", "anomalyqc.cli"]
BOTTLE = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle"
PATCH_SET = ["--seed", "2", "--n-train", "30", "--n-test-good", "6", "--n-test-defect", "6",
             "--patches"]
TRAINED_SET = ["--set", "preset=small", "--set", "max_minutes=2", "--epochs", "1000"]
VIAL_JOBS: dict[str, list[str]] = {
    "padim": ["--image-size", "128"],
    "mhbc": ["--image-size", "128"],
    "patchcore": ["--image-size", "128"],
    "resganad": ["--image-size", "64", *TRAINED_SET],
    "ganomaly": ["--image-size", "64", *TRAINED_SET],
}
BOTTLE_JOBS: dict[str, list[str]] = {name: ["--image-size", "256"]
                                     for name in ("padim", "mhbc", "patchcore")}


def _cli(*args: object) -> str:
    done = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(map(str, args))} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def _json(out: str) -> dict[str, Any]:
    return json.loads(out[out.index("{"): out.rindex("}") + 1])


def _subset(src: Path, dst: Path, n_train: int) -> Path:
    """MVTec-layout copy by symlinks with the first n_train good training images."""
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "train" / "good").mkdir(parents=True)
    for p in sorted((src / "train" / "good").iterdir())[:n_train]:
        (dst / "train" / "good" / p.name).symlink_to(p)
    for name in ("test", "ground_truth"):
        (dst / name).symlink_to(src / name)
    return dst


def run_job(name: str, args: list[str], data: Path, work: Path, repeats: int) -> dict[str, Any]:
    run = work / name
    t = time.perf_counter()
    _cli("fit", name, "--data", data, "--out", run, "--overwrite", *args)
    fit_s = time.perf_counter() - t
    info = _json(_cli("export", run, "--data", data, "--int8", "--overwrite"))
    from anomalyqc.models.storage import load_detector

    images = check_images(load_detector(run), 8, data)
    speed = compare_runtimes(run, images, (1, 60), repeats,
                             int8=bool((info.get("int8") or {}).get("kept")))
    return {"fit_seconds": round(fit_s, 1), "export": info, "speed": speed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/onnx_bench"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "onnx_runtime.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    started = provenance(repo=REPO)
    load_before = os.getloadavg()[0]
    results: dict[str, Any] = {"vial_patches": {}, "bottle": {}}
    vials = a.work / "vials"
    if not vials.exists():
        _cli("synth", "vials", "--out", vials, *PATCH_SET)
    for name, args in VIAL_JOBS.items():
        if a.only is None or name in a.only:
            results["vial_patches"][name] = run_job(name, args, vials, a.work / "vial_runs",
                                                    a.repeats)
            print(name, "vials", json.dumps(results["vial_patches"][name]["speed"]["batches"]))
    if BOTTLE.is_dir():
        bottle = _subset(BOTTLE, a.work / "bottle60", 60)
        for name, args in BOTTLE_JOBS.items():
            if a.only is None or name in a.only:
                results["bottle"][name] = run_job(name, args, bottle, a.work / "bottle_runs",
                                                  a.repeats)
                print(name, "bottle", json.dumps(results["bottle"][name]["speed"]["batches"]))
    else:
        results["bottle"] = {"skipped": f"{BOTTLE} is absent"}
    atomic_write_json(a.out, {
        "what": "ONNX export parity (at export, on the data's test images) and torch eager vs "
                "ONNX Runtime latency on the same inputs, interleaved",
        "threads": a.threads, "repeats": a.repeats, "results": results,
        "load_average": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "provenance": started,
    })
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
