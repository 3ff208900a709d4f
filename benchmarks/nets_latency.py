"""CPU cost of the reconstruction family's building blocks (no detector, no training).

- Perlin anomaly synthesis P_q (anomalyqc.synth.perlin): ms per batch of 8 at 256x256.
- ResGANAD's inference path (the autoencoder X -> X_hat of anomalyqc.nets.resganad_config)
  on the thesis's 60-patch batch (3 frames x 5 vials x 4 regions, eq. 10.1): parameters,
  FLOPs per patch (torch's FlopCounterMode) and wall time of one forward pass, for the full
  size and smaller widths/input sizes.

Large configurations take minutes per 60-patch batch on 2 cores: each one is timed on as
many patches as fit in `--max-gflop` (at least one) and the 60-patch figure is that time
scaled by 60 / n (the forward pass is compute-bound, so time is linear in the batch); the JSON
marks such rows `"extrapolated": true`. --max-gflop 1e9 times every batch whole.

The VM's 2 cores are shared with other jobs. Wall times then mean little, and with 2 threads
even CPU time swells (OpenMP threads spin at each barrier while the other is descheduled).
With `--threads 1` the CPU-time columns stay close to what a quiet core takes, and a quiet
2-core wall time lies between half of them (perfect scaling) and all of them.

    .venv/bin/python benchmarks/nets_latency.py [--threads 2] [--max-gflop 600]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from anomalyqc.nets import count_parameters, flops_per_input, resganad_config
from anomalyqc.nets.coders import Autoencoder
from anomalyqc.provenance import provenance
from anomalyqc.synth.perlin import PerlinSynthesizer

HERE = Path(__file__).resolve().parent
BATCH = 60  # thesis eq. 10.1
# (stem width, input size): the thesis's full size first, then smaller ones.
CONFIGS = [(64, 256), (32, 256), (16, 256), (16, 128), (8, 128), (8, 64)]


def perlin_cost(repeats: int) -> dict[str, float]:
    out = {}
    for channels in (1, 3):
        for source in ("uniform", "texture"):
            synth = PerlinSynthesizer(source=source)
            x = torch.rand(8, channels, 256, 256)
            gen = torch.Generator().manual_seed(0)
            for _ in range(3):
                synth(x, generator=gen)
            times, cpu = [], []
            for _ in range(repeats):
                t, c = time.perf_counter(), time.process_time()
                synth(x, generator=gen)
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            out[f"{source}_c{channels}_ms"] = round(1000 * statistics.median(times), 2)
            out[f"{source}_c{channels}_cpu_ms"] = round(1000 * statistics.median(cpu), 2)
    return out


def resganad_row(width: int, size: int, max_gflop: float, repeats: int, channels_last: bool) -> dict:
    cfg = resganad_config(width=width, image_size=size)
    with torch.device("meta"):
        flops = flops_per_input(Autoencoder(cfg), torch.empty(1, 1, size, size))
    patches = max(1, min(BATCH, int(max_gflop * 1e9 // flops)))
    repeats = repeats if patches == BATCH else 1
    net = Autoencoder(cfg).eval()
    x = torch.rand(patches, 1, size, size)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    times, cpu = [], []
    with torch.inference_mode():
        if patches > 1:  # warm-up: oneDNN picks its kernels (noise next to a 1-patch run)
            net(x[:1])
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            net(x)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    seconds = statistics.median(times)
    return {
        "width": width, "image_size": size, "feature_shape": list(cfg.feature_shape),
        "params_m": round(count_parameters(net) / 1e6, 2), "gflop_per_patch": round(flops / 1e9, 2),
        "patches_timed": patches, "repeats": repeats, "channels_last": channels_last,
        "batch60_ms": round(1000 * seconds * BATCH / patches, 1),
        "ms_per_patch": round(1000 * seconds / patches, 2), "extrapolated": patches != BATCH,
        # CPU seconds used by all threads: less sensitive to other jobs than the wall time.
        "batch60_cpu_s": round(statistics.median(cpu) * BATCH / patches, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-gflop", type=float, default=600.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or HERE / "results" / f"nets_latency_t{args.threads}.json"
    started = provenance()
    torch.set_num_threads(args.threads)
    # Other jobs share these cores: the load average says how quiet the run was.
    result: dict = {"provenance": started, "threads": args.threads,
                    "load_average_before": [round(v, 2) for v in os.getloadavg()],
                    "perlin_batch8_256": perlin_cost(20)}
    print(f"perlin: {result['perlin_batch8_256']}", file=sys.stderr)
    rows = []
    for width, size in CONFIGS:
        row = resganad_row(width, size, args.max_gflop, args.repeats, args.channels_last)
        print(row, file=sys.stderr)
        rows.append(row)
    result["resganad_batch60"] = rows
    result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")  # one run, one file


if __name__ == "__main__":
    main()
