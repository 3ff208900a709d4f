"""GRD-Net's ROI experiment (thesis 8.2.2.4.1, fig. 8.7) and the loss ablation of 9.1.3.2.

One generated zipper dataset (anomalyqc.synth.zipper: the ROI is the zipper band; test
images hold a defect in the zipper, in the fabric only, or one of each) and the four
discriminative losses trained on it with the same seed, data order and budget:

    .venv/bin/python benchmarks/grdnet_roi.py                 # 32x32, 300 steps per case
    .venv/bin/python benchmarks/grdnet_roi.py --size 64 --epochs 50

Per case: image AUROC of the inside defects (zipper or zipper+fabric images against good
and fabric-only ones: the product's view, where a fabric defect is out of scope), the same
against plain good images only, false alarms on fabric-only images at the F1 threshold
chosen between plain good and inside-defect images (beside the plain good images' rate at
that threshold), the AUROC of fabric-only against plain good images (0.5: unseen), pixel
AUROC over the ROI's pixels, and the inside AUROC the U-Net's unmasked output would give
(the whole-image score: what the ROI removes). Writes benchmarks/results/grdnet_roi.json
with provenance and the machine's load around each training.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CASES = ("case1", "case2", "case3", "case4")


def measure(det: Any, data: Path) -> dict[str, Any]:
    """Scores, whole-image scores, maps, masks and ROIs of the test split."""
    import torch

    from anomalyqc.data import make_loader
    from anomalyqc.workflow import dataset_for

    ds = dataset_for(det, data, "test")
    out: dict[str, list[Any]] = {k: [] for k in ("path", "score", "whole", "map", "mask", "roi")}
    for batch in make_loader(ds, 16):
        pred = det.predict(batch)
        out["path"] += batch.path
        out["score"].append(pred.score.numpy())
        out["whole"].append(pred.extras["whole_image_score"].numpy())
        out["map"].append(pred.anomaly_map.numpy())
        assert batch.roi is not None
        out["roi"].append(batch.roi.numpy())
        mask = batch.mask if batch.mask is not None else torch.zeros_like(batch.roi)
        out["mask"].append(mask.numpy())
    return {k: v if k == "path" else np.concatenate(v) for k, v in out.items()}


def table_row(m: dict[str, Any], data: Path) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    from anomalyqc.evaluation import select_threshold

    meta = json.loads((data / "meta.json").read_text())["test_images"]
    kinds = np.array([meta[str(Path(p).relative_to(data))]["kind"] for p in m["path"]])
    s, whole = m["score"], m["whole"]
    flagged = np.isin(kinds, ("inside", "both"))
    good, outside = kinds == "good", kinds == "outside"
    plain = good | flagged
    t = select_threshold(flagged[plain].astype(int), s[plain], "f1").value
    roi = m["roi"] > 0
    return {
        "image_auroc_inside": float(roc_auc_score(flagged, s)),
        "image_auroc_inside_vs_plain_good": float(roc_auc_score(flagged[plain], s[plain])),
        "threshold_f1": float(t),
        "false_alarms_outside_only": float((s[outside] >= t).mean()),
        "false_alarms_good": float((s[good] >= t).mean()),
        "auroc_outside_only_vs_good": float(roc_auc_score(
            outside[good | outside], s[good | outside])),
        "pixel_auroc_in_roi": float(roc_auc_score(m["mask"][roi] > 0, m["map"][roi])),
        "image_auroc_inside_unmasked": float(roc_auc_score(flagged, whole)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--n-train", type=int, default=48)
    ap.add_argument("--n-test", type=int, default=24, help="test images per kind")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--work", type=Path, default=Path("/tmp/anomalyqc_grdnet_roi"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "grdnet_roi.json")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "src"))  # the tree this script lives in is what is measured
    import torch

    from anomalyqc.models.grdnet import Grdnet
    from anomalyqc.provenance import provenance
    from anomalyqc.synth.zipper import ZipperConfig, generate_zipper_dataset
    from anomalyqc.workflow import dataset_for

    torch.set_num_threads(args.threads)
    data = args.work / "zipper"
    n_test = dict.fromkeys(("good", "inside", "outside", "both"), args.n_test)
    generate_zipper_dataset(data, args.seed, args.n_train, n_test, ZipperConfig(size=args.size))
    params = {"image_size": args.size, "width": args.width, "unet_width": args.width,
              "unet_depth": 2, "epochs": args.epochs, "batch_size": args.batch_size,
              "val_fraction": 0.0, "seed": args.seed, "loss_curves": False,
              "score_window": max(3, args.size // 6) | 1}
    result: dict[str, Any] = {
        "provenance": provenance(repo=REPO),
        "settings": {**params, "n_train": args.n_train, "n_test_per_kind": args.n_test,
                     "threads": args.threads, "data": "anomalyqc.synth.zipper, seed "
                     f"{args.seed}, {args.size}x{args.size} gray"},
        "cases": {}, "jobs": [],
    }
    for case in args.cases:
        det = Grdnet({**params, "roi_loss": case})
        train = dataset_for(det, data, "train")
        load_before, t = os.getloadavg()[0], time.perf_counter()
        work = args.work / f"train_{case}"
        shutil.rmtree(work, ignore_errors=True)  # a fresh run, never a resumed one
        det.fit_dataset(train, work_dir=work)
        wall = time.perf_counter() - t
        result["jobs"].append({"job": f"fit {case}", "wall_s": round(wall, 1),
                               "load_1m_before": load_before, "load_1m_after": os.getloadavg()[0]})
        row = {**table_row(measure(det, data), data), "train_s": round(wall, 1),
               "steps": det.train_result.steps if det.train_result else None}
        result["cases"][case] = row
        print(case, json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                for k, v in row.items()}), flush=True)
    cols = [("image_auroc_inside", "image AUROC inside"),
            ("false_alarms_outside_only", "false alarms, fabric-only"),
            ("false_alarms_good", "false alarms, good"),
            ("auroc_outside_only_vs_good", "AUROC fabric-only vs good"),
            ("pixel_auroc_in_roi", "pixel AUROC in ROI"),
            ("image_auroc_inside_unmasked", "image AUROC inside, unmasked"),
            ("train_s", "train s")]
    print("\n| case | " + " | ".join(c[1] for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for case, row in result["cases"].items():
        print(f"| {case} | " + " | ".join(f"{row[k]:.3f}" if k != "train_s" else f"{row[k]:.0f}"
                                          for k, _ in cols) + " |")
    from anomalyqc.fileio import atomic_write_json

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
