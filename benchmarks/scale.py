"""Thesis-scale streaming fit: 64x64 vial region patches through PaDiM and MhBC-PatchCore, in
one process and in two (torchrun), at two sizes; patches per second, the backbone's share of
the fit, and the peak RSS of every process, which must stay flat when the patch count grows.

The thesis trained on 2,815,200 patches; the default large size is a tenth of that. Patches
are made on the fly, deterministically from the seed and the batch index: a pool of region
patches cut from rendered vial strips (the synthetic generator's own rendering,
anomalyqc.synth.vials), each streamed patch a pool patch shifted by up to 3 px, with its own
gain, offset and sensor noise. Nothing is written to disk but the results.

    .venv/bin/python benchmarks/scale.py                     # 28,000 and 280,000 patches
    .venv/bin/python benchmarks/scale.py --sizes 28000       # timing run only
    .venv/bin/python benchmarks/scale.py --threads 1         # one torch thread per process

Each configuration runs in its own process (or torchrun group), so peak RSS is its own.
Results: benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PATCH = 64
POOL_STRIPS = 100  # 2,000 region patches
PARAMS: dict[str, dict[str, Any]] = {"padim": {}, "mhbc": {"n_clusters": 16}}


# ------------------------------------------------------------------------------ patches
def patch_pool(seed: int):  # noqa: ANN201 - torch imported lazily
    """(M, 1, 64, 64) float32 good region patches cut from rendered vial strips."""
    import numpy as np
    import torch

    from anomalyqc.synth.vials import VialStripConfig, cut_patches, render_strip

    rng = np.random.default_rng(seed)
    cfg = VialStripConfig()
    pool = [p.image for _ in range(POOL_STRIPS)
            for p in cut_patches(render_strip(rng, cfg), PATCH)]
    return torch.from_numpy(np.stack(pool)).float().div_(255).unsqueeze(1)


class PatchStream:
    """Batches of patches for one rank: batch b goes to rank b % world; b alone fixes them."""

    def __init__(self, pool, n_patches: int, batch_size: int, seed: int, rank: int = 0,  # noqa: ANN001
                 world: int = 1) -> None:
        self.pool, self.n, self.bs, self.seed = pool, n_patches, batch_size, seed
        self.rank, self.world = rank, world
        self.patches = 0
        self.seconds = 0.0  # spent making patches

    def batch(self, b: int):  # noqa: ANN201
        import torch
        import torch.nn.functional as F

        size = min(self.bs, self.n - b * self.bs)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
        idx = torch.randint(len(self.pool), (size,), generator=g)
        shift = torch.randint(-3, 4, (size, 2), generator=g)
        padded = F.pad(self.pool[idx], (3, 3, 3, 3), mode="replicate")[:, 0]  # (B, 70, 70)
        ar = torch.arange(PATCH)
        rows = (ar + 3 + shift[:, :1]).unsqueeze(2)  # (B, 64, 1)
        cols = (ar + 3 + shift[:, 1:]).unsqueeze(1)  # (B, 1, 64)
        x = padded[torch.arange(size)[:, None, None], rows, cols].unsqueeze(1)
        gain = 0.9 + 0.2 * torch.rand(size, 1, 1, 1, generator=g)
        offset = 0.06 * torch.rand(size, 1, 1, 1, generator=g) - 0.03
        noise = 0.01 * torch.randn(x.shape, generator=g)
        return (x * gain + offset + noise).clamp_(0, 1)

    def __iter__(self):  # noqa: ANN204
        from anomalyqc.types import Batch

        n_batches = -(-self.n // self.bs)
        for b in range(self.rank, n_batches, self.world):
            t = time.perf_counter()
            x = self.batch(b)
            self.seconds += time.perf_counter() - t
            self.patches += x.shape[0]
            yield Batch.from_images(x)


# ------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> None:
    """One configuration, in this process (a torchrun worker when WORLD_SIZE > 1)."""
    import torch

    from anomalyqc import distributed
    from anomalyqc.models import detector_class
    from anomalyqc.workflow import peak_rss_mb

    rank, world = distributed.world_from_env()
    owns = distributed.init_from_env()
    pool = patch_pool(args.seed)
    det = detector_class(args.detector)(image_size=PATCH, **PARAMS[args.detector])
    stream = PatchStream(pool, args.patches, args.batch_size, args.seed, rank, world)
    started = time.perf_counter()
    with torch.inference_mode():
        distributed.fit_sharded(det, stream)
    fit_s = time.perf_counter() - started
    row = {
        "fit_seconds": distributed.gather_floats(fit_s),
        "backbone_seconds": distributed.gather_floats(det.fit_timings["backbone_seconds"]),
        "generation_seconds": distributed.gather_floats(stream.seconds),
        "patches": distributed.gather_floats(float(stream.patches)),
        "peak_rss_mb": distributed.gather_floats(peak_rss_mb()),
    }
    if owns:
        distributed.dist.destroy_process_group()
    if rank == 0:
        print("RESULT " + json.dumps(row), flush=True)


# ------------------------------------------------------------------------- orchestrator
def run_config(detector: str, patches: int, nproc: int, args: argparse.Namespace) -> dict:
    me = [str(Path(__file__).resolve()), "--worker", "--detector", detector, "--patches",
          str(patches), "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    env = dict(os.environ)
    cores = os.cpu_count() or 1
    env["OMP_NUM_THREADS"] = str(args.threads or max(1, cores // nproc))
    if nproc == 1:
        cmd = [sys.executable, *me]
    else:
        from anomalyqc.launch import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
               str(nproc), "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *me]
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    wall = time.perf_counter() - t
    row = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    fit = max(row["fit_seconds"])  # the slowest shard ends the fit
    row.update(
        detector=detector, processes=nproc, total_patches=int(sum(row["patches"])),
        threads_per_process=int(env["OMP_NUM_THREADS"]), wall_seconds=round(wall, 1),
        patches_per_second=round(sum(row["patches"]) / fit, 1),
        backbone_share=round(sum(row["backbone_seconds"]) / sum(row["fit_seconds"]), 3),
        generation_share=round(sum(row["generation_seconds"]) / sum(row["fit_seconds"]), 3),
        peak_rss_mb_max=max(row["peak_rss_mb"]),
    )
    return row


def _provenance() -> dict[str, Any]:
    try:
        from anomalyqc.provenance import provenance  # type: ignore[import-not-found]

        return provenance()
    except ImportError:  # the shared helper is not in this checkout: the same essentials
        import platform
        from importlib import metadata

        def git(*a: str) -> str:
            return subprocess.run(["git", *a], cwd=HERE, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL).stdout.strip()

        cpu = next((ln.split(":", 1)[1].strip() for ln in
                    Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), platform.processor())
        return {
            "commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "command": shlex.join([sys.executable, *sys.argv]),
            "python": sys.version.split()[0],
            "packages": {p: metadata.version(p) for p in ("anomalyqc", "torch", "numpy")},
            "machine": {"cpu": cpu, "cores": os.cpu_count(), "system": platform.platform()},
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[28_000, 280_000])
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--detectors", nargs="+", default=list(PARAMS), choices=list(PARAMS))
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per process (default: the cores shared out); on a "
                         "loaded machine 1 avoids OpenMP threads waiting on each other")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "scale.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--detector", default="padim", help=argparse.SUPPRESS)
    ap.add_argument("--patches", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    prov = _provenance()
    rows = []
    for det in args.detectors:
        for nproc in args.nproc:
            for n in args.sizes:
                row = run_config(det, n, nproc, args)
                rows.append(row)
                print(f"{det} x{nproc} {n}: {row['patches_per_second']} patches/s, backbone "
                      f"{row['backbone_share']:.0%}, peak RSS {row['peak_rss_mb']} MB, "
                      f"{row['wall_seconds']} s", file=sys.stderr, flush=True)
    growth = {}
    lo, hi = min(args.sizes), max(args.sizes)
    for det in args.detectors:
        for nproc in args.nproc:
            a = next(r for r in rows if (r["detector"], r["processes"], r["total_patches"])
                     == (det, nproc, lo))
            b = next(r for r in rows if (r["detector"], r["processes"], r["total_patches"])
                     == (det, nproc, hi))
            if lo != hi:  # per process, rank by rank
                growth[f"{det} x{nproc}"] = [round(100 * (y / x - 1), 1) for x, y in
                                             zip(a["peak_rss_mb"], b["peak_rss_mb"], strict=True)]
    result = {"provenance": prov, "patch_size": PATCH, "batch_size": args.batch_size,
              "load_average_at_end": os.getloadavg(),
              "seed": args.seed, "params": {d: PARAMS[d] for d in args.detectors},
              "rows": rows, "peak_rss_growth_percent": growth}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| detector | processes | patches | patches/s | backbone share | peak RSS MB per process |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['detector']} | {r['processes']} | {r['total_patches']:,} | "
              f"{r['patches_per_second']:.0f} | {r['backbone_share']:.0%} | "
              f"{', '.join(f'{v:.0f}' for v in r['peak_rss_mb'])} |")
    for k, v in growth.items():
        print(f"peak RSS growth {lo:,} -> {hi:,} patches, {k}: {v} %")


if __name__ == "__main__":
    main()
