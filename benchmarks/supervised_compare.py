"""The supervised family beside the unsupervised detectors on one labelled library: blob
analysis, the U-Net, PaDiM (and DRAEM, and the classifier when its name is registered),
fitted on the same library, calibrated on separate validation data and put in one table by
`anomalyqc compare` (issue 10).

    # on a labelled MVTec-layout library (train/good, train/<class>/ with
    # ground_truth/<class>/<stem>_mask.png, test/), thresholds from a validation set:
    .venv/bin/python benchmarks/supervised_compare.py --data LIB --val VAL --tag library

    # self-contained on generated vials: `synth vials`, its test defects split in two folds
    # (one becomes train/<class>/, the other stays in test/), a second seed for validation:
    .venv/bin/python benchmarks/supervised_compare.py --from-vials --tag vials

Every job is a CLI command in its own process (fit, calibrate, compare), with the machine's
1-minute load average before and after it. Unsupervised detectors fit on train/good only
(fit reads the other classes only for supervised detectors). Results:
benchmarks/results/supervised_compare_<tag>.json (provenance, settings, jobs, the table).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "anomalyqc.cli"]
JOBS: list[dict[str, Any]] = []
# fit arguments beyond --image-size/--batch-size; {epochs} is filled from --epochs
DETECTORS: dict[str, list[str]] = {
    # chosen on a separately generated vial set (seed 5), not on the compared data
    "blob": ["--set", "background_size=11", "--set", "adaptive=true"],
    # default width (16, depth 4): the small preset did not fit the few vial defects
    "unet": ["--epochs", "{epochs}", "--set", "schedule=cosine", "--set", "loss_curves=false",
             "--batch-size", "4"],
    "padim": [],
    "mhbc": [],
    "draem": ["--epochs", "1000", "--set", "preset=small", "--set", "max_minutes={minutes}",
              "--set", "loss_curves=false"],
    "classifier": ["--epochs", "{epochs}"],
    # the reconstruction family's best on vial patches (results/recon_patches_{a,b}.json):
    # their small settings, trained for a wall-clock budget as in benchmarks/recon_patches.py
    "resganad": ["--epochs", "1000", "--set", "preset=small", "--set", "max_minutes={minutes}",
                 "--set", "loss_curves=false"],
    "grdnet": ["--epochs", "1000", "--set", "preset=small", "--set", "max_minutes={minutes}",
               "--set", "loss_curves=false"],
}


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


def labelled_from_vials(vials: Path, lib: Path) -> dict[str, int]:
    """An MVTec-layout library from a `synth vials` folder: train/good as generated; the
    test defects of each type split in two folds by order, the first to train/<type>/
    (stems prefixed "l", masks beside them in ground_truth/), the second left in test/."""
    shutil.copytree(vials / "train" / "good", lib / "train" / "good")
    shutil.copytree(vials / "test" / "good", lib / "test" / "good")
    counts = {"train_good": len(list((lib / "train" / "good").iterdir())),
              "test_good": len(list((lib / "test" / "good").iterdir()))}
    for folder in sorted((vials / "test").iterdir()):
        if folder.name == "good":
            continue
        images = sorted(folder.iterdir())
        half = (len(images) + 1) // 2
        for i, img in enumerate(images):
            mask = vials / "ground_truth" / folder.name / f"{img.stem}_mask.png"
            stem = f"l{img.stem}" if i < half else img.stem
            split = "train" if i < half else "test"
            (lib / split / folder.name).mkdir(parents=True, exist_ok=True)
            (lib / "ground_truth" / folder.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(img, lib / split / folder.name / f"{stem}{img.suffix}")
            shutil.copy(mask, lib / "ground_truth" / folder.name / f"{stem}_mask.png")
        counts[f"train_{folder.name}"] = half
        counts[f"test_{folder.name}"] = len(images) - half
    return counts


def registered() -> set[str]:
    from anomalyqc.models import REGISTRY

    return set(REGISTRY)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="labelled MVTec-layout library")
    ap.add_argument("--val", type=Path, help="validation data (its test split) for calibrate")
    ap.add_argument("--from-vials", action="store_true",
                    help="generate the library and the validation set with `synth vials`")
    ap.add_argument("--n-train", type=int, default=40, help="--from-vials: good train strips")
    ap.add_argument("--n-test-good", type=int, default=24)
    ap.add_argument("--n-test-defect", type=int, default=96, help="split over types, then folds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", default="128x160")
    ap.add_argument("--epochs", type=int, default=30, help="unet and classifier")
    ap.add_argument("--minutes", type=float, default=4.0,
                    help="training budget of draem, resganad and grdnet (max_minutes)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--detectors", default="blob,unet,padim",
                    help="comma-separated; classifier is skipped unless registered")
    ap.add_argument("--threshold-method", default="youden",
                    help="calibrate's method on --val (f1 on a defect-heavy set flags everything)")
    ap.add_argument("--tag", default="run", help="results file: supervised_compare_<tag>.json")
    ap.add_argument("--keep", type=Path, help="keep the runs and reports in this folder")
    args = ap.parse_args()
    if args.from_vials == (args.data is not None):
        ap.error("give either --data LIB or --from-vials")
    import torch

    from anomalyqc.provenance import provenance

    results: dict[str, Any] = {"provenance": provenance(), "settings": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch_threads": torch.get_num_threads(), "skipped": []}
    with tempfile.TemporaryDirectory(prefix="supervised-compare-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data, val = args.data, args.val
        if args.from_vials:
            vials, data, val = work / "vials", work / "lib", work / "val"
            cli_json("synth_vials", "synth", "vials", "--out", vials, "--seed", args.seed,
                     "--n-train", args.n_train, "--n-test-good", args.n_test_good,
                     "--n-test-defect", args.n_test_defect)
            cli_json("synth_val", "synth", "vials", "--out", val, "--seed", args.seed + 1000,
                     "--n-train", 1, "--n-test-good", args.n_test_good,
                     "--n-test-defect", args.n_test_defect // 2)
            results["data"] = {
                "generator": f"anomalyqc synth vials seed {args.seed}; test defects split in "
                             f"two folds (first half to train/<type>/); validation: seed "
                             f"{args.seed + 1000}",
                "counts": labelled_from_vials(vials, data)}
        runs, fits = [], {}
        available = registered()
        for name in args.detectors.split(","):
            if name not in available:
                results["skipped"].append(f"{name}: not registered in this checkout")
                continue
            run = work / "runs" / name
            extra = [a.format(epochs=args.epochs, half=max(1, args.epochs // 2),
                              minutes=args.minutes)
                     for a in DETECTORS.get(name, [])]
            # a detector's own --batch-size (in DETECTORS) comes last and wins
            fits[name] = cli_json(f"fit_{name}", "fit", name, "--data", data, "--out", run,
                                  "--image-size", args.image_size, "--batch-size",
                                  args.batch_size, "--overwrite", *extra)
            if val is not None:
                cli_json(f"calibrate_{name}", "calibrate", run, "--data", val,
                         "--threshold-method", args.threshold_method)
            runs.append(run)
        table = cli_json("compare", "compare", *runs, "--data", data, "--out", work / "compare")
    results["fit"] = {k: {key: v.get(key) for key in (
        "n_images", "images_per_class", "fit_seconds", "epochs_run", "best_validation_loss",
        "learnt_threshold", "peak_rss_mb")} for k, v in fits.items()}
    results["comparison"] = table
    results["jobs"] = JOBS
    out = HERE / "results" / f"supervised_compare_{args.tag}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    from anomalyqc.evaluation.compare import markdown_table

    print(markdown_table(table["rows"]))
    for note in table["notes"] + results["skipped"]:
        print(f"- {note}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
