"""Generator ablations of the thesis, reproduced small: residual vs vanilla (table 9.1) and a
convolutional vs a dense bottleneck, CRAE vs DRAE (9.1.3.1).

Each variant is the GANomaly detector (encoder-decoder-encoder generator + discriminator,
L = L_adv + 50 L_con + L_enc) with GRD-Net's generator shape (nets.presets.grdnet_config:
stages of two pre-activation blocks of two convs down to an 8x8 map), trained for the same
epochs, seed and data (generated vial-region patches):

- residual_crae: shortcuts on, 1x1-conv bottleneck of 32x8x8 (the thesis's best);
- vanilla_crae:  the same layers without shortcuts (NetConfig.residual=False);
- residual_drae: shortcuts on, dense bottleneck of 2048 (= 32x8x8 values, the same code size).

After training, the generator is run in eval mode over its own training split and over the
held-out validation split (the trainer's split, same seed) and, as table 9.1 does, the
contextual loss (L1 + (1 - SSIM), eq. 8.4), the SSIM loss (1 - SSIM), the encoder loss and the
adversarial (feature-matching) loss are reported for both, beside the image and pixel AUROC
on the test split. The trainer's own last-epoch training means come from its log.csv.

    .venv/bin/python benchmarks/recon_ablations.py [--epochs 5] [--data DIR] [--image-size 64]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalyqc.data import make_loader
from anomalyqc.evaluation import image_auroc, pixel_auroc
from anomalyqc.models.reconstruction import feature_matching, ssim_per_image
from anomalyqc.provenance import provenance
from anomalyqc.synth.vials import VialStripConfig, generate_vial_dataset
from anomalyqc.training.sampling import split_indices
from anomalyqc.types import GOOD
from anomalyqc.workflow import dataset_for, fit_run

HERE = Path(__file__).resolve().parent
VARIANTS: dict[str, dict[str, Any]] = {
    "residual_crae": {"residual": True, "bottleneck": "conv"},
    "vanilla_crae": {"residual": False, "bottleneck": "conv"},
    "residual_drae": {"residual": True, "bottleneck": "dense"},
    "vanilla_drae": {"residual": False, "bottleneck": "dense"},
}
DEFAULT_VARIANTS = ("residual_crae", "vanilla_crae", "residual_drae")


def make_patches(out: Path, n_train: int = 25, n_test_good: int = 10, n_test_defect: int = 60,
                 seed: int = 0) -> Path:
    """Vial-region patches (64x64, 20 per strip) in the MVTec layout, as
    `anomalyqc synth vials --patches --drop-clean-patches` writes them: the published figures'
    set, without the clean patches of defective strips that the generator keeps by default."""
    generate_vial_dataset(out, seed=seed, n_train=n_train, n_test_good=n_test_good,
                          n_test_defect=n_test_defect, patches=True,
                          cfg=VialStripConfig(keep_clean_patches_of_defective=False))
    return out


def variant_params(variant: str, image_size: int, width: int, epochs: int,
                   seed: int = 0) -> dict[str, Any]:
    """GANomaly parameters of one variant: GRD-Net's generator shape at `image_size`."""
    stages = int(np.log2(image_size // 8))
    if image_size < 16 or 8 * 2**stages != image_size:
        raise SystemExit(f"--image-size must be 16 * 2**k (the bottleneck is 8x8), got {image_size}")
    return {"image_size": image_size, "width": width, "stages": stages, "blocks": 2, "convs": 2,
            "max_width": 512, "latent_channels": 32, "latent_dim": 2048, "epochs": epochs,
            "seed": seed, "loss_curves": False, **VARIANTS[variant]}


def generator_losses(det: Any, images: torch.Tensor, batch_size: int = 32) -> dict[str, float]:
    """Table 9.1's losses of a trained GANomaly on `images`, eval mode, per-image means."""
    g, d = det.nets["generator"], det.nets["discriminator"]
    g.eval()
    d.eval()
    sums = {"contextual": 0.0, "ssim": 0.0, "l1": 0.0, "encoder": 0.0, "adversarial": 0.0}
    with torch.inference_mode():
        for x in images.split(batch_size):
            x_hat, z, z_hat = g(x)
            ssim_loss = 1 - ssim_per_image(x, x_hat)
            l1 = (x - x_hat).abs().flatten(1).mean(dim=1)
            _, feats = d(torch.cat([x, x_hat]))
            n = len(x)
            sums["ssim"] += float(ssim_loss.sum())
            sums["l1"] += float(l1.sum())
            sums["contextual"] += float((l1 + ssim_loss).sum())
            sums["encoder"] += float((z - z_hat).pow(2).flatten(1).mean(dim=1).sum())
            sums["adversarial"] += n * float(feature_matching(feats[:n], feats[n:]))
    return {k: v / len(images) for k, v in sums.items()}


def stack(dataset: Any, indices: list[int] | None = None) -> torch.Tensor:
    idx = range(len(dataset)) if indices is None else indices
    return torch.stack([dataset[i].image for i in idx])


def test_metrics(det: Any, data: Path) -> dict[str, float]:
    """Image AUROC (the detector's score and the reconstruction score) and pixel AUROC."""
    dataset = dataset_for(det, data, "test")
    labels, scores, recon, maps, masks = [], [], [], [], []
    for batch in make_loader(dataset, 32):
        p = det.predict(batch)
        labels += [int(v) for v in batch.label]
        scores.append(p.score.numpy())
        if "reconstruction_score" in p.extras:
            recon.append(p.extras["reconstruction_score"].numpy())
        maps.append(p.anomaly_map.numpy())
        for i in range(len(batch)):
            m = batch.mask[i].numpy() if batch.mask is not None else None
            masks.append(m if m is not None and int(batch.label[i]) != GOOD
                         else np.zeros(p.anomaly_map.shape[1:], np.uint8))
    y = np.asarray(labels)
    out = {"image_auroc": image_auroc(y, np.concatenate(scores)),
           "pixel_auroc": pixel_auroc(np.stack(masks).astype(np.uint8), np.concatenate(maps)),
           "n_good": int((y == GOOD).sum()), "n_defect": int((y != GOOD).sum())}
    if recon:
        out["image_auroc_reconstruction_score"] = image_auroc(y, np.concatenate(recon))
    return out


def last_epoch_log(log_csv: Path) -> dict[str, dict[str, float]]:
    """The trainer's logged means of the last epoch: train rows averaged, the val row."""
    rows = list(csv.DictReader(log_csv.open()))
    last = max(int(r["epoch"]) for r in rows)
    out: dict[str, dict[str, float]] = {}
    for phase in ("train", "val"):
        sel = [r for r in rows if int(r["epoch"]) == last and r["phase"] == phase]
        keys = [k for k in ("loss", "con", "enc", "adv") if sel and sel[0].get(k) not in (None, "")]
        out[phase] = {k: float(np.mean([float(r[k]) for r in sel])) for k in keys}
    return out


def run_variant(variant: str, data: Path, work: Path, image_size: int, width: int,
                epochs: int, batch_size: int) -> dict[str, Any]:
    params = variant_params(variant, image_size, width, epochs)
    run = work / variant
    load_before = os.getloadavg()
    wall, cpu = time.perf_counter(), time.process_time()
    det = fit_run("ganomaly", data, run, params, batch_size=batch_size)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    train_ds = dataset_for(det, data, "train")
    tr_idx, val_idx = split_indices(len(train_ds), det.config.val_fraction, det.config.seed)
    from anomalyqc.nets import count_parameters

    return {
        "variant": variant, "params": params,
        "generator_parameters": count_parameters(det.nets["generator"]),
        "fit_wall_s": round(wall, 1), "fit_cpu_s": round(cpu, 1),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "losses_train": generator_losses(det, stack(train_ds, tr_idx)),
        "losses_validation": generator_losses(det, stack(train_ds, val_idx)),
        "trainer_last_epoch": last_epoch_log(run / "training" / "log.csv"),
        **test_metrics(det, data),
    }


def ratio(rows: dict[str, dict], a: str, b: str, split: str, key: str) -> float | None:
    if a not in rows or b not in rows:
        return None
    return rows[a][split][key] / max(rows[b][split][key], 1e-12)


def table(rows: dict[str, dict]) -> str:
    lines = ["| variant | con train (val) | SSIM loss train (val) | enc train (val) | "
             "img AUROC | pix AUROC | fit s |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        t, v = r["losses_train"], r["losses_validation"]
        lines.append(f"| {name} | {t['contextual']:.4f} ({v['contextual']:.4f}) | "
                     f"{t['ssim']:.4f} ({v['ssim']:.4f}) | {t['encoder']:.2e} ({v['encoder']:.2e}) | "
                     f"{r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['fit_wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="vial patches; generated if absent")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "recon_ablations.json")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"provenance": provenance(), "threads": args.threads,
                              "epochs": args.epochs, "load_average_before":
                              [round(v, 2) for v in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="recon-ablations-") as tmp:
        data = args.data or make_patches(Path(tmp) / "patches")
        result["data"] = str(args.data) if args.data else "generated: synth vials --patches " \
            "--drop-clean-patches --n-train 25 --n-test-good 10 --n-test-defect 60 --seed 0"
        rows = {}
        for v in variants:
            rows[v] = run_variant(v, data, Path(tmp) / "runs", args.image_size, args.width,
                                  args.epochs, args.batch_size)
            brief = {k: rows[v][k] for k in ("losses_train", "losses_validation", "image_auroc",
                                              "pixel_auroc", "fit_wall_s")}
            print(f"{v}: {json.dumps(brief)}", file=sys.stderr, flush=True)
    result["variants"] = rows
    result["ratios"] = {
        f"{a}/{b} {split} {key}": ratio(rows, a, b, split, key)
        for a, b in (("residual_crae", "vanilla_crae"), ("residual_crae", "residual_drae"))
        for split in ("losses_train", "losses_validation") for key in ("contextual", "ssim")}
    result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from anomalyqc.fileio import atomic_write_json

    atomic_write_json(args.out, result)
    print(table(rows))
    for k, v in result["ratios"].items():
        if v is not None:
            print(f"{k}: {v:.2f}")


if __name__ == "__main__":
    main()
