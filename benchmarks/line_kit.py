"""The line validation end to end on generated kits: the thesis's three tables and batch timing.

Three kits from `anomalyqc.synth.kit` with different seeds: a training kit of good strips
only (its region patches fit the detector), a calibration kit (per-region thresholds) and the
test kit the report is about. The detector sees every region through one shared model, cut
straight at its input size; the report is `anomalyqc line validate`'s (JSON + HTML), written
under --work, and a summary goes to benchmarks/results/.

    .venv/bin/python benchmarks/line_kit.py --good 20 --defect 20 --runs 10 --height 128 \\
        --image-size 64 --out benchmarks/results/line_kit_small.json

The VM's 2 cores are shared: timings are wall times under that load (the JSON records the
load average before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from anomalyqc.fileio import atomic_write_json
from anomalyqc.line.decisions import AcceptancePolicy
from anomalyqc.line.kit import read_kit
from anomalyqc.line.patches import cut
from anomalyqc.line.rank import key_frame_indices, rank_images
from anomalyqc.line.thresholds import LINE_METHODS
from anomalyqc.line.workflow import validate_line
from anomalyqc.models.base import detector_class
from anomalyqc.synth.acquisition import AcquisitionConfig
from anomalyqc.synth.kit import generate_kit
from anomalyqc.synth.vials import VialStripConfig
from anomalyqc.types import Batch


def _same_kit(root: Path, seed: int, good: int, defect: int, runs: int, cfg: AcquisitionConfig) -> bool:
    """The kit under `root` is what generate_kit would write with these settings."""
    try:
        gt = json.loads((root / "ground_truth.json").read_text())
    except (OSError, ValueError):
        return False
    gen = gt.get("generator", {})
    want = json.loads(json.dumps(asdict(cfg)))  # tuples as lists, as stored
    return bool(
        (gen.get("seed"), gen.get("n_good"), gen.get("n_defect"), gt.get("n_runs"))
        == (seed, good, defect, runs)
        and gen.get("config") == want
    )


def _tpr_by_type(test_kit: Path, rep: dict) -> dict[str, dict[str, float | int]]:
    """Strip (acquisition) TPR per defect type, from the report's false accepts."""
    kit = read_kit(test_kit)
    missed: dict[str, int] = {}
    for e in rep["errors"]["false_accepts"]:
        key = "+".join(e["defect_types"])
        missed[key] = missed.get(key, 0) + 1
    out: dict[str, dict[str, float | int]] = {}
    for s in kit.strips:
        if s.label:
            key = "+".join(s.defect_types)
            out.setdefault(key, {"n": 0})
            out[key]["n"] = int(out[key]["n"]) + len(s.runs)
    for key, row in out.items():
        row["tpr"] = 1.0 - missed.get(key, 0) / int(row["n"])
    return dict(sorted(out.items()))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--detector", default="padim")
    ap.add_argument("--good", type=int, default=20)
    ap.add_argument("--defect", type=int, default=20)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--train-strips", type=int, default=20)
    ap.add_argument("--cal-good", type=int, default=20)
    ap.add_argument("--cal-defect", type=int, default=20)
    ap.add_argument("--cal-runs", type=int, default=2)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--vial-pitch", type=int, default=None, help="default: height / 4")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--key-frames", default="1,8,16")
    ap.add_argument("--rank", action="store_true")
    ap.add_argument("--accept", default="7/10")
    ap.add_argument("--metric", default="accuracy", choices=LINE_METHODS)
    ap.add_argument(
        "--reuse-kits",
        action="store_true",
        help="use the kits under --work when they were generated with the same settings",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--set", action="append", default=[], help="detector parameter KEY=VALUE (JSON value)"
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/anomalyqc_line_kit"))
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    load_before = os.getloadavg()
    pitch = a.vial_pitch or a.height // 4
    cfg = AcquisitionConfig(strip=VialStripConfig(height=a.height, vial_pitch=pitch), n_frames=a.frames)
    t0 = time.perf_counter()
    kits_reused = []
    for name, seed, good, defect, runs in (
        ("train", 11, a.train_strips, 0, 2),
        ("cal", 12, a.cal_good, a.cal_defect, a.cal_runs),
        ("test", 13, a.good, a.defect, a.runs),
    ):
        if a.reuse_kits and _same_kit(a.work / name, seed, good, defect, runs, cfg):
            kits_reused.append(name)
        else:
            generate_kit(a.work / name, seed, good, defect, runs, cfg, a.image_size)
    t_kits = time.perf_counter() - t0

    keys = tuple(int(k) for k in a.key_frames.split(",") if k)
    kit = read_kit(a.work / "train")
    p = a.image_size
    chunks = []
    for s in kit.strips:
        for r in s.runs:
            frames = r.load_frames()
            # The model learns the kinds of images it will score: every frame when key frames
            # are inspected, and the two rank images of the run when they are.
            images = [frames] if keys else []
            if a.rank:
                images.append(np.stack(rank_images(frames)))
            f = torch.from_numpy(np.concatenate(images)).float()[:, None] / 255
            chunks.append(cut(f, kit.layout, p).reshape(-1, 1, p, p))
    x = torch.cat(chunks)
    params = {"image_size": p, "allow_download": False}
    params.update({k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)})
    t0 = time.perf_counter()
    det = detector_class(a.detector)(params).fit([Batch.from_images(c) for c in x.split(64)])
    det.save(a.work / "run")
    t_fit = time.perf_counter() - t0

    key_frame_indices(a.frames, keys)
    t0 = time.perf_counter()
    rep = validate_line(
        a.work / "test",
        a.work / "report",
        a.work / "run",
        calibration_kit=a.work / "cal",
        policy=AcceptancePolicy.parse(a.accept),
        metric=a.metric,
        key_frames=keys,
        use_rank=a.rank,
    )
    t_validate = time.perf_counter() - t0
    t1 = rep["table_10_1_region_vial"]
    summary = {
        "what": "anomalyqc line validate on generated kits (positive class: defective)",
        "settings": vars(a) | {"work": str(a.work), "out": str(a.out)},
        "n_training_patches": int(x.shape[0]),
        "pixel_size_um": cfg.pixel_size_um,
        "kits_reused": kits_reused,
        "strip_tpr_by_defect_type": _tpr_by_type(a.work / "test", rep),
        "seconds": {"kits": t_kits, "fit": t_fit, "calibrate_and_validate": t_validate},
        "acquisitions_scored": rep["n_acquisitions"] + a.cal_runs * (a.cal_good + a.cal_defect),
        "table_10_1": {
            k: {m: v[m] for m in ("threshold", "accuracy", "tpr", "tnr", "n_good", "n_defective")}
            for k, v in t1.items()
        },
        "table_10_2": {
            m: rep["table_10_2_strip"][m]
            for m in ("accuracy", "tpr", "tnr", "n_good", "n_defective")
        },
        "table_10_3": {
            m: rep["table_10_3_run_policy"][m]
            for m in ("policy", "accuracy", "tpr", "tnr", "confusion")
        },
        "timing_ms": {
            k: rep["timing"][k]
            for k in ("median", "p95", "max", "n_patches_per_batch", "budget_ms")
        }
        | {"stages_median": {k: v["median"] for k, v in rep["timing"]["stages"].items()}},
        "thresholds": rep["thresholds"]["regions"],
        "sources": rep["sources"],
        "thesis": {"vial_accuracy": 0.987, "strip_accuracy": 0.959, "run_accuracy": 0.964},
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "provenance": rep["provenance"],
        "report": rep["report_html"],
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out, summary)
    print(
        json.dumps(
            {k: summary[k] for k in ("seconds", "table_10_2", "table_10_3", "timing_ms")}, indent=1
        )
    )
    print(
        "vial accuracy",
        t1["vial"]["accuracy"],
        {k: round(v["accuracy"] or np.nan, 4) for k, v in t1.items()},
    )


if __name__ == "__main__":
    main()
