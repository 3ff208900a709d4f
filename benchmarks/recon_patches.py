"""Reconstruction against embedding detectors on generated vial-region patches, each trained
detector within the same wall-clock budget.

    .venv/bin/python benchmarks/recon_patches.py [--minutes 6] [--only ganomaly resganad ...]
        [--data DIR] [--set resganad.lr=1e-3 ...] [--name recon_patches]

The patches are the set of the embedding ablation (README): `anomalyqc synth vials
--patches` with seed 2, 60 training strips, 20 good and 40 defective test strips, i.e. the
20 region patches (5 vials x 4 regions, 64x64 gray) of each strip: 1,200 training patches,
400 good and 52 defective test patches. --data takes any other folder.

Every job runs in its own process through the CLI: `anomalyqc fit` (the trained detectors
with `--set max_minutes=M` and more epochs than the budget allows, so the budget is what
ends them), then `anomalyqc evaluate --recalibrate`. Each job records its wall time, its CPU
seconds (user + system of the child) and the 1-minute load average before and after, since
the machine is shared. A detector the CLI does not know (DRAEM and GRD-Net before their
branches are merged) is skipped with a note. Writes benchmarks/results/<name>.json (one run)
and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from anomalyqc.provenance import provenance

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "anomalyqc.cli"]
# --drop-clean-patches: the published figures' set, without the clean patches of defective
# strips that `synth vials --patches` keeps by default (issue 9)
PATCH_SET = ["--seed", "2", "--n-train", "60", "--n-test-good", "20", "--n-test-defect", "40",
             "--patches", "--drop-clean-patches"]
PATCH_SIZE = "64"  # what the generator writes; the trained detectors take it as it is
# The embedding detectors' stride-16 block would leave a 4x4 grid of a 64x64 input: they get
# the patches upsampled to 128x128, as in the embedding ablation.
EMBEDDING_SIZE = "128"
# The trained detectors: the "small" settings of each (see nets.presets.SMALL_INPUT and the
# README section), the same batch and the same budget.
TRAINED: dict[str, list[str]] = {
    "ganomaly": ["--set", "preset=small"],
    "resganad": ["--set", "preset=small"],
    "draem": ["--set", "preset=small"],
    "grdnet": ["--set", "preset=small"],
}
EMBEDDING = ("padim", "mhbc")
BATCH = 16
DEDICATED = ("width", "backbone")  # `fit --width`, not `--set width=`
EPOCHS = 1000  # the budget ends training first


def load() -> float:
    return round(os.getloadavg()[0], 2)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_job(args: list[str], log: Path, threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """One CLI call in its own process: (the last JSON object it printed, its job record)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    before, cpu0, t0 = load(), cpu_seconds(), time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.run(CLI + args, stdout=subprocess.PIPE, stderr=err, text=True,
                              env=env)
    job = {"job": log.stem, "wall_s": round(time.perf_counter() - t0, 2),
           "cpu_s": round(cpu_seconds() - cpu0, 2), "load_1m_before": before,
           "load_1m_after": load()}
    if proc.returncode != 0:
        sys.exit(f"anomalyqc {' '.join(args[:2])} failed (exit {proc.returncode}); see {log}:\n"
                 f"{log.read_text()[-2000:]}")
    out = proc.stdout
    start = out.rfind("\n{") + 1 if "\n{" in out else out.index("{")
    obj, _ = json.JSONDecoder().raw_decode(out[start:])
    return obj, job


def known(detector: str) -> bool:
    from anomalyqc.errors import ConfigError
    from anomalyqc.models.base import detector_class

    try:
        detector_class(detector)
    except (ConfigError, KeyError, ValueError):
        return False
    return True


def patches(work: Path) -> Path:
    out = work / "patches"
    if not (out / "test").is_dir():
        subprocess.run(CLI + ["synth", "vials", "--out", str(out), *PATCH_SET], check=True,
                       stdout=subprocess.DEVNULL)
    return out


