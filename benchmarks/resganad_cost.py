"""What meeting 500 ms per 60 patches costs ResGANAD in AUROC: configurations (stem width x
input size) trained on the same generated vial-region patches for the same epochs, then
image and pixel AUROC on the same test patches, in fp32 and with the inference options that
make the small one fit (benchmarks/nets_latency.py picks them), beside each one's latency.

A configuration's run goes to RUNS/resganad_w{width}_s{size}; a complete run already there
is evaluated as it is (so a long training can be run once, or by hand with `anomalyqc fit
resganad --width W --image-size S --epochs E`, and re-scored).

    .venv/bin/python benchmarks/resganad_cost.py --configs 8x64,16x64,32x64 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from anomalyqc.fileio import atomic_write_json
from anomalyqc.models.storage import MANIFEST_FILE, load_detector
from anomalyqc.provenance import provenance
from anomalyqc.workflow import FIT_INFO_FILE, fit_run

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from nets_latency import BATCH, OPTIONS, gflop_per_patch, parse_configs, time_predict  # noqa: E402
from recon_ablations import make_patches, test_metrics  # noqa: E402


def fit_info(run: Path) -> dict[str, Any]:
    path = run / FIT_INFO_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def evaluate_config(run: Path, data: Path, option: str, repeats: int) -> dict[str, Any]:
    """AUROCs and 60-patch predict time of a trained run, in fp32 and under `option`."""
    det = load_detector(run)
    out: dict[str, Any] = {"fp32": test_metrics(det, data)}
    wall, cpu = time_predict(det_with(det, {}), BATCH, repeats)
    out["fp32"].update(batch60_ms=round(1000 * wall, 1), batch60_cpu_ms=round(1000 * cpu, 1))
    fast = det_with(det, OPTIONS[option])
    out[option] = test_metrics(fast, data)
    wall, cpu = time_predict(fast, BATCH, repeats)
    out[option].update(batch60_ms=round(1000 * wall, 1), batch60_cpu_ms=round(1000 * cpu, 1))
    return out


def det_with(det: Any, options: dict[str, Any]) -> Any:
    """The same detector with other inference options (the weights are shared)."""
    base = {"channels_last": False, "fold_batchnorm": False, "inference_dtype": "float32"}
    det.config = det.config.model_copy(update={**base, **options, "predict_batch_size": BATCH})
    return det


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="8x64,16x64", help="WIDTHxSIZE,... to train and score")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--data", type=Path, default=None, help="vial patches; generated if absent")
    ap.add_argument("--runs", type=Path, default=None, help="where the runs go (default: temp)")
    ap.add_argument("--option", default="bf16_cl_fold", help=f"of {', '.join(OPTIONS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "resganad_cost.json")
    args = ap.parse_args(argv)
    if args.option not in OPTIONS:
        raise SystemExit(f"--option must be one of {list(OPTIONS)}")
    configs = parse_configs(args.configs)
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"provenance": provenance(), "threads": args.threads,
                              "epochs": args.epochs, "option": args.option,
                              "load_average_before": [round(v, 2) for v in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="resganad-cost-") as tmp:
        data = args.data or make_patches(Path(tmp) / "patches")
        runs = args.runs or Path(tmp) / "runs"
        result["data"] = str(args.data) if args.data else "generated: synth vials --patches " \
            "--drop-clean-patches --n-train 25 --n-test-good 10 --n-test-defect 60 --seed 0"
        rows = []
        for width, size in configs:
            run = runs / f"resganad_w{width}_s{size}"
            row: dict[str, Any] = {"width": width, "image_size": size,
                                   "gflop_per_patch": round(gflop_per_patch(width, size), 3)}
            if not (run / MANIFEST_FILE).exists():
                load = os.getloadavg()
                t, c = time.perf_counter(), time.process_time()
                fit_run("resganad", data, run, {"width": width, "image_size": size,
                                                "epochs": args.epochs, "seed": 0})
                row.update(trained_here=True, fit_wall_s=round(time.perf_counter() - t, 1),
                           fit_cpu_s=round(time.process_time() - c, 1),
                           fit_load_average_before=[round(v, 2) for v in load],
                           fit_load_average_after=[round(v, 2) for v in os.getloadavg()])
            info = fit_info(run)
            row["fit"] = {k: info.get(k) for k in ("epochs_run", "steps", "fit_seconds",
                                                    "seconds_per_epoch", "n_images")}
            row.update(evaluate_config(run, data, args.option, args.repeats))
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    result["configs"] = rows
    result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    atomic_write_json(args.out, result)
    print(table(rows, args.option))


def table(rows: list[dict], option: str) -> str:
    lines = ["| width | input | GFLOP/patch | epochs | img AUROC fp32 / opt | pix AUROC fp32 / opt "
             f"| ms per 60 fp32 / {option} |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        f, o = r["fp32"], r[option]
        lines.append(f"| {r['width']} | {r['image_size']} | {r['gflop_per_patch']:.2f} | "
                     f"{r['fit'].get('epochs_run')} | {f['image_auroc']:.3f} / {o['image_auroc']:.3f} | "
                     f"{f['pixel_auroc']:.3f} / {o['pixel_auroc']:.3f} | "
                     f"{f['batch60_ms']:.0f} / {o['batch60_ms']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
