"""Accuracy, speed and memory of the embedding detectors and their variants, on MVTec AD
bottle by default or on any dataset folder.

Each fit, evaluation and latency benchmark runs in its own process (through the CLI), so
each peak RSS is that job's own. Prints a table and writes benchmarks/results/<name>.json
with the provenance of the run; a results file holds one run, never rows of several.

    .venv/bin/python benchmarks/bottle.py [--only padim mhbc] [--data DIR --image-size 128
        --name patches --no-latency]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from anomalyqc.provenance import provenance

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "mvtec_ad" / "bottle"
CLI = [sys.executable, "-m", "anomalyqc.cli"]
# name in the table -> (detector, extra CLI options)
DETECTORS = {
    "patchcore": ("patchcore", []),
    "patchcore_flat": ("patchcore", ["--set", "index=flat"]),
    "patchcore_hnsw": ("patchcore", ["--set", "index=hnsw"]),
    "patchcore_1pct": ("patchcore", ["--set", "coreset_ratio=0.01"]),
    "patchcore_patch_max": ("patchcore", ["--set", "image_score=patch_max"]),
    "patchcore_reweighted": ("patchcore", ["--set", "image_score=reweighted"]),
    "patchcore_kmeans_1pct": ("patchcore", ["--set", "coreset=kmeans",
                                            "--set", "coreset_ratio=0.01"]),
    "padim": ("padim", []),
    "padim_random100": ("padim", ["--set", "reduction=random", "--set", "reduced_dim=100"]),
    "mhbc": ("mhbc", []),
    "mhbc_k64": ("mhbc", ["--set", "n_clusters=64"]),
    "mhbc_two_pass": ("mhbc", ["--set", "passes=2"]),
    "mhbc_pooled_cov": ("mhbc", ["--set", "covariance=pooled"]),
    "mhbc_global_cov": ("mhbc", ["--set", "covariance=global"]),
    "mhbc_euclidean": ("mhbc", ["--set", "covariance=none"]),
    "mhbc_pca48": ("mhbc", ["--set", "reduction=pca", "--set", "reduced_dim=48"]),
    **{f"{d}_eps{e}": (d, ["--set", f"eps={e}"]) for d in ("padim", "mhbc")
       for e in ("0.01", "0.1", "1", "10", "100")},
}
VARIANTS = ["padim", "padim_random100", "mhbc", "mhbc_two_pass", "mhbc_pooled_cov",
            "mhbc_global_cov", "mhbc_euclidean", "patchcore", "patchcore_patch_max",
            "patchcore_reweighted", "patchcore_1pct", "patchcore_kmeans_1pct"]
# The multi-modal case (README, "Where MhBC-PatchCore's clusters pay off").
MULTIMODAL = ["padim", "mhbc", "mhbc_k64", "mhbc_two_pass", "mhbc_pooled_cov", "mhbc_global_cov",
              "mhbc_euclidean", "patchcore", "patchcore_1pct", "patchcore_kmeans_1pct"]

# The covariance regularisation eps (B.6) against the per-location covariance's noise.
REGULARISATION = [*(f"padim_eps{e}" for e in ("0.01", "0.1", "1", "10", "100")),
                  *(f"mhbc_eps{e}" for e in ("0.01", "1", "10", "100")), "mhbc_euclidean"]


def run_json(args: list[str]) -> dict:
    out = subprocess.run(CLI + args, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out[out.index("{"):out.rindex("}") + 1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=Path("/tmp/anomalyqc_bench"))
    ap.add_argument("--only", nargs="*", default=["patchcore", "padim", "mhbc"],
                    help=f"any of {', '.join(DETECTORS)}; 'variants', 'multimodal' or "
                         "'regularisation' for those tables")
    ap.add_argument("--image-size", default="256")
    ap.add_argument("--name", default="bottle", help="results file benchmarks/results/NAME.json")
    ap.add_argument("--no-latency", action="store_true", help="skip `anomalyqc benchmark`")
    args = ap.parse_args()
    started = provenance()  # at the start: the commit the figures come from
    if not (args.data / "train" / "good").is_dir() and not (args.data / "good").is_dir():
        sys.exit(f"no dataset at {args.data}: pass --data")
    groups = {"variants": VARIANTS, "multimodal": MULTIMODAL, "regularisation": REGULARISATION}
    only = [n for o in args.only for n in groups.get(o, [o])]
    results = {}
    for name in only:
        run = args.work / args.name / name
        t = time.perf_counter()
        detector, extra = DETECTORS[name]
        fit = run_json(["fit", detector, "--data", str(args.data), "--out", str(run),
                        "--image-size", str(args.image_size), "--overwrite", *extra])
        wall = time.perf_counter() - t
        metrics = run_json(["evaluate", str(run), "--data", str(args.data), "--recalibrate",
                            "--report", str(args.work / args.name / f"{name}_report" /
                                            "metrics.json")])
        bench = None if args.no_latency else run_json(["benchmark", str(run), "--data",
                                                       str(args.data)])
        results[name] = {"fit": fit, "fit_process_wall_s": round(wall, 1),
                         "metrics": metrics, "benchmark": bench}
        print(f"{name}: done", file=sys.stderr)
    out = HERE / "results" / f"{args.name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"provenance": started, "data": str(args.data),
                               "image_size": args.image_size, "results": results},
                              indent=2) + "\n")
    print("| detector | image AUROC | pixel AUROC | AUPRO | fit s (backbone s) | "
          "fit peak RSS MB | e2e ms/img b1 (p95) | model-only ms b1 | throughput img/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        m, f, b = r["metrics"], r["fit"], r["benchmark"]
        speed = "n/a | n/a | n/a"
        if b:
            e2e = b["latency_batch1_end_to_end"]
            speed = (f"{e2e['median_ms']:.1f} ({e2e['p95_ms']:.1f}) | "
                     f"{b['latency_batch1_model_only']['median_ms']:.1f} | "
                     f"{b['throughput_images_per_s_end_to_end']:.1f}")
        pix = "n/a" if m.get("pixel_auroc") is None else f"{m['pixel_auroc']:.4f}"
        pro = "n/a" if m.get("aupro") is None else f"{m['aupro']:.4f}"
        print(f"| {name} | {m['image_auroc']:.4f} | {pix} | {pro} | "
              f"{f['fit_seconds']:.1f} ({f.get('backbone_seconds', 0):.1f}) | "
              f"{f['peak_rss_mb']:.0f} | {speed} |")


if __name__ == "__main__":
    main()
