"""Peak RSS of each fit when the training set grows 4x (generated vial strips).

PaDiM and MhBC-PatchCore stream (memory flat in the number of images); PatchCore keeps every
embedding until its coreset is chosen (memory grows). Each fit runs in its own process.

    .venv/bin/python benchmarks/memory_scaling.py [--small 500 --large 2000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from anomalyqc.provenance import provenance

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "anomalyqc.cli"]
# PatchCore with a small coreset: the point is its feature memory, not its coreset time.
EXTRA = {"padim": [], "mhbc": [], "patchcore": ["--set", "coreset_ratio=0.002"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=500)
    ap.add_argument("--large", type=int, default=2000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/anomalyqc_memscale"))
    ap.add_argument("--only", nargs="*", default=list(EXTRA))
    args = ap.parse_args()
    started = provenance()  # at the start: the commit the figures come from
    data = args.work / f"vials_{args.large}"
    if not (data / "meta.json").is_file():
        subprocess.run(CLI + ["synth", "vials", "--out", str(data), "--n-train", str(args.large),
                              "--n-test-good", "4", "--n-test-defect", "4"], check=True,
                       stdout=subprocess.DEVNULL)
    small = args.work / f"vials_{args.small}"
    if not (small / "train" / "good").is_dir():  # the first `small` training images, linked
        (small / "train" / "good").mkdir(parents=True)
        for p in sorted((data / "train" / "good").iterdir())[: args.small]:
            (small / "train" / "good" / p.name).symlink_to(p)
    results = {}
    for name in args.only:
        row = {}
        for n, folder in ((args.small, small), (args.large, data)):
            out = subprocess.run(CLI + ["fit", name, "--data", str(folder), "--out",
                                        str(args.work / f"{name}_{n}"), "--overwrite",
                                        *EXTRA[name]],
                                 check=True, stdout=subprocess.PIPE, text=True).stdout
            info = json.loads(out[out.index("{"):out.rindex("}") + 1])
            row[n] = {"peak_rss_mb": info["peak_rss_mb"], "fit_seconds": info["fit_seconds"]}
        growth = row[args.large]["peak_rss_mb"] / row[args.small]["peak_rss_mb"] - 1
        row["growth_percent"] = round(100 * growth, 1)
        results[name] = row
        print(f"{name}: {row}", file=sys.stderr)
    out = HERE / "results" / "memory_scaling.json"
    out.parent.mkdir(exist_ok=True)
    # One run, one file: rows of different runs are never merged.
    out.write_text(json.dumps({"provenance": started, "small": args.small, "large": args.large,
                               "results": results}, indent=2) + "\n")
    print(f"| detector | peak RSS MB @ {args.small} | peak RSS MB @ {args.large} | growth |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r[args.small]['peak_rss_mb']:.0f} | {r[args.large]['peak_rss_mb']:.0f} "
              f"| {r['growth_percent']:+.1f}% |")


if __name__ == "__main__":
    main()
