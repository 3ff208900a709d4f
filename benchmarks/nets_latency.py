"""CPU cost of the reconstruction family's building blocks, and the fastest ResGANAD that
meets the thesis's 500 ms for a 60-patch batch (3 frames x 5 vials x 4 regions, eq. 10.1).

- Perlin anomaly synthesis P_q (anomalyqc.synth.perlin): ms per batch of 8 at 256x256.
- ResGANAD inference, timed end to end through `Resganad.predict` (autoencoder, score
  1 - SSIM, min-max heatmap; untrained weights, the cost is the same) on a 60-patch batch,
  over a grid of stem width x input size and the detector's inference options
  (nets.inference): fp32; channels_last; bf16 (autocast of the networks); bf16 +
  channels_last; bf16 + channels_last + BatchNorm folded. Parameters and FLOPs per patch come
  from torch's FlopCounterMode (a multiply-add counts 2).
- `--train-step` (alone): one training step (generator + discriminator, Adam) of the full
  size at batch 1, to show why it cannot be trained on this CPU.

Large configurations take minutes per 60-patch batch on 2 cores: each one is timed on as
many patches as fit in `--max-gflop` (at least one) and the 60-patch figure is that time
scaled by 60 / n (compute-bound, so linear in the batch): those rows are marked extrapolated
(`*` in the table, `"extrapolated": true` in the JSON) and never picked as fitting.

The load average before and after is recorded: other jobs on the 2 cores make wall times
meaningless (and inflate even the CPU time of 2 threads, which spin at each barrier).

    .venv/bin/python benchmarks/nets_latency.py                      # full grid, 2 threads
    .venv/bin/python benchmarks/nets_latency.py --widths 8,16 --sizes 64 --no-perlin
    .venv/bin/python benchmarks/nets_latency.py --threads 1 --by-cpu  # on a loaded machine
    .venv/bin/python benchmarks/nets_latency.py --train-step         # full-size step time
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from anomalyqc.fileio import atomic_write_json
from anomalyqc.models import Resganad
from anomalyqc.nets import count_parameters, flops_per_input, resganad_config
from anomalyqc.nets.coders import Autoencoder
from anomalyqc.provenance import provenance
from anomalyqc.synth.perlin import PerlinSynthesizer

HERE = Path(__file__).resolve().parent
BATCH = 60  # thesis eq. 10.1
BUDGET_MS = 500.0  # thesis 10.5: the slot between two acquisitions
WIDTHS = (4, 8, 16, 32, 64)  # stem filters; 64 is the thesis's
SIZES = (64, 128, 256)  # input side; 256 is the thesis's
# name -> Resganad inference options (ReconstructionConfig fields)
OPTIONS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "channels_last": {"channels_last": True},
    "bf16": {"inference_dtype": "bfloat16"},
    "bf16_cl": {"inference_dtype": "bfloat16", "channels_last": True},
    "bf16_cl_fold": {"inference_dtype": "bfloat16", "channels_last": True,
                     "fold_batchnorm": True},
}


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


def detector(width: int, size: int, options: dict[str, Any]) -> Resganad:
    """A ResGANAD ready to predict (fresh weights: the cost does not depend on them)."""
    det = Resganad(width=width, image_size=size, channels=1, predict_batch_size=BATCH, **options)
    det._build()
    det.fitted = True
    return det


def gflop_per_patch(width: int, size: int) -> float:
    with torch.device("meta"):
        return flops_per_input(Autoencoder(resganad_config(width=width, image_size=size)),
                               torch.empty(1, 1, size, size)) / 1e9


def time_predict(det: Resganad, patches: int, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of predict on `patches` patches (after a warm-up)."""
    x = torch.rand(patches, 1, *det.input_size, generator=torch.Generator().manual_seed(0))
    det._inference_nets()  # the copy the options make is built once, outside the timing
    if patches > 1:  # warm-up: oneDNN picks its kernels (noise next to a 1-patch run)
        det.predict(x[:1])
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        det.predict(x)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def resganad_rows(width: int, size: int, options: list[str], max_gflop: float,
                  repeats: int) -> list[dict]:
    gflop = gflop_per_patch(width, size)
    patches = max(1, min(BATCH, int(max_gflop // gflop)))
    reps = repeats if patches == BATCH else 1
    rows = []
    for name in options:
        det = detector(width, size, OPTIONS[name])
        wall, cpu = time_predict(det, patches, reps)
        rows.append({
            "width": width, "image_size": size, "option": name, **OPTIONS[name],
            "feature_shape": list(det.net_config().feature_shape),
            "params_m": round(count_parameters(det.nets["generator"].autoencoder) / 1e6, 2),
            "gflop_per_patch": round(gflop, 3), "patches_timed": patches, "repeats": reps,
            "batch60_ms": round(1000 * wall * BATCH / patches, 1),
            "ms_per_patch": round(1000 * wall / patches, 2), "extrapolated": patches != BATCH,
            # CPU seconds of all threads: less sensitive to other jobs than the wall time
            "batch60_cpu_ms": round(1000 * cpu * BATCH / patches, 1),
        })
        print(f"  width {width:>2} {size}x{size} {name:<13} {rows[-1]['batch60_ms']:>10.1f} ms"
              f"{' *' if patches != BATCH else ''}", file=sys.stderr, flush=True)
        del det
    return rows


def pick(rows: list[dict], budget_ms: float = BUDGET_MS, key: str = "batch60_ms") -> dict | None:
    """The fastest of the configurations that fit the budget with (within 10%) the most
    compute per patch: the most capacity for the time, and of equals (width 16 at 64x64 and
    width 8 at 128x128 cost the same FLOPs) the quickest. Only whole 60-patch batches count.
    `key` batch60_cpu_ms judges by CPU time: on a loaded machine with 1 thread, the closer
    guess of what a quiet core takes."""
    fits = [r for r in rows if not r["extrapolated"] and r[key] <= budget_ms]
    if not fits:
        return None
    most = max(r["gflop_per_patch"] for r in fits)
    return min((r for r in fits if r["gflop_per_patch"] >= 0.9 * most), key=lambda r: r[key])


def full_size_train_step(batch: int = 1) -> dict[str, Any]:
    """Seconds of one ResGANAD training step (generator and discriminator forward,
    backward and Adam step) at the thesis's size, and the peak memory it took."""
    from anomalyqc.training.interface import StepContext
    from anomalyqc.types import Batch

    det = Resganad(channels=1)  # the defaults are the thesis's full size
    det._build()
    nets = det.nets
    opts = {n: torch.optim.Adam(m.parameters(), lr=det.config.lr) for n, m in nets.items()}

    def step(name: str, loss: torch.Tensor, retain_graph: bool) -> None:
        for o in opts.values():
            o.zero_grad(set_to_none=True)
        loss.backward(retain_graph=retain_graph)
        opts[name].step()

    for m in nets.values():
        m.train()
    x = torch.rand(batch, 1, 256, 256)
    ctx = StepContext(nets=nets, epoch=0, global_step=0,
                      generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
                      _step_fn=step)
    t, c = time.perf_counter(), time.process_time()
    det.training_step(Batch(image=x, label=torch.zeros(batch, dtype=torch.long)), ctx)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return {"batch": batch, "step_s": round(wall, 1), "step_cpu_s": round(cpu, 1),
            "generator_params_m": round(count_parameters(nets["generator"]) / 1e6, 1),
            "discriminator_params_m": round(count_parameters(nets["discriminator"]) / 1e6, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "note": "one step; an epoch of N patches at batch 8 takes about N * step_s / batch"}


def table(rows: list[dict], chosen: dict | None) -> str:
    lines = ["| width | input | GFLOP/patch | params M | option | ms per 60 | CPU ms per 60 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " *" if r["extrapolated"] else ""
        best = " <-" if r is chosen else ""
        lines.append(f"| {r['width']} | {r['image_size']} | {r['gflop_per_patch']:.2f} | "
                     f"{r['params_m']:.1f} | {r['option']} | {r['batch60_ms']:.0f}{mark}{best} | "
                     f"{r['batch60_cpu_ms']:.0f} |")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_configs(text: str) -> list[tuple[int, int]]:
    """"8x64,16x64" -> [(8, 64), (16, 64)] (stem width x input side)."""
    out = []
    for item in text.split(","):
        try:
            w, s = item.strip().lower().split("x")
            out.append((int(w), int(s)))
        except ValueError:
            raise SystemExit(f"{item!r} is not WIDTHxSIZE, e.g. 16x64") from None
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="ResGANAD latency on this CPU (see the docstring)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--configs", default=None,
                    help="WIDTHxSIZE,... instead of the --widths x --sizes grid")
    ap.add_argument("--options", default=",".join(OPTIONS), help=f"of {', '.join(OPTIONS)}")
    ap.add_argument("--max-gflop", type=float, default=100.0,
                    help="largest batch timed, in GFLOP; larger configs are extrapolated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-perlin", action="store_true")
    ap.add_argument("--by-cpu", action="store_true",
                    help="pick by CPU time, not wall time (a loaded machine, --threads 1)")
    ap.add_argument("--train-step", action="store_true",
                    help="only time one full-size training step (minutes; weights, gradients "
                         "and Adam moments alone take 4.8 GB) into "
                         "results/resganad_train_step.json")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    options = [o.strip() for o in args.options.split(",") if o.strip()]
    if bad := [o for o in options if o not in OPTIONS]:
        raise SystemExit(f"unknown option(s) {bad}; choose from {list(OPTIONS)}")
    torch.set_num_threads(args.threads)
    if args.train_step:
        load = [round(v, 2) for v in os.getloadavg()]
        step = full_size_train_step()
        out = args.out or HERE / "results" / "resganad_train_step.json"
        atomic_write_json(out, {"provenance": provenance(), "threads": args.threads,
                                "load_average_before": load, "full_size_train_step": step,
                                "load_average_after": [round(v, 2) for v in os.getloadavg()]})
        print(f"full-size ResGANAD training step at batch {step['batch']}: {step['step_s']} s "
              f"({step['step_cpu_s']} CPU s), peak RSS {step['peak_rss_mb']} MB; load {load}")
        return
    out = args.out or HERE / "results" / f"nets_latency_t{args.threads}.json"
    # Other jobs share these cores: the load average says how quiet the run was.
    result: dict[str, Any] = {"provenance": provenance(), "threads": args.threads,
                              "budget_ms": BUDGET_MS, "batch": BATCH,
                              "cpu_bf16": "avx512_bf16" in Path("/proc/cpuinfo").read_text()
                              if Path("/proc/cpuinfo").exists() else None,
                              "load_average_before": [round(v, 2) for v in os.getloadavg()]}
    if not args.no_perlin:
        result["perlin_batch8_256"] = perlin_cost(20)
        print(f"perlin: {result['perlin_batch8_256']}", file=sys.stderr)
    rows: list[dict] = []
    grid = (parse_configs(args.configs) if args.configs else
            [(w, s) for s in _ints(args.sizes) for w in _ints(args.widths)])
    for width, size in grid:
        rows += resganad_rows(width, size, options, args.max_gflop, args.repeats)
    key = "batch60_cpu_ms" if args.by_cpu else "batch60_ms"
    chosen = pick(rows, key=key)
    result["resganad_batch60"] = rows
    result["fastest_fit"] = chosen
    result["picked_by"] = key
    result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    atomic_write_json(out, result)
    print(table(rows, chosen))
    if chosen:
        print(f"within {BUDGET_MS:.0f} ms for {BATCH} patches with the most compute: width "
              f"{chosen['width']} at {chosen['image_size']}x{chosen['image_size']}, "
              f"{chosen['option']}, {chosen[key]:.0f} ms ({key})")
    else:
        print(f"no configuration timed met {BUDGET_MS:.0f} ms for {BATCH} patches")
    print(f"load average before {result['load_average_before']}, after "
          f"{result['load_average_after']}; results in {out}")


if __name__ == "__main__":
    main()
