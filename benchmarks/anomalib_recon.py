"""The reconstruction half of benchmarks/anomalib_reference.py (`--recon`): anomalib 2.7's
DRAEM and GANomaly against ours on MVTec AD bottle at 256x256, batch 8, one epoch.

    .venv/bin/python benchmarks/anomalib_reference.py --recon                   # full epochs
    .venv/bin/python benchmarks/anomalib_reference.py --recon --steps draem=3   # DRAEM: 3 steps
    .venv/bin/python benchmarks/anomalib_reference.py --recon ganomaly --steps 5

Each side trains one epoch of the 209 training images (anomalib trains on all of them and
validates on the test set; ours gets val_fraction=0 so its epoch is the same 27 steps) in its
own process, then a third process times batch-1 inference as the PaDiM rows do (model only,
and end to end from the PNG file). The epoch figure is the training steps only (data loading
included, validation and setup excluded), from each step's end time: anomalib's from a
Lightning callback, ours from the trainer's log.csv (log_every=1). With `--steps N` a model
trains only a warm-up step and N timed steps, and its epoch is extrapolated as
warm-up + (steps per epoch - 1) x mean timed step; the table and JSON say which rows are
extrapolated. The same figure is also taken in process CPU seconds (all threads): when
other jobs share the 2 cores, wall time stretches with the load while CPU time barely moves,
so the CPU column compares the two sides even when the load changed between their jobs.
Peak RSS is each process's own (a cut-short fit never reaches the epoch's end,
so its peak leaves out anything the rest of the epoch would add: the JSON says so).

Network sizes: anomalib's defaults on its side (GANomaly: DCGAN coders of 64 features down
to 4x4, latent 100; DRAEM: reconstructive base width 128, discriminative 64). Ours is set to
the same depth, widths and latent size as far as our config can express it (MATCHED; our
blocks are pre-activation residual 3x3 convs, not DCGAN's 4x4 ones), and with
`--ours-defaults` also at our default sizes; the table states the parameter counts of
both. A detector our CLI does not have yet is skipped with a note.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

MODELS = ("ganomaly", "draem")
BATCH = 8
IMAGE_SIZE = 256
# Our parameters that give anomalib's default network shape (see the module docstring).
MATCHED: dict[str, dict[str, Any]] = {
    # DCGAN's pyramid: a 4x4 stride-2 first conv to 64 maps at 128x128, then five halvings
    # to 2048 x 4x4 (widths 128..2048), dense latent of 100; the decoder mirrors it
    "ganomaly": {"width": 64, "stem": "strided", "stages": 5, "blocks": 1, "convs": 1,
                 "bottleneck": "dense", "latent_dim": 100},
    # DRAEM's reconstructive net: two 3x3 convs per level, widths to 1024 at 16x16 after
    # four halvings (ours: 64-wide stem, stages of two 2-conv blocks, 66 M parameters
    # against 69 M); its discriminative U-Net: base 64, five poolings, capped at 512
    "draem": {"width": 64, "stages": 4, "blocks": 2, "convs": 2, "unet_width": 64,
              "unet_depth": 5, "unet_max_width": 512},
}

RunJson = Callable[[list[str], Path], tuple[dict[str, Any], float]]


# ------------------------------------------------------------------------- arguments
def parse_steps(items: Sequence[str] | None, models: Sequence[str]) -> dict[str, int | None]:
    """`--steps` items to {model: N timed steps, or None for the full epoch}.

    "N" applies to every model; "MODEL=N" to that one (the others train the full epoch);
    N = 0 means the full epoch.
    """
    out: dict[str, int | None] = dict.fromkeys(models)
    for item in items or []:
        name, sep, value = item.rpartition("=")
        targets = [name] if sep else list(models)
        if sep and name not in models:
            raise SystemExit(f"--steps {item}: {name!r} is not among the models run "
                             f"({', '.join(models)})")
        try:
            n = int(value)
        except ValueError:
            raise SystemExit(f"--steps {item}: expected N or MODEL=N with N a whole number")
        if n < 0:
            raise SystemExit(f"--steps {item}: N must be 0 (the full epoch) or more")
        for t in targets:
            out[t] = n or None
    return out


# ------------------------------------------------------------------------- timing
def epoch_estimate(step_ends: Sequence[float], steps_per_epoch: int,
                   steps: int | None) -> dict[str, Any]:
    """Training seconds of one epoch from each step's end time (seconds since the epoch's
    start): measured when the whole epoch ran, else warm-up + (steps_per_epoch - 1) x the
    mean of the N steps timed after the warm-up step."""
    ends = list(step_ends)
    if steps is None:
        if len(ends) != steps_per_epoch:
            raise SystemExit(f"a full epoch is {steps_per_epoch} steps; {len(ends)} were timed")
        return {"epoch_train_s": round(ends[-1], 3), "extrapolated": False,
                "seconds_per_step": round(ends[-1] / steps_per_epoch, 3),
                "warmup_step_s": round(ends[0], 3), "steps_timed": steps_per_epoch,
                "steps_per_epoch": steps_per_epoch}
    if len(ends) != steps + 1:
        raise SystemExit(f"--steps {steps} needs a warm-up step and {steps} timed steps; "
                         f"{len(ends)} were timed")
    per_step = (ends[-1] - ends[0]) / steps
    return {"epoch_train_s": round(ends[0] + per_step * (steps_per_epoch - 1), 3),
            "extrapolated": True, "seconds_per_step": round(per_step, 3),
            "warmup_step_s": round(ends[0], 3), "steps_timed": steps,
            "steps_per_epoch": steps_per_epoch}


def step_ends_from_log(rows: Sequence[dict[str, str]], clock: str = "seconds") -> list[float]:
    """Each training step's end (seconds since training started, wall or `cpu_seconds`) from
    our log.csv rows, written with log_every=1; a gap in the steps would leave steps untimed."""
    train = [r for r in rows if r.get("phase") == "train"]
    steps = [int(r["step"]) for r in train]
    if steps != list(range(1, len(steps) + 1)):
        raise SystemExit(f"log.csv has training rows for steps {steps[:5]}...: expected one per "
                         f"step from 1 (log_every=1)")
    return [float(r[clock]) for r in train]


# ------------------------------------------------------------------------- ours
def our_detectors() -> set[str]:
    import anomalyqc.models  # noqa: F401  (registers every detector)
    from anomalyqc.models.base import REGISTRY

    return set(REGISTRY)


def our_parameter_counts(run: Path) -> dict[str, int]:
    from anomalyqc.models.storage import load_detector
    from anomalyqc.nets.profile import count_parameters

    det = load_detector(run)
    parts = {name: count_parameters(net) for name, net in det.nets.items()}
    return {**parts, "total": sum(parts.values())}


def our_fit_command(cli: list[str], name: str, data: Path, run: Path, steps: int | None,
                    sets: dict[str, Any]) -> list[str]:
    """`anomalyqc fit` at 256x256, batch 8, one epoch of every training image, each step
    logged; with `steps`, a warm-up step and `steps` timed ones (TrainConfig.max_steps)."""
    cmd = cli + ["fit", name, "--data", str(data), "--out", str(run), "--image-size",
                 str(IMAGE_SIZE), "--batch-size", str(BATCH), "--epochs", "1", "--overwrite"]
    every = {"val_fraction": 0, "log_every": 1, **sets}
    if "width" in every:  # the CLI takes it as --width only
        cmd += ["--width", str(every.pop("width"))]
    if steps:
        every["max_steps"] = steps + 1
    for k, v in every.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd


def run_ours(name: str, variant: str, sets: dict[str, Any], data: Path, work: Path,
             steps: int | None, repeats: int, cli: list[str], run_json: RunJson,
             ) -> dict[str, Any]:
    from anomalyqc.training.log import read_log

    run = work / "ours" / variant
    logs = work / "logs"
    fit, wall = run_json(our_fit_command(cli, name, data, run, steps, sets),
                         logs / f"ours_{variant}_fit.log")
    rows = read_log(run / "training" / "log.csv")
    ends = step_ends_from_log(rows)
    cpu_ends = step_ends_from_log(rows, "cpu_seconds")
    bench, _ = run_json(cli + ["benchmark", str(run), "--data", str(data), "--repeats",
                               str(repeats)], logs / f"ours_{variant}_benchmark.log")
    return {"detector": name, "sets": sets, "fit": fit, "fit_process_wall_s": wall,
            "step_end_seconds": ends,
            "step_end_cpu_seconds": cpu_ends,
            "epoch": epoch_estimate(ends, fit["steps_per_epoch"], steps),
            "epoch_cpu": epoch_estimate(cpu_ends, fit["steps_per_epoch"], steps),
            "parameters": our_parameter_counts(run),
            "latency": {k: bench[k] for k in ("latency_batch1_end_to_end",
                                              "latency_batch1_model_only")},
            "inference_peak_rss_mb": bench["peak_rss_mb_benchmark_process"],
            "benchmark": bench}


# ------------------------------------------------------------------------- anomalib
def run_anomalib(model: str, python: Path, worker: Path, data: Path, work: Path,
                 steps: int | None, repeats: int, workers: int, seed: int,
                 run_json: RunJson) -> dict[str, Any]:
    run = work / "anomalib" / model
    shutil.rmtree(run, ignore_errors=True)  # a stale checkpoint must not be timed
    logs = work / "logs"
    common = ["--model", model, "--data", str(data), "--run", str(run), "--workers",
              str(workers), "--seed", str(seed), "--batch-size", str(BATCH), "--dtd-dir",
              str(work / "dtd_empty")]
    cmd = [str(python), str(worker)]
    fit, wall = run_json(cmd + ["fit", *common, "--max-steps", str(steps + 1 if steps else 0)],
                         logs / f"anomalib_{model}_fit.log")
    latency, _ = run_json(cmd + ["latency", *common, "--repeats", str(repeats)],
                          logs / f"anomalib_{model}_latency.log")
    per_epoch = math.ceil(fit["n_train"] / BATCH)
    return {"fit": fit, "fit_process_wall_s": wall,
            "epoch": epoch_estimate(fit["step_end_seconds"], per_epoch, steps),
            "epoch_cpu": epoch_estimate(fit["step_end_cpu_seconds"], per_epoch, steps),
            "parameters": fit["parameters"],
            "latency": {k: latency[k] for k in ("latency_batch1_end_to_end",
                                                "latency_batch1_model_only")},
            "inference_peak_rss_mb": latency["peak_rss_mb"]}


# ------------------------------------------------------------------------- table
def figures(row: dict[str, Any]) -> dict[str, Any]:
    return {"epoch_s": row["epoch"]["epoch_train_s"],
            "epoch_cpu_s": row["epoch_cpu"]["epoch_train_s"],
            "extrapolated": row["epoch"]["extrapolated"],
            "fit_rss": row["fit"]["peak_rss_mb"],
            "model_ms": row["latency"]["latency_batch1_model_only"]["median_ms"],
            "e2e_ms": row["latency"]["latency_batch1_end_to_end"]["median_ms"],
            "infer_rss": row["inference_peak_rss_mb"]}


def ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float]:
    """ours / anomalib: below 1 means ours takes less time or memory."""
    a, b = figures(ours), figures(theirs)
    return {k: round(a[k] / b[k], 3) for k in ("epoch_s", "epoch_cpu_s", "model_ms", "e2e_ms",
                                                "fit_rss", "infer_rss")}


def _params(p: dict[str, int]) -> str:
    parts = [f"{k} {v / 1e6:.1f}M" for k, v in p.items() if k != "total"]
    return f"{p['total'] / 1e6:.1f}M ({', '.join(parts)})"


def table(result: dict[str, Any]) -> str:
    lines = ["| detector | parameters | epoch s (training, steps) | s/step | epoch CPU s "
             "| fit peak RSS MB | ms/img b1 model | ms/img b1 e2e | inference peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]

    def row(label: str, r: dict[str, Any]) -> str:
        f, e = figures(r), r["epoch"]
        how = (f"extrapolated from {e['steps_timed']} steps" if f["extrapolated"]
               else "measured")
        rss = f"{f['fit_rss']:.0f}" + (" (cut short)" if f["extrapolated"] else "")
        return (f"| {label} | {_params(r['parameters'])} | {f['epoch_s']:.1f} ({how}, "
                f"{e['steps_per_epoch']} steps) | {e['seconds_per_step']:.2f} | "
                f"{f['epoch_cpu_s']:.1f} | {rss} | "
                f"{f['model_ms']:.1f} | {f['e2e_ms']:.1f} | {f['infer_rss']:.0f} |")

    for model, r in result["anomalib"].items():
        lines.append(row(f"anomalib {model}", r))
    for variant, r in result["ours"].items():
        lines.append(row(f"ours {variant}", r))
    if result["ratios"]:
        lines += ["", "| ours / anomalib | epoch | epoch CPU | ms/img model | ms/img e2e "
                  "| fit peak RSS | inference peak RSS |", "|---|---|---|---|---|---|---|"]
        for variant, q in result["ratios"].items():
            ref = result["ours"][variant]["detector"]
            lines.append(f"| {variant} vs anomalib {ref} | {q['epoch_s']:.2f}x | "
                         f"{q['epoch_cpu_s']:.2f}x | "
                         f"{q['model_ms']:.2f}x | {q['e2e_ms']:.2f}x | {q['fit_rss']:.2f}x | "
                         f"{q['infer_rss']:.2f}x |")
    for note in result.get("skipped", []):
        lines.append(f"\n{note}")
    return "\n".join(lines)


def variants(models: Sequence[str], with_defaults: bool) -> list[tuple[str, str, dict]]:
    """(detector, row name, --set parameters) of our rows: anomalib-sized where MATCHED
    has the detector, our defaults otherwise (and beside it with `with_defaults`)."""
    out = []
    for m in models:
        if m in MATCHED:
            out.append((m, f"{m}-anomalib-sized", MATCHED[m]))
            if with_defaults:
                out.append((m, f"{m}-defaults", {}))
        else:
            out.append((m, f"{m}-defaults", {}))
    return out
