"""Accuracy, speed and memory of the three embedding detectors on MVTec AD bottle.

Each fit, evaluation and latency benchmark runs in its own process (through the CLI), so
each peak RSS is that job's own. Prints a table and writes benchmarks/results/bottle.json.

    .venv/bin/python benchmarks/bottle.py [--data ../shared/data/mvtec_ad/bottle] [--only mhbc]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "mvtec_ad" / "bottle"
CLI = [sys.executable, "-m", "anomalyqc.cli"]
# name in the table -> (detector, extra CLI options)
DETECTORS = {
    "patchcore": ("patchcore", []),
    "patchcore_flat": ("patchcore", ["--set", "index=flat"]),
    "patchcore_hnsw": ("patchcore", ["--set", "index=hnsw"]),
    "patchcore_d128": ("patchcore", ["--set", "coreset_dim=128"]),
    "patchcore_1pct": ("patchcore", ["--set", "coreset_ratio=0.01"]),
    "mhbc_pca48": ("mhbc", ["--set", "reduction=pca", "--set", "reduced_dim=48"]),
    "padim": ("padim", []),
    "mhbc": ("mhbc", []),
}


def run_json(args: list[str]) -> dict:
    out = subprocess.run(CLI + args, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out[out.index("{"):])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=Path("/tmp/anomalyqc_bench"))
    ap.add_argument("--only", nargs="*", default=["patchcore", "padim", "mhbc"],
                    help=f"any of {', '.join(DETECTORS)}")
    ap.add_argument("--image-size", type=int, default=256)
    args = ap.parse_args()
    if not (args.data / "train" / "good").is_dir():
        sys.exit(f"MVTec bottle data not found at {args.data}: pass --data")
    results = {}
    for name in args.only:
        run = args.work / name
        t = time.perf_counter()
        detector, extra = DETECTORS[name]
        fit = run_json(["fit", detector, "--data", str(args.data), "--out", str(run),
                        "--image-size", str(args.image_size), *extra])
        wall = time.perf_counter() - t
        metrics = run_json(["evaluate", str(run), "--data", str(args.data), "--recalibrate",
                            "--report", str(args.work / f"{name}_report" / "metrics.json")])
        bench = run_json(["benchmark", str(run), "--data", str(args.data)])
        results[name] = {"fit": fit, "fit_process_wall_s": round(wall, 1),
                         "metrics": metrics, "benchmark": bench}
        print(f"{name}: done", file=sys.stderr)
    out = HERE / "results" / "bottle.json"
    out.parent.mkdir(exist_ok=True)
    # Replace the rows of this run's detectors only, so that `--only X` keeps the others.
    stored = json.loads(out.read_text()) if out.is_file() else {}
    stored = {k: v for k, v in stored.items() if k in DETECTORS}
    stored.update(results)
    out.write_text(json.dumps(stored, indent=2) + "\n")
    print("| detector | image AUROC | pixel AUROC | AUPRO | fit s (backbone s) | "
          "fit peak RSS MB | e2e ms/img b1 (p95) | model-only ms b1 | throughput img/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        m, f, b = r["metrics"], r["fit"], r["benchmark"]
        e2e = b["latency_batch1_end_to_end"]
        print(f"| {name} | {m['image_auroc']:.4f} | {m['pixel_auroc']:.4f} | {m['aupro']:.4f} | "
              f"{f['fit_seconds']:.1f} ({f.get('backbone_seconds', 0):.1f}) | "
              f"{f['peak_rss_mb']:.0f} | {e2e['median_ms']:.1f} ({e2e['p95_ms']:.1f}) | "
              f"{b['latency_batch1_model_only']['median_ms']:.1f} | "
              f"{b['throughput_images_per_s_end_to_end']:.1f} |")


if __name__ == "__main__":
    main()
