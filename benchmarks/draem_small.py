"""DRAEM beside GANomaly at a small size on generated vial patches: seconds per training
epoch, inference latency, and the test metrics after the few epochs run (a timing run, not
a trained-to-convergence comparison).

    .venv/bin/python benchmarks/draem_small.py [--n-train 16 --image-size 64 --epochs 3
                                                --detectors draem,ganomaly]

Every job is a CLI command in its own process (`anomalyqc synth vials --patches`, `fit`,
`evaluate`, `benchmark`), with the machine's 1-minute load average before and after it.
Results: benchmarks/results/draem_small.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "anomalyqc.cli"]
JOBS: list[dict[str, Any]] = []  # every job: wall time and machine load
# the networks' shapes are the detectors' defaults; only the extra parameters are listed
DETECTORS = {"draem": [], "ganomaly": []}


def cli_json(name: str, *args: object) -> dict[str, Any]:
    """Run one CLI command; its stdout ends with one JSON object."""
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True)
    JOBS.append({"job": name, "wall_s": round(time.perf_counter() - started, 2),
                 "load_1m_before": load_before, "load_1m_after": os.getloadavg()[0]})
    if proc.returncode != 0:
        sys.exit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    out = proc.stdout
    return json.loads(out[out.index("{"): out.rindex("}") + 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=16, help="training strips (x20 patches)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--detectors", default="draem,ganomaly", help="comma-separated")
    args = ap.parse_args()
    from anomalyqc.provenance import provenance

    results: dict[str, Any] = {"provenance": provenance(), "torch_threads": None,
                               "settings": vars(args)}
    import torch

    results["torch_threads"] = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="draem-small-") as tmp:
        data = Path(tmp) / "vials"
        made = cli_json("synth", "synth", "vials", "--out", data, "--seed", 0, "--n-train",
                        args.n_train, "--n-test-good", 8, "--n-test-defect", 8, "--patches",
                        # the published figures' set: clean patches of defective strips left out
                        "--drop-clean-patches")
        results["data"] = {"generator": "anomalyqc synth vials --patches --drop-clean-patches, seed 0",
                           "counts": made["counts"]}
        names = args.detectors.split(",")
        for name in names:
            extra = DETECTORS[name]
            run = Path(tmp) / name
            fit = cli_json(f"fit_{name}", "fit", name, "--data", data, "--out", run,
                           "--image-size", args.image_size, "--epochs", args.epochs,
                           "--batch-size", args.batch_size, *extra)
            ev = cli_json(f"evaluate_{name}", "evaluate", run, "--data", data)
            bench = cli_json(f"benchmark_{name}", "benchmark", run, "--data", data,
                             "--batch-size", args.batch_size, "--repeats", 20)
            results[name] = {
                "train_images": fit["n_images"], "epochs": fit["epochs_run"],
                "seconds_per_epoch": fit["seconds_per_epoch"],
                "fit_peak_rss_mb": fit["peak_rss_mb"],
                "best_validation_loss": fit["best_validation_loss"],
                "image_auroc": ev.get("image_auroc"), "pixel_auroc": ev.get("pixel_auroc"),
                "latency_batch1_model_only_ms": bench["latency_batch1_model_only"],
                f"latency_batch{args.batch_size}_model_only_ms":
                    bench[f"latency_batch{args.batch_size}_model_only"],
                "params": json.loads((run / "config.json").read_text())["params"],
            }
    results["jobs"] = JOBS
    out = HERE / "results" / "draem_small.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    for name in names:
        r = results[name]
        print(f"{name}: {r['seconds_per_epoch']} s/epoch on {r['train_images']} images, "
              f"image AUROC {r['image_auroc']}, pixel AUROC {r['pixel_auroc']}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
