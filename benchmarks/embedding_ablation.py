"""Why PaDiM's and MhBC-PatchCore's maps localise the way they do: each design candidate
alone, measured on MVTec bottle and on generated vial strips and vial patches.

The backbone (EfficientNet-Lite0) runs once per dataset; its stride-4, -8 and -16 block
outputs are kept in memory and every variant re-aggregates them, fits a PaDiM (the package's
OnlineMoments and Cholesky whitening) and is scored with the package's metrics. The row
"default" is what `anomalyqc fit padim` does today; "previous" is the old default.

    .venv/bin/python benchmarks/embedding_ablation.py [--datasets bottle vials patches]

Writes benchmarks/results/embedding_ablation.json (figures + provenance) and prints the
tables that benchmarks/README.md quotes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d

from anomalyqc.backbones.extractor import FeatureExtractor
from anomalyqc.data import ImageDataset, ImageTransform, make_loader, records_for
from anomalyqc.evaluation.metrics import aupro, image_auroc, pixel_auroc
from anomalyqc.provenance import provenance
from anomalyqc.stats.moments import OnlineMoments
from anomalyqc.stats.whitening import whiten

HERE = Path(__file__).resolve().parent
BOTTLE = HERE.parent.parent / "shared" / "data" / "mvtec_ad" / "bottle"
BLOCKS = {4: 2, 8: 4, 16: 10}  # stride -> EfficientNet-Lite0 block index (24, 40, 112 ch)

# name -> (strides, neighbourhood p, deep upsampling, random channel subset d, blur sigma,
#          image score rule)
VARIANTS: dict[str, tuple[tuple[int, ...], int, str, int | None, float, str]] = {
    "previous default (p=3, sigma=4)": ((8, 16), 3, "bilinear", None, 4.0, "map_max"),
    "p=1 (no neighbourhood average)": ((8, 16), 1, "bilinear", None, 4.0, "map_max"),
    "deep layer upsampled nearest": ((8, 16), 3, "nearest", None, 4.0, "map_max"),
    "random subset d=100 (seed 0)": ((8, 16), 3, "bilinear", 100, 4.0, "map_max"),
    "sigma=2": ((8, 16), 3, "bilinear", None, 2.0, "map_max"),
    "sigma=0 (no blur)": ((8, 16), 3, "bilinear", None, 0.0, "map_max"),
    "image score = max raw patch": ((8, 16), 3, "bilinear", None, 4.0, "patch_max"),
    "stride-4 block added (PaDiM's layers 1-3)": ((4, 8, 16), 3, "bilinear", None, 4.0, "map_max"),
    "default (p=1, sigma=2)": ((8, 16), 1, "bilinear", None, 2.0, "map_max"),
    "default + random subset d=100": ((8, 16), 1, "bilinear", 100, 2.0, "map_max"),
    "default + stride-4 block": ((4, 8, 16), 1, "bilinear", None, 2.0, "map_max"),
    "default + deep nearest": ((8, 16), 1, "nearest", None, 2.0, "map_max"),
}


def generated(work: Path, kind: str) -> Path:
    """The generated sets, drawn once with the CLI (deterministic from their seeds)."""
    out = work / kind
    if not (out / "test").is_dir():
        args = (["--seed", "0", "--n-train", "200", "--n-test-good", "40", "--n-test-defect", "40"]
                if kind == "vials" else
                # the published figures' set: without the clean patches of defective strips,
                # which `synth vials --patches` keeps by default since (issue 9)
                ["--seed", "2", "--n-train", "60", "--n-test-good", "20", "--n-test-defect", "40",
                 "--patches", "--drop-clean-patches"])
        subprocess.run([sys.executable, "-m", "anomalyqc.cli", "synth", "vials", "--out",
                        str(out), *args], check=True, stdout=subprocess.DEVNULL)
    return out


def block_outputs(root: Path, size: tuple[int, int], split: str) -> dict:
    """Stride-4/8/16 block outputs, labels and masks of one split."""
    fx = FeatureExtractor("efficientnet_lite0", 1, allow_download=False)
    body = fx.body
    want = set(BLOCKS.values())
    ds = ImageDataset(records_for(root, split), ImageTransform(size))
    feats: dict[int, list[torch.Tensor]] = {s: [] for s in BLOCKS}
    labels: list[int] = []
    masks: list[torch.Tensor] = []
    with torch.inference_mode():
        for batch in make_loader(ds, 8):
            h = body.act(body.stem(fx.normalise(batch.image)))
            for i, block in enumerate(body.blocks):
                h = block(h)
                if i in want:
                    stride = next(s for s, b in BLOCKS.items() if b == i)
                    feats[stride].append(h.float().contiguous())
            labels += [int(v) for v in batch.label]
            masks.append(batch.mask.bool() if batch.mask is not None else
                         torch.zeros(len(batch), 1, *size, dtype=torch.bool))
    return {"feats": {s: torch.cat(v) for s, v in feats.items()},
            "labels": torch.tensor(labels), "masks": torch.cat(masks)}


def embed(feats: dict, strides: tuple[int, ...], p: int, up: str, keep: torch.Tensor | None):
    first = feats[strides[0]]
    parts = []
    for s in strides:
        t = feats[s]
        if p > 1:
            t = F.avg_pool2d(t, p, 1, p // 2, count_include_pad=False)
        if t.shape[-2:] != first.shape[-2:]:
            kw = {} if up == "nearest" else {"align_corners": False}
            t = F.interpolate(t, size=first.shape[-2:], mode=up, **kw)
        parts.append(t)
    e = torch.cat(parts, 1)
    return e if keep is None else e[:, keep]


def padim_scores(train: torch.Tensor, test: torch.Tensor, eps: float = 0.01) -> torch.Tensor:
    b, d, h, w = train.shape
    moments = OnlineMoments(h * w, d)
    x = train.permute(0, 2, 3, 1).reshape(b, h * w, d)
    for start in range(0, b, 16):
        moments.update(x[start : start + 16])
    mean, chol = moments.mean().float(), moments.cholesky(eps)
    out = []
    for part in test.split(16):
        y = part.permute(0, 2, 3, 1).reshape(part.shape[0], h * w, d)
        out.append(whiten(y.transpose(0, 1), mean, chol).norm(dim=-1).transpose(0, 1))
    return torch.cat(out).reshape(test.shape[0], h, w)


def evaluate(variant: tuple, train: dict, test: dict) -> dict:
    strides, p, up, d, sigma, rule = variant
    keep = None
    if d is not None:
        total = sum(train["feats"][s].shape[1] for s in strides)
        g = torch.Generator().manual_seed(0)
        keep = torch.randperm(total, generator=g)[:d].sort().values
    raw = padim_scores(embed(train["feats"], strides, p, up, keep),
                       embed(test["feats"], strides, p, up, keep))
    size = tuple(test["masks"].shape[-2:])
    maps = F.interpolate(raw.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
    if sigma > 0:
        k = 2 * int(4.0 * sigma + 0.5) + 1
        maps = gaussian_blur2d(maps, (k, k), (sigma, sigma), border_type="reflect")
    score = raw.flatten(1).amax(1) if rule == "patch_max" else maps.flatten(1).amax(1)
    return {"image_auroc": round(image_auroc(test["labels"], score), 4),
            "pixel_auroc": round(pixel_auroc(test["masks"], maps), 4),
            "aupro": round(aupro(test["masks"], maps), 4),
            "locations": int(raw.shape[1] * raw.shape[2])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", nargs="*", default=["bottle", "vials", "patches"])
    ap.add_argument("--bottle", type=Path, default=BOTTLE)
    ap.add_argument("--work", type=Path, default=Path("/tmp/anomalyqc_ablation"))
    args = ap.parse_args()
    started = provenance()  # at the start: the commit the figures come from
    sets = {"bottle": (args.bottle, (256, 256)),
            "vials": (None, (256, 320)), "patches": (None, (128, 128))}
    results: dict[str, dict] = {}
    for name in args.datasets:
        root, size = sets[name]
        if name == "bottle" and not (args.bottle / "train" / "good").is_dir():
            print(f"bottle data not found at {args.bottle}: skipped", file=sys.stderr)
            continue
        root = root or generated(args.work, name)
        t = time.perf_counter()
        train, test = block_outputs(root, size, "train"), block_outputs(root, size, "test")
        print(f"{name}: backbone {time.perf_counter() - t:.0f} s, "
              f"{len(train['labels'])} train / {len(test['labels'])} test", file=sys.stderr)
        results[name] = {"size": list(size), "n_train": len(train["labels"]),
                         "n_test": len(test["labels"]),
                         "rows": {v: evaluate(spec, train, test) for v, spec in VARIANTS.items()}}
    out = HERE / "results" / "embedding_ablation.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"provenance": started, "results": results}, indent=2) + "\n")
    names = list(results)
    print("| PaDiM variant | " + " | ".join(f"{n} img / pix / AUPRO" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for v in VARIANTS:
        cells = [f"{r['image_auroc']:.4f} / {r['pixel_auroc']:.4f} / {r['aupro']:.4f}"
                 for r in (results[n]["rows"][v] for n in names)]
        print(f"| {v} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