def fit_args(name: str, data: Path, run: Path, minutes: float,
             sets: dict[str, list[str]]) -> list[str]:
    extra = []
    for kv in sets.get(name, []):  # keys with an option of their own go through it
        key, _, value = kv.partition("=")
        extra += [f"--{key}", value] if key in DEDICATED else ["--set", kv]
    if name in EMBEDDING:
        return ["fit", name, "--data", str(data), "--out", str(run), "--image-size",
                EMBEDDING_SIZE, "--overwrite", *extra]
    return ["fit", name, "--data", str(data), "--out", str(run), "--image-size", PATCH_SIZE,
            "--batch-size", str(BATCH), "--epochs", str(EPOCHS), "--overwrite", *TRAINED[name],
            "--set", f"max_minutes={minutes}", *extra]


def parse_sets(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, kv = item.partition(".")
        if not sep or "=" not in kv:
            sys.exit(f"--set {item!r}: expected DETECTOR.KEY=VALUE, e.g. resganad.lr=1e-3")
        out.setdefault(name, []).append(kv)
    return out


def row(name: str, r: dict[str, Any]) -> str:
    m, f, job = r["metrics"], r["fit"], r["fit_job"]
    pix = "n/a" if m.get("pixel_auroc") is None else f"{m['pixel_auroc']:.4f}"
    pro = "n/a" if m.get("aupro") is None else f"{m['aupro']:.4f}"
    trained = "epochs_reached" in f
    epochs = f"{f['epochs_reached']:.2f} ({f['steps']})" if trained else "1 pass"
    budget = f"{r['budget_minutes']:g} min" if trained else "none"
    return (f"| {name} | {m['image_auroc']:.4f} | {pix} | {pro} | {budget} | {epochs} | "
            f"{job['wall_s']:.0f} | {job['cpu_s']:.0f} | {job['load_1m_before']:.1f} / "
            f"{job['load_1m_after']:.1f} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, help="dataset folder (default: generate the patches)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/anomalyqc_recon_patches"))
    ap.add_argument("--minutes", type=float, default=6.0,
                    help="wall-clock training budget of each trained detector")
    ap.add_argument("--only", nargs="*", default=[*TRAINED, *EMBEDDING],
                    choices=[*TRAINED, *EMBEDDING])
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="DETECTOR.KEY=VALUE passed to that detector's fit as --set KEY=VALUE")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of each job (OMP_NUM_THREADS); on a loaded machine "
                         "two threads per process spin-wait (see the README)")
    ap.add_argument("--name", default="recon_patches",
                    help="results file RESULTS/NAME.json")
    ap.add_argument("--results", type=Path, default=HERE / "results",
                    help="folder of the results file (default benchmarks/results)")
    args = ap.parse_args(argv)
    started = provenance()  # at the start: the commit the figures come from
    sets = parse_sets(args.sets)
    data = args.data or patches(args.work)
    if not (data / "train" / "good").is_dir():
        sys.exit(f"no dataset at {data}: pass --data a folder with train/good and test/")
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name in args.only:
        if not known(name):
            skipped[name] = "the CLI does not know this detector (its branch is not merged)"
            print(f"{name}: skipped, {skipped[name]}", file=sys.stderr)
            continue
        run = args.work / args.name / name
        cmd = fit_args(name, data, run, args.minutes, sets)
        fit, fit_job = run_job(cmd, args.work / args.name / "logs" / f"fit_{name}.log",
                               args.threads)
        metrics, eval_job = run_job(
            ["evaluate", str(run), "--data", str(data), "--recalibrate", "--report",
             str(args.work / args.name / f"{name}_report" / "metrics.json")],
            args.work / args.name / "logs" / f"evaluate_{name}.log", args.threads)
        results[name] = {"fit_command": ["anomalyqc", *cmd],
                         "budget_minutes": args.minutes if name in TRAINED else None,
                         "fit": fit, "fit_job": fit_job, "metrics": metrics,
                         "evaluate_job": eval_job}
        print(row(name, results[name]), file=sys.stderr)
    out = args.results / f"{args.name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"provenance": started, "data": str(data),
                               "patch_set": None if args.data else PATCH_SET,
                               "budget_minutes": args.minutes, "batch_size": BATCH,
                               "threads": args.threads,
                               "results": results, "skipped": skipped}, indent=2) + "\n")
    print("| detector | image AUROC | pixel AUROC | AUPRO | budget | epochs reached (steps) | "
          "fit wall s | fit CPU s | load 1m before / after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(row(name, r))
    for name, why in skipped.items():
        print(f"{name}: skipped, {why}")


if __name__ == "__main__":
    main()
