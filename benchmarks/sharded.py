"""A 2-process fit (`anomalyqc fit --nproc 2`, torchrun over loopback) against a 1-process fit
on the same generated vial strips: how equal the models are, and the test metrics of both.

PaDiM and MhBC-PatchCore: largest difference of the means and Cholesky factors, and of the
moments (mean, covariance). PatchCore (local coresets, then a coreset of their union) is
approximate; measured by the coverage radius of each bank over every training embedding
(max over embeddings of the distance to the nearest bank entry: what the greedy k-center
coreset minimises), the mean such distance, and the Hausdorff distance between the banks.

    .venv/bin/python benchmarks/sharded.py [--n-train 120 --image-size 128x160]

Results: benchmarks/results/sharded.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "anomalyqc.cli"]
EXTRA = {"padim": [], "mhbc": [], "patchcore": []}


def cli(*args: str) -> str:
    return subprocess.run([*CLI, *map(str, args)], check=True, stdout=subprocess.PIPE,
                          text=True).stdout


def last_json(text: str) -> dict:
    return json.loads(text[text.index("{"): text.rindex("}") + 1])


def nearest(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Distance from each row of a to its nearest row of b (exact, chunked)."""
    out = []
    for part in a.split(chunk):
        d = torch.cdist(part.double(), b.double(), compute_mode="donot_use_mm_for_euclid_dist")
        out.append(d.amin(1))
    return torch.cat(out)


def patchcore_distance(run1: Path, run2: Path, data: Path) -> dict:
    from anomalyqc.models.storage import load_detector
    from anomalyqc.workflow import dataset_for

    one, two = load_detector(run1), load_detector(run2)
    train = dataset_for(one, data, "train")
    with torch.inference_mode():
        emb = torch.cat([one.embed(torch.stack([train[j].image for j in
                                                range(i, min(i + 16, len(train)))]))
                         .reshape(-1, one.bank.shape[1]) for i in range(0, len(train), 16)])
    r1, r2 = nearest(emb, one.bank), nearest(emb, two.bank)
    h = max(float(nearest(one.bank, two.bank).max()), float(nearest(two.bank, one.bank).max()))
    return {
        "training_embeddings": int(emb.shape[0]),
        "bank_size": [int(one.bank.shape[0]), int(two.bank.shape[0])],
        "coverage_radius": [round(float(r1.max()), 4), round(float(r2.max()), 4)],
        "coverage_radius_ratio_2p_over_1p": round(float(r2.max() / r1.max()), 4),
        "mean_nearest_distance": [round(float(r1.mean()), 4), round(float(r2.mean()), 4)],
        "hausdorff_between_banks": round(h, 4),
        "typical_embedding_norm": round(float(emb.norm(dim=1).median()), 4),
        "shared_rows": int((nearest(one.bank, two.bank) < 1e-5).sum()),
    }


def gaussian_difference(run1: Path, run2: Path) -> dict:
    from anomalyqc.models.storage import load_detector

    a, b = load_detector(run1, merge_state=True), load_detector(run2, merge_state=True)
    out = {"max_abs_mean_diff": float((a.mean - b.mean).abs().max()),
           "max_abs_chol_diff": float((a.chol - b.chol).abs().max()),
           "max_abs_chol": float(a.chol.abs().max())}
    if a.moments is not None and b.moments is not None:
        out["moments_count"] = [a.moments.count, b.moments.count]
        out["max_abs_moment_mean_diff"] = float((a.moments.mean() - b.moments.mean()).abs().max())
        ca, cb = a.moments.covariance(), b.moments.covariance()
        out["max_rel_covariance_diff"] = float((ca - cb).abs().max() / ca.abs().max())
    if a.name == "mhbc":
        out["max_abs_centroid_diff"] = float((a.centroids - b.centroids).abs().max())
        out["typical_centroid_norm"] = float(a.centroids.norm(dim=-1).median())
    return out


def main() -> None:
    from scale import _provenance  # beside this script

    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=120)
    ap.add_argument("--image-size", default="128x160")
    ap.add_argument("--work", type=Path, default=Path("/tmp/anomalyqc_sharded"))
    ap.add_argument("--only", nargs="*", default=list(EXTRA))
    args = ap.parse_args()
    data = args.work / f"vials_{args.n_train}"
    if not (data / "meta.json").is_file():
        cli("synth", "vials", "--out", data, "--n-train", args.n_train, "--n-test-good", 30,
            "--n-test-defect", 30, "--seed", 0)
    results: dict = {"provenance": _provenance(), "data": f"synth vials seed 0, {args.n_train} "
                     "train, 30 good + 30 defective test", "image_size": args.image_size}
    for name in args.only:
        row: dict = {}
        runs = {}
        for nproc in (1, 2):
            run = args.work / f"{name}_{nproc}p"
            info = last_json(cli("fit", name, "--data", data, "--out", run, "--image-size",
                                 args.image_size, "--nproc", nproc, "--overwrite",
                                 *EXTRA[name]))
            m = last_json(cli("evaluate", run, "--data", data, "--recalibrate", "--report",
                              args.work / f"{name}_{nproc}p_report" / "metrics.json"))
            row[f"{nproc}p"] = {"fit_seconds": info["fit_seconds"],
                                "peak_rss_mb": info.get("peak_rss_mb_per_process",
                                                        [info["peak_rss_mb"]]),
                                **{k: m[k] for k in ("image_auroc", "pixel_auroc", "aupro")}}
            runs[nproc] = run
        row["difference"] = (patchcore_distance(runs[1], runs[2], data) if name == "patchcore"
                             else gaussian_difference(runs[1], runs[2]))
        results[name] = row
        print(name, json.dumps(row), file=sys.stderr, flush=True)
    out = HERE / "results" / "sharded.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("| detector | processes | image AUROC | pixel AUROC | AUPRO | fit s |")
    print("|---|---|---|---|---|---|")
    for name in args.only:
        for p in ("1p", "2p"):
            r = results[name][p]
            print(f"| {name} | {p[0]} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | "
                  f"{r['aupro']:.4f} | {r['fit_seconds']:.1f} |")


if __name__ == "__main__":
    main()
