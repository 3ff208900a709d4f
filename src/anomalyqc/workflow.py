"""The jobs the CLI runs, each one function call for a Python user.

fit_run:      data folder -> fitted detector -> run folder (sharded under torchrun)
merge_runs:   run folders fitted on disjoint data -> one run folder
calibrate_run: run folder + labelled validation data -> threshold.json
evaluate_run: run folder + labelled data -> metrics, report (and threshold.json if none)
predict_paths: run folder + image files -> score, decision and heatmap per image
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from anomalyqc.data import ImageDataset, ImageTransform, make_loader
from anomalyqc.data.io import IMAGE_EXTENSIONS, read_image
from anomalyqc.data.layouts import Listing, Split, dataset_listing, detect_layout
from anomalyqc.data.listing import Skipped, classify, leaf_listing
from anomalyqc.errors import CalibrationError, ConfigError, DataError, ModelFileError, OutputError
from anomalyqc.fileio import atomic_folder, atomic_write_bytes, atomic_write_json
from anomalyqc.models.base import Detector, detector_class
from anomalyqc.models.storage import holds_model, load_detector, run_replacement_check
from anomalyqc.options import at_least, metrics_target
from anomalyqc.pathtext import display, fit_name
from anomalyqc.progress import Progress, tracked
from anomalyqc.types import GOOD, Batch, Sample

FIT_INFO_FILE = "fit_info.json"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def transform_for(det: Detector) -> ImageTransform:
    c = det.config
    return ImageTransform(c.image_size, c.crop_size, c.channels)


def dataset_for(det: Detector, data: str | Path, split: Split, masks: bool = True,
                roi_dir: str | None = None) -> ImageDataset:
    return listed_dataset(det, data, split, masks, roi_dir)[0]


def listed_dataset(det: Detector, data: str | Path, split: Split, masks: bool = True,
                   roi_dir: str | None = None) -> tuple[ImageDataset, Listing]:
    """The dataset of `split` and its listing (what was found and what was skipped).
    ROIs are read for a detector that uses them (Detector.uses_roi); one that needs them
    (a model trained on ROIs) gets a DataError when an image has none."""
    check_roi_option(det, roi_dir)
    listing = dataset_listing(data, split, masks=masks, roi_dir=roi_dir)
    if det.needs_roi:
        check_rois(listing.records, data, f"this {det.name} model was trained with ROIs and "
                                          f"needs one for every image")
    dataset = ImageDataset(listing.records, transform_for(det), channels=det.config.channels,
                           rois=det.uses_roi)
    return dataset, listing


ROI_HELP = ("ROIs are read from ROOT/roi/<split>/<type>/<stem>_roi.png (MVTec layout) or "
            "ROOT/<roi-dir>/<type>/<stem>.png with --roi-dir (folder layout)")


def check_roi_option(det: Detector, roi_dir: str | Path | None) -> None:
    """--roi-dir for a detector that never reads ROIs is a mistake, not a no-op."""
    if roi_dir is not None and not det.uses_roi:
        from anomalyqc.models.base import REGISTRY

        users = ", ".join(sorted(n for n, c in REGISTRY.items() if c.uses_roi))
        raise ConfigError(f"{det.name} does not use ROIs, so --roi-dir would be ignored; drop "
                          f"it, or use a detector that does ({users})")


def check_rois(records: Sequence[Any], data: str | Path, why: str) -> int:
    """The number of records with an ROI; a DataError when some but not all have one (or
    none, after `why` says one is needed), naming the first image without."""
    with_roi = sum(r.roi_path is not None for r in records)
    if with_roi == len(records):
        return with_roi
    if with_roi == 0 and not why:
        return 0
    first = next(r.path for r in records if r.roi_path is None)
    reason = why or f"{with_roi} of {len(records)} images have an ROI"
    raise DataError(f"{display(data)}: {reason}, but {display(first)} has none; give every "
                    f"image an ROI ({ROI_HELP})")


def listing_summary(found: int, scored: int, skipped: Sequence[Skipped]) -> dict[str, Any]:
    """The counts and skipped entries every report and the CLI show."""
    return {"images_found": found, "images_scored": scored,
            "skipped": [s.to_dict() for s in skipped]}


# ------------------------------------------------------------------------------------ fit
def fit_run(detector: str, data: str | Path, out: str | Path, params: dict[str, Any] | None = None,
            batch_size: int = 8, num_workers: int = 0,
            progress: Progress | None = None, overwrite: bool = False, resume: bool = False,
            work_dir: str | Path | None = None, roi_dir: str | None = None) -> Detector:
    """Fit a detector on the good training images of `data` and save it to `out`.

    The run is built in a temporary sibling of `out` and swapped in when complete (see
    fileio.atomic_folder): a fit that fails, is killed or runs out of disk leaves `out` as
    it was. A folder that holds a model is replaced only with overwrite=True, as a whole
    (its threshold and reports belonged to the old model). A second fit into the same
    `out` at the same time is refused.

    Under torchrun (WORLD_SIZE > 1) each process fits a disjoint shard of the images and
    rank 0 saves the combined model (see anomalyqc.distributed). A detector trained by
    gradient descent (models.reconstruction) instead gets every image and the trainer
    splits each epoch over the processes. Its log, checkpoints and loss curves go to
    `work_dir` (default: the sibling folder `out`.training, which outlives a killed fit,
    unlike the temporary folder), where resume=True continues a stopped run; at the end
    they move into `out`/training. A finished run (all epochs, or stopped by a budget)
    continues from `out`/training with resume=True and overwrite=True.

    A detector that uses ROIs (Detector.uses_roi) reads them when the training images have
    them (ROOT/roi/ in the MVTec layout, ROOT/`roi_dir`/ in the folder layout): all or
    none, since an image left without one would train on the whole image. Without any,
    the ROI is the whole image and fit_info.json says so.
    """
    from anomalyqc import distributed
    from anomalyqc.models.trained import TrainedDetector

    det = detector_class(detector)(params or {})
    trains = isinstance(det, TrainedDetector)
    if resume and not trains:
        raise ConfigError(f"--resume is for detectors trained in epochs; {det.name} fits in one "
                          f"pass: fit it again instead")
    check_roi_option(det, roi_dir)
    listing = training_listing(det, data, roi_dir)
    good = listing.records if det.supervised else \
        [r for r in listing.records if r.label == GOOD]
    if not any(r.label == GOOD for r in good):
        raise DataError(f"{data} has no good training images")
    n_rois = check_rois(good, data, "") if det.uses_roi else 0
    rank, world = distributed.world_from_env()
    if world > 1 and len(good) < 2 * world:
        raise DataError(f"{data} has {len(good)} training images: too few for {world} "
                        f"processes (each needs at least 2); use fewer processes")
    # Rank 0 takes the folder first, so a refusal (no --overwrite, a second writer) comes
    # before any work; the other ranks write nothing.
    with (atomic_folder(out, run_replacement_check(overwrite)) if rank == 0
          else nullcontext(Path(out))) as target:
        training = _Training(Path(work_dir or f"{os.path.abspath(out)}.training"), resume,
                             Path(out) / "training")
        return _fit_into(det, data, listing, good, target, batch_size, num_workers, progress,
                         training, n_rois)


def training_listing(det: Detector, data: str | Path, roi_dir: str | None = None) -> Listing:
    """What `det` fits on: the training split's good images, or for a supervised detector
    every labelled image of it (MVTec layout: train/good and train/<class>/ with masks from
    ground_truth/<class>/; folder layout: good/ and every class folder)."""
    if not det.supervised:
        return dataset_listing(data, "train", roi_dir=roi_dir)
    split: Split = "train" if detect_layout(data) == "mvtec" else "test"
    listing = dataset_listing(data, split, roi_dir=roi_dir)
    if not any(r.label != GOOD for r in listing.records):
        raise DataError(
            f"{det.name} is supervised and {data} has no defect images to learn from: put each "
            f"defect class in a folder of its own beside the good images (ROOT/train/<class>/ "
            f"in the MVTec layout, ROOT/<class>/ in the folder layout)")
    return listing


@dataclass
class _Training:
    """Where a detector trained in epochs keeps its checkpoints, and whether to resume."""

    work_dir: Path
    resume: bool
    finished: Path  # the training folder of the run being replaced, if any

    def adopt_finished_run(self) -> None:
        """Resuming a finished run: copy its checkpoints to work_dir (the run in `out` stays
        whole until the continued one replaces it). Nothing to do after a kill, whose
        checkpoints are in work_dir already."""
        from anomalyqc.training.checkpoint import has_checkpoint

        if self.resume and not has_checkpoint(self.work_dir / "checkpoint") and \
                has_checkpoint(self.finished / "checkpoint"):
            shutil.rmtree(self.work_dir, ignore_errors=True)
            shutil.copytree(self.finished, self.work_dir)


def _fit_into(det: Detector, data: str | Path, listing: Listing, good: list[Any], target: Path,
              batch_size: int, num_workers: int, progress: Progress | None,
              training: _Training, n_rois: int = 0) -> Detector:
    from anomalyqc import distributed
    from anomalyqc.models.trained import TrainedDetector

    rank, world = distributed.world_from_env()
    owns_group = distributed.init_from_env() if world > 1 else False
    try:
        trains = isinstance(det, TrainedDetector)
        if trains and training.resume:
            if rank == 0:
                training.adopt_finished_run()
            if distributed.active():
                distributed.dist.barrier()
        shard = good if trains else distributed.shard(good, rank, world)
        dataset = ImageDataset(shard, transform_for(det), channels=det.config.channels,
                               rois=det.uses_roi)
        det.config.channels = dataset.channels
        loader = _Timed(make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers))
        started = time.perf_counter()
        if isinstance(det, TrainedDetector):
            det.fit_dataset(dataset, progress, training.work_dir, training.resume)
            if rank == 0:  # the run folder keeps its log, curves and last checkpoint
                shutil.move(training.work_dir, target / "training")
                det.fit_report["training_folder"] = "training"
        else:
            distributed.fit_sharded(det, loader, progress=progress)
        fit_s = time.perf_counter() - started
        if rank == 0:
            det.save(target)
        fit_s_all = distributed.gather_floats(fit_s)
        rss_all = distributed.gather_floats(peak_rss_mb())
        backbone_all = distributed.gather_floats(det.fit_timings.get("backbone_seconds", 0.0)
                                                 if hasattr(det, "fit_timings") else 0.0)
        if owns_group:  # no process tears the group down while a peer still uses it
            distributed.dist.barrier()
    finally:
        if owns_group:
            distributed.dist.destroy_process_group()
    if rank != 0:
        return det
    info = {
        "detector": det.name,
        "data": str(data),
        "n_images": len(good),
        **({"images_per_class": dict(sorted(Counter(r.defect_type for r in good).items()))}
           if det.supervised else {}),
        **listing_summary(len(good), len(good), listing.skipped),
        "fit_seconds": round(fit_s, 3),
        "data_loading_seconds": round(loader.load_s, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        **{k: round(v, 3) for k, v in getattr(det, "fit_timings", {}).items()},
        **getattr(det, "fit_report", {}),  # training figures of the epoch-trained detectors
    }
    if det.uses_roi:
        ignored = getattr(det.config, "roi_mode", None) == "whole_image"
        info["roi"] = (f"per image ({n_rois} ROI files)" if n_rois and not ignored else
                       f"whole image ({n_rois} ROI files ignored: roi_mode=whole_image)"
                       if n_rois else f"whole image (no ROI files found; {ROI_HELP})")
    if world > 1:
        info.update(processes=world,
                    fit_seconds_per_process=[round(v, 3) for v in fit_s_all],
                    peak_rss_mb_per_process=[round(v, 1) for v in rss_all],
                    backbone_seconds_per_process=[round(v, 3) for v in backbone_all])
    atomic_write_json(target / FIT_INFO_FILE, info)
    return det


def merge_runs(runs: Sequence[str | Path], out: str | Path, overwrite: bool = False) -> Detector:
    """Combine run folders fitted on disjoint data into one run at `out`.

    PaDiM and MhBC-PatchCore merge their saved moments (exact) and K-Means states (weighted
    re-clustering); PatchCore keeps the union of the banks (approximate). Runs must agree on
    everything that fixes the embedding (detector, backbone, size, channels, reduction...).
    `out` is written as fit_run writes it: atomically, and over a run only with overwrite.
    """
    from anomalyqc.models.storage import read_run_config

    if len(runs) < 2:
        raise ConfigError("merge needs at least two run folders")
    configs = [read_run_config(r) for r in runs]
    first, base = Path(runs[0]), configs[0]
    for run, cfg in zip(runs[1:], configs[1:], strict=True):
        if cfg.get("detector") != base.get("detector"):
            raise ConfigError(f"cannot merge {run} (a {cfg.get('detector')} model) with {first} "
                              f"(a {base.get('detector')} model): merge runs of one detector")
        diff = _param_differences(base.get("params") or {}, cfg.get("params") or {})
        if diff:
            raise ConfigError(f"cannot merge {run} with {first}: they were fitted with different "
                              f"{'; '.join(diff)}; refit one of them with the other's settings")
    dets = [load_detector(r, merge_state=True) for r in runs]
    for run, det in zip(runs, dets, strict=True):
        if det.name in ("padim", "mhbc") and getattr(det, "moments", None) is None:
            if getattr(det.config, "clustering", "kmeans") != "kmeans":
                raise ModelFileError(f"{run} cannot be merged: it was fitted with "
                                     f"clustering='coreset'; refit it with clustering='kmeans'")
            raise ModelFileError(f"{run} cannot be merged: it was saved without its moments "
                                 f"(keep_moments=false, or written before runs kept them); it "
                                 f"still predicts, but refit it with keep_moments=true to merge")
    try:
        merged = dets[0].merge(*dets[1:])
    except ValueError as exc:
        raise ConfigError(f"cannot merge {', '.join(map(str, runs))}: {exc}") from exc
    infos = [_read_fit_info(r) for r in runs]
    n_images = [i.get("n_images") for i in infos]
    merged_from = [str(Path(r).resolve()) for r in runs]
    with atomic_folder(out, run_replacement_check(overwrite)) as target:
        merged.save(target)
        atomic_write_json(target / FIT_INFO_FILE, {
            "detector": merged.name,
            "merged_from": merged_from,
            "data": [i.get("data") for i in infos],
            "n_images": sum(n_images) if all(isinstance(n, int) for n in n_images) else None,
        })
    return merged


# Parameters that only steer how a fit streams (or how weights are found), not what it
# learns, so runs that differ in them can still merge.
_MERGE_FREE = {"allow_download", "keep_moments", "init_images", "refresh_growth", "pca_images",
               "seed"}


def _param_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = sorted((set(a) | set(b)) - _MERGE_FREE)
    return [f"{k} ({a.get(k)!r} vs {b.get(k)!r})" for k in keys if a.get(k) != b.get(k)]


def _read_fit_info(run: str | Path) -> dict[str, Any]:
    try:
        info = json.loads((Path(run) / FIT_INFO_FILE).read_text())
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


class _Timed:
    """Batches of a loader, adding up the time spent waiting on it in load_s. Re-iterable,
    like the loader itself, so detectors that read the data twice (MhBC passes=2) can."""

    def __init__(self, loader: DataLoader[Sample]) -> None:
        self.loader = loader
        self.load_s = 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        it = iter(self.loader)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.load_s += time.perf_counter() - t
            yield batch


# ------------------------------------------------------------------------------- predict
@dataclass
class Results:
    """Everything predicted over a dataset, kept compact (maps float16, images uint8)."""

    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    defect_types: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray | None] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    # Prediction.extras per image, by name (a classifier's class index and probabilities)
    extras: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def stacked_maps(self, above: float | None = None) -> np.ndarray:
        """(N, 1, H, W) float32; a non-finite pixel ranks above every finite one and above
        `above` (see rank_non_finite), so a failed image's map counts as anomalous."""
        from anomalyqc.evaluation.metrics import rank_non_finite

        maps = np.stack(self.maps).astype(np.float32)
        if not np.isfinite(maps).all():
            maps = rank_non_finite(maps, above).astype(np.float32)
        return maps

    def non_finite(self) -> list[str]:
        """Paths of the images whose score is NaN or infinite: the detector failed on them."""
        return [p for p, s in zip(self.paths, self.scores, strict=True) if not math.isfinite(s)]


def predict_dataset(det: Detector, dataset: ImageDataset, batch_size: int = 8,
                    keep_images: bool = True, progress: Progress | None = None) -> Results:
    res = Results()
    loader = make_loader(dataset, batch_size)
    for batch in tracked(loader, progress, f"{det.name}: predicting"):
        pred = det.predict(batch)
        for i in range(len(batch)):
            res.paths.append(batch.path[i])
            res.labels.append(int(batch.label[i]))
            res.defect_types.append(batch.defect_type[i])
            res.scores.append(float(pred.score[i]))
            res.maps.append(pred.anomaly_map[i].numpy().astype(np.float16))
            for k, v in pred.extras.items():
                res.extras.setdefault(k, []).append(v[i].numpy())
            if batch.mask is not None:
                res.masks.append(batch.mask[i].numpy().astype(np.uint8))
            elif int(batch.label[i]) == GOOD:
                res.masks.append(np.zeros((1, *det.input_size), dtype=np.uint8))
            else:
                res.masks.append(None)
            if keep_images:
                res.images.append((batch.image[i].numpy() * 255).round().astype(np.uint8))
    return res


# ----------------------------------------------------------------------------- calibrate
def _check_both_classes(dataset: ImageDataset, data: str | Path, what: str) -> None:
    """Refuse a one-class set from the file labels, before any image is read or scored."""
    labels = [r.label for r in dataset.records]
    n_good = sum(lab == GOOD for lab in labels)
    n_defect = len(labels) - n_good
    if n_good == 0 or n_defect == 0:
        missing = "defective" if n_defect == 0 else "good"
        raise CalibrationError(
            f"the test split of {data} has no {missing} images ({n_good} good, {n_defect} "
            f"defective): {what} need both good and defective images; add {missing} images"
            + (", or use --threshold-method fixed --threshold VALUE" if what == "thresholds"
               else ""))


def calibrate_run(run: str | Path, data: str | Path, threshold_method: str = "f1",
                  threshold_value: float | None = None, batch_size: int = 8,
                  progress: Progress | None = None, roi_dir: str | None = None) -> dict[str, Any]:
    """Choose the decision threshold on labelled validation data and store it in the run.

    Use data the run will not be evaluated on: `evaluate` then reports honest figures at a
    threshold it did not pick. Only image labels are used, so masks are never read.
    """
    from anomalyqc.data.fingerprint import data_sha256
    from anomalyqc.evaluation import select_threshold, threshold_metrics
    from anomalyqc.evaluation.metrics import rank_non_finite
    from anomalyqc.evaluation.threshold_file import write_threshold
    from anomalyqc.evaluation.thresholds import check_threshold_options

    check_threshold_options(threshold_method, threshold_value)
    at_least(batch_size, 1, "batch_size")
    run = Path(run)
    det = load_detector(run)
    dataset, listing = listed_dataset(det, data, "test", masks=False, roi_dir=roi_dir)
    if threshold_method != "fixed":
        _check_both_classes(dataset, data, "thresholds")
    res = predict_dataset(det, dataset, batch_size, keep_images=False, progress=progress)
    labels = np.asarray(res.labels)
    choice = select_threshold(labels, rank_non_finite(res.scores), threshold_method,
                              threshold_value)
    digest = data_sha256(listing.records, data)
    stored = write_threshold(run, choice, data, "calibrate", _model_id(det), data_sha256=digest)
    at = threshold_metrics(labels, rank_non_finite(res.scores, choice.value), choice.value)
    return {"threshold": choice.value, "threshold_method": choice.method,
            "model_id": stored.model_id, "calibration_data": display(data), "calibration_data_sha256": digest,
            "n_good": int((labels == GOOD).sum()),
            "n_defect": int((labels != GOOD).sum()),
            **{f"calibration_{k}": at[k] for k in ("f1", "accuracy", "tpr", "tnr")},
            "n_non_finite_scores": len(res.non_finite()), "notes": _non_finite_notes(res),
            **listing_summary(len(listing.records), len(res.scores), listing.skipped),
            "threshold_file": str(stored.path)}


def _non_finite_notes(res: Results) -> list[str]:
    """A note naming the images whose score was NaN or infinite, or none."""
    bad = res.non_finite()
    if not bad:
        return []
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    return [f"{len(bad)} of {len(res.scores)} images had a non-finite (NaN or infinite) "
            f"score: ranked as the most anomalous and counted as rejected (defect) at the "
            f"threshold; check these images and the model: {shown}"]


# ------------------------------------------------------------------------------ evaluate
METRICS_FILE = "metrics.json"


def evaluate_run(run: str | Path, data: str | Path, report: str | Path | None = None,
                 threshold_method: str = "f1", threshold_value: float | None = None,
                 calibrate: bool | None = None, batch_size: int = 8,
                 progress: Progress | None = None, n_examples: int = 4,
                 masks: bool = True, roi_dir: str | None = None,
                 save_threshold: bool = True, runtime: str = "torch") -> dict[str, Any]:
    """Score the test split of `data`, compute every metric, write the report.
    `runtime`: torch, or the run's checked ONNX export (load_for_inference); the identity
    names which scored.

    The decision threshold comes from the run's threshold.json when it exists and
    `calibrate` is not True; otherwise it is chosen on this data by `threshold_method` and
    saved to the run (an optimistic figure when the same data is then scored: say so);
    with save_threshold=False the run is left as it is (`compare` reads runs, never writes).

    Pixel metrics need ground-truth masks: on a dataset without any (image labels only),
    or with masks=False, pixel_auroc and aupro are None and `notes` says why.

    `report` is the metrics JSON file (the HTML report goes beside it); by default both go
    to RUN/report/. The JSON is written once, by write_report, with the schema documented
    there (the printed metrics plus the per-image rows). It may not go inside `data` (it
    would be read as images next time) nor into a run folder: refused before any work.

    The metrics carry what a reviewer needs to trace them: "identity" (model id, run,
    threshold origin with the content hash of the data that chose it, the evaluated data
    and its hash, software versions, date), "images_found", "images_scored", "skipped"
    (entries of the data folder not read, with reasons) and "per_defect_type".
    """
    from anomalyqc.data.fingerprint import annotations_sha256, data_sha256
    from anomalyqc.evaluation import (
        aupro,
        image_auroc,
        pixel_auroc,
        select_threshold,
        threshold_metrics,
        write_report,
    )
    from anomalyqc.evaluation.metrics import rank_non_finite
    from anomalyqc.evaluation.report import check_metrics_file, per_type_stats
    from anomalyqc.evaluation.threshold_file import read_threshold, write_threshold
    from anomalyqc.evaluation.thresholds import check_threshold_options
    from anomalyqc.placement import check_output_folder

    at_least(batch_size, 1, "batch_size")
    run = Path(run)
    report_json = Path(report) if report else run / "report" / METRICS_FILE
    check_metrics_file(report_json.name)
    check_output_folder(report_json.parent, "report folder", [data], run,
                        "pass --report FILE.json in a folder outside the data and outside "
                        "the run folder's top level (the default is RUN/report/metrics.json)")
    metrics_target(report_json, "report")
    report_check = replaceable_output("report", "report.html")
    check_output_early(report_json.parent, report_check)
    det = load_for_inference(run, runtime)
    dataset, listing = listed_dataset(det, data, "test", masks=masks, roi_dir=roi_dir)
    _check_both_classes(dataset, data, "AUROC and thresholds")
    # a corrupt threshold, or one made for another model, fails before scoring
    stored = None if calibrate else read_threshold(run, _model_id(det))
    if stored is None or threshold_value is not None:
        check_threshold_options(threshold_method, threshold_value)
    has_masks = any(r.mask_path is not None for r in dataset.records if r.label != GOOD)
    res = predict_dataset(det, dataset, batch_size, keep_images=True, progress=progress)
    labels = np.asarray(res.labels)
    raw_scores = np.asarray(res.scores)  # NaN where the detector failed: rejected below
    scores = rank_non_finite(raw_scores)
    digest = data_sha256(listing.records, data)

    if stored is not None:
        choice = stored.choice
        same = (Path(stored.data).resolve() == Path(data).resolve()
                or stored.data_sha256 == digest)
        source = stored.describe() + (" (this same data: optimistic figures)" if same else "")
        origin = {"written_by": stored.written_by, "data": stored.data,
                  "data_sha256": stored.data_sha256}
    elif save_threshold:
        choice = select_threshold(labels, scores, threshold_method, threshold_value)
        written = write_threshold(run, choice, data, "evaluate", _model_id(det),
                                  data_sha256=digest)
        source = (f"fixed by --threshold, saved to {written.path}" if choice.method == "fixed"
                  else f"chosen on {data} (test split) itself, saved to {written.path}")
        origin = {"written_by": "evaluate", "data": written.data, "data_sha256": digest}
    else:
        choice = select_threshold(labels, scores, threshold_method, threshold_value)
        source = ("fixed by --threshold, not saved" if choice.method == "fixed"
                  else f"chosen on {data} (test split) itself, not saved to the run")
        origin = {"written_by": None, "data": display(data), "data_sha256": digest}

    scores = rank_non_finite(raw_scores, choice.value)  # a failed image is never "good"
    notes: list[str] = _non_finite_notes(res)
    metrics: dict[str, Any] = {"detector": det.name, "model_id": det.model_id, "data": str(data),
                               "image_auroc": image_auroc(labels, scores)}
    if has_masks:
        maps = res.stacked_maps(choice.value)
        gt = np.stack([m if m is not None else np.zeros((1, *det.input_size), np.uint8)
                       for m in res.masks])
        metrics["pixel_auroc"] = pixel_auroc(gt, maps)
        metrics["aupro"] = aupro(gt, maps, fpr_limit=0.3)
        del maps
    else:
        gt = None
        metrics["pixel_auroc"] = None
        metrics["aupro"] = None
        notes.append("pixel_auroc and aupro are null: "
                     + ("masks not read (--no-masks)" if not masks else
                        f"{data} has no ground-truth masks (image labels only)"))
    at = threshold_metrics(labels, scores, choice.value)
    metrics.update({k: at[k] for k in ("f1", "accuracy", "precision", "recall", "tpr", "tnr")})
    metrics["threshold"] = choice.value
    metrics["threshold_method"] = choice.method
    metrics["threshold_source"] = source
    metrics["n_good"] = int((labels == GOOD).sum())
    metrics["n_defect"] = int((labels != GOOD).sum())
    metrics["n_non_finite_scores"] = len(res.non_finite())
    metrics["per_defect_type"] = per_type_stats(labels, scores, res.defect_types, choice.value)
    metrics.update(listing_summary(len(listing.records), len(res.scores), listing.skipped))
    if hasattr(det, "classification_metrics"):  # a classifier: its class decisions too
        metrics["classification"] = det.classification_metrics(res.defect_types, res.extras,
                                                               raw_scores)
    metrics["identity"] = _identity(det, run, data, digest, annotations_sha256(
        listing.records, data), {"value": choice.value, "method": choice.method, **origin})
    metrics["notes"] = notes
    metrics["report_html"] = str(report_json.parent / "report.html")
    metrics["metrics_json"] = str(report_json)

    images = np.stack(res.images).astype(np.float32) / 255.0
    # Built aside and swapped in whole: a killed run never leaves a report that looks
    # complete, nor half of a new one over an old one.
    with atomic_folder(report_json.parent, report_check) as tmp:
        write_report(tmp, metrics, labels, raw_scores, res.paths, images=images,
                     masks=gt, maps=res.stacked_maps(choice.value), threshold=choice.value,
                     n_examples=n_examples, metrics_file=report_json.name,
                     defect_types=res.defect_types)
    return metrics


def check_output_early(folder: Path, check: Callable[[Path], None]) -> None:
    """Refuse an output folder that may not be replaced before any image is scored
    (atomic_folder checks again, under its lock, when the output is complete)."""
    if folder.is_dir() and any(folder.iterdir()):
        check(folder)
    elif os.path.lexists(folder) and not folder.is_dir():
        raise OutputError(f"{folder} exists and is not a folder; choose a folder name")


def _model_id(det: Detector) -> str:
    if not det.model_id:  # pragma: no cover - load_detector always sets it
        raise ModelFileError(f"the {det.name} model has no id: load it from a run folder")
    return det.model_id


# Files a report or a predictions folder is made of: an existing folder holding anything
# else (a dataset, a run, the user's own files) is never replaced by one.
_OUTPUT_SUFFIXES = {".json", ".html", ".png", ".svg", ".csv", ".txt"}
_OUTPUT_FOLDERS = {"examples"}


def replaceable_output(kind: str, marker: str) -> Callable[[Path], None]:
    """For fileio.atomic_folder: an existing, non-empty folder may be replaced by a new
    `kind` only when it is an earlier one (it has `marker`, and nothing but report files)."""
    def check(folder: Path) -> None:
        if holds_model(folder):
            raise OutputError(f"{folder} is a run folder: refusing to write a {kind} over it; "
                              f"write the {kind} to a new or empty folder")
        for entry in sorted(folder.iterdir()):
            own = (entry.name in _OUTPUT_FOLDERS if entry.is_dir() and not entry.is_symlink()
                   else entry.is_file() and entry.suffix.lower() in _OUTPUT_SUFFIXES)
            if not own:
                raise OutputError(f"{folder} holds {entry.name}, which is not part of a {kind}: "
                                  f"a {kind} replaces its folder as a whole, so it needs a "
                                  f"folder of its own (new, empty or an earlier {kind})")
        if not (folder / marker).is_file():
            raise OutputError(f"{folder} is not empty and is not an earlier {kind} (no "
                              f"{marker}): refusing to replace it; write the {kind} to a new "
                              f"or empty folder")
    return check


def _identity(det: Detector, run: Path, data: str | Path, digest: str,
              annotations: str | None, threshold_origin: dict[str, Any]) -> dict[str, Any]:
    """Which model, threshold, data and software a report's figures belong to."""
    import datetime as dt

    from anomalyqc.provenance import package_versions

    return {"model_id": det.model_id, "detector": det.name, "run": display(run.resolve()),
            "threshold_origin": threshold_origin, "data": display(Path(data).resolve()),
            "data_sha256": digest, "annotations_sha256": annotations,
            "runtime": getattr(det, "runtime", "torch"),
            "software": package_versions(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}


# ------------------------------------------------------------------------------- predict
PREDICT_SUBFOLDER = "subfolder of an input folder (predict does not recurse: pass it as an input)"
SKIPPED_FILE = "skipped.json"


@dataclass
class Inputs:
    """predict's inputs expanded: the image files, the entries of input folders that were
    not read (with reasons), the input folders, and the folders of input files named one
    by one."""

    files: list[Path]
    skipped: list[Skipped]
    folders: list[Path]
    file_folders: list[Path]


def expand_inputs(inputs: Iterable[str | Path]) -> Inputs:
    """Files and folders (not recursive) -> image files, in the order given.

    In a folder every entry that is not an image is listed as skipped (subfolders too: say
    so rather than recurse). An input named explicitly must be a regular file or a folder:
    a FIFO, a dangling symlink or a missing path is an error, since it was asked for.
    """
    files: list[Path] = []
    skipped: list[Skipped] = []
    folders: list[Path] = []
    file_folders: list[Path] = []
    for item in inputs:
        p = Path(item)
        entry = classify(p, hidden=False)
        if entry.kind == "folder":
            found, skips = leaf_listing(p, PREDICT_SUBFOLDER)
            if not found:
                why = f"; skipped: {'; '.join(map(str, skips[:3]))}" if skips else ""
                raise DataError(f"{display(p)} holds no images "
                                f"({', '.join(sorted(IMAGE_EXTENSIONS))}){why}")
            files.extend(found)
            skipped.extend(skips)
            folders.append(p)
        elif entry.kind in ("image", "file"):  # named explicitly: let the reader judge it
            files.append(p)
            file_folders.append(p.parent)
        elif not os.path.lexists(p):
            raise DataError(f"{display(p)} does not exist; check the path")
        else:
            raise DataError(f"{display(p)} cannot be scored: {entry.reason}; pass image files "
                            "or folders")
    return Inputs(files, skipped, folders, file_folders)


def image_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders (non-recursive) into a list of image files (expand_inputs
    also says what was skipped)."""
    return expand_inputs(inputs).files


class Predictions(list[dict[str, Any]]):
    """The rows of predictions.json, with what the input expansion found and skipped."""

    def __init__(self, rows: Iterable[dict[str, Any]], found: int,
                 skipped: Sequence[Skipped]) -> None:
        super().__init__(rows)
        self.found = found
        self.skipped = list(skipped)


def load_threshold(run: str | Path, model_id: str) -> float | None:
    """The run's decision threshold for model `model_id`, or None when it is not calibrated."""
    from anomalyqc.evaluation.threshold_file import read_threshold

    stored = read_threshold(run, model_id)
    return None if stored is None else stored.value


RUNTIMES = ("torch", "onnx", "onnx-int8")


def load_for_inference(run: str | Path, runtime: str = "torch") -> Detector:
    """The run's model in the chosen runtime: torch, or its checked ONNX export in ONNX
    Runtime (anomalyqc.export.onnx), which has the same predict, config and model id."""
    if runtime == "torch":
        return load_detector(run)
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    from typing import cast

    from anomalyqc.export.onnx import OnnxDetector

    # Duck-typed: an inference-only model offers what scoring reads (predict, config,
    # input_size, model_id, name, ROI flags), not fit or the weights.
    return cast(Detector, OnnxDetector(run, int8=runtime == "onnx-int8"))


def predict_paths(run: str | Path, inputs: Iterable[str | Path], out: str | Path,
                  batch_size: int = 8,
                  progress: Progress | None = None, roi_dir: str | Path | None = None,
                  runtime: str = "torch") -> Predictions:
    """Score image files; write a heatmap overlay per image and predictions.json to `out`.

    Each row has a decision and its reason: "score >= threshold" (defect), "score <
    threshold" (good), "uncalibrated" (no decision), or, for a NaN or infinite score (the
    detector failed on the image), "non-finite score: rejected" (defect, score null).

    predictions.json stays a list of rows (its documented format); what the input folders
    held that was not scored goes beside it in skipped.json: {"images_found",
    "images_scored", "skipped": [{"path", "reason"}]}. `out` may not be an input folder,
    inside one, the folder of an input file, or a run folder (refused before any work).
    `out` is built aside and swapped in whole (fileio.atomic_folder), so it never holds old
    predictions beside new heatmaps; an existing `out` is replaced only when it holds an
    earlier prediction and nothing else.

    `roi_dir`: a folder with an ROI mask per image (<stem>.png or <stem>_roi.png, any image
    extension), for a detector that uses ROIs; a model trained on ROIs refuses to run
    without it.
    """
    from anomalyqc.placement import check_output_folder

    at_least(batch_size, 1, "batch_size")
    expanded = expand_inputs(inputs)
    check_output_folder(out, "--out folder", expanded.folders, run,
                        "choose a new folder outside the inputs and the run folder",
                        beside=expanded.file_folders)
    out = Path(out)
    out_check = replaceable_output("predictions folder", "predictions.json")
    check_output_early(out, out_check)
    det = load_for_inference(run, runtime)
    check_roi_option(det, roi_dir)
    if det.needs_roi and roi_dir is None:
        raise DataError(f"this {det.name} model was trained with ROIs and needs one per image: "
                        f"pass --roi-dir DIR holding <stem>.png or <stem>_roi.png for each image")
    rois = roi_files(expanded.files, roi_dir) if roi_dir is not None and det.uses_roi else None
    model_id = _model_id(det)
    threshold = load_threshold(run, model_id)
    with atomic_folder(out, out_check) as tmp:
        rows = _predict_into(det, model_id, threshold, expanded.files, out, tmp, batch_size,
                             progress, rois)
        atomic_write_json(tmp / SKIPPED_FILE,
                          listing_summary(len(expanded.files), len(rows), expanded.skipped))
    return Predictions(rows, len(expanded.files), expanded.skipped)


def roi_files(files: Sequence[Path], roi_dir: str | Path) -> dict[Path, Path]:
    """The ROI file of every image in `roi_dir`, by stem (<stem> or <stem>_roi, any image
    extension); a DataError names the first image without one."""
    from anomalyqc.data.io import list_images

    folder = Path(roi_dir)
    if not folder.is_dir():
        raise DataError(f"ROI folder {display(folder)} does not exist; check --roi-dir")
    by_stem: dict[str, Path] = {}
    for p in list_images(folder):
        if p.stem in by_stem:
            raise DataError(f"{display(folder)} holds two ROIs for {p.stem!r} "
                            f"({by_stem[p.stem].name}, {p.name}); keep one")
        by_stem[p.stem] = p
    found: dict[Path, Path] = {}
    for f in files:
        roi = by_stem.get(f.stem) or by_stem.get(f"{f.stem}_roi")
        if roi is None:
            raise DataError(f"{display(f)} has no ROI in {display(folder)} (looked for "
                            f"{f.stem}.* and {f.stem}_roi.*); add one or leave the image out")
        found[f] = roi
    return found


def _read_roi(tf: ImageTransform, image_path: Path, image: np.ndarray,
              roi_path: Path) -> torch.Tensor:
    """An ROI that must be at its image's native size, transformed as the image is."""
    from anomalyqc.data.io import read_mask

    roi = read_mask(roi_path)
    if roi.shape != image.shape[:2]:
        raise DataError(f"ROI {display(roi_path)} is {roi.shape[0]}x{roi.shape[1]} (HxW) but its "
                        f"image {display(image_path)} is {image.shape[0]}x{image.shape[1]}; save "
                        f"the ROI at the image's size")
    return tf.mask(roi)


def _predict_into(det: Detector, model_id: str, threshold: float | None, files: list[Path],
                  out: Path, tmp: Path, batch_size: int,
                  progress: Progress | None,
                  rois: dict[Path, Path] | None = None) -> list[dict[str, Any]]:
    """Write the heatmaps and predictions.json to `tmp`, naming them as they will be in `out`."""
    tf = transform_for(det)
    rows: list[dict[str, Any]] = []
    used: set[Path] = set()
    chunks = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    for chunk in tracked(chunks, progress, f"{det.name}: predicting"):
        arrays = [read_image(f, notes=tf.notes) for f in chunk]
        x = torch.stack([tf.image(a, f) for a, f in zip(arrays, chunk, strict=True)])
        if rois is None:
            pred = det.predict(x)
        else:
            roi = torch.stack([_read_roi(tf, f, a, rois[f])
                               for a, f in zip(arrays, chunk, strict=True)])
            pred = det.predict(Batch(image=x, label=torch.zeros(len(chunk), dtype=torch.long),
                                     roi=roi, path=[str(f) for f in chunk]))
        for i, f in enumerate(chunk):
            score = float(pred.score[i])
            # display(): the name is valid UTF-8, so predictions.json names the file exactly
            heat = _unique(out, display(f"{f.parent.name}_{f.stem}"), "_heatmap.png", used)
            atomic_write_bytes(tmp / heat.name,
                               overlay_png(x[i], pred.anomaly_map[i, 0], threshold))
            decision, reason = decide(score, threshold)
            rows.append({
                "path": display(f),
                "model_id": model_id,
                "score": score if math.isfinite(score) else None,
                "decision": decision,
                "reason": reason,
                "threshold": threshold,
                "heatmap": display(heat),
                **(det.prediction_fields(pred, i) if hasattr(det, "prediction_fields") else {}),
            })
    atomic_write_json(tmp / "predictions.json", rows)
    return rows


def decide(score: float, threshold: float | None) -> tuple[str | None, str]:
    """(decision, reason) for one image. A score that is not a finite number means the
    detector failed on the image: that is a defect whatever the threshold, never a pass
    (NaN >= threshold is False, which would read as good)."""
    if not math.isfinite(score):
        return "defect", "non-finite score: rejected"
    if threshold is None:
        return None, "uncalibrated"
    return ("defect", "score >= threshold") if score >= threshold else ("good",
                                                                        "score < threshold")


def _unique(folder: Path, stem: str, suffix: str, used: set[Path]) -> Path:
    """A file name not yet used in this call (same-named images from different folders),
    cut to fit the 255-byte name limit (a heatmap of a 255-byte input name)."""
    candidate, k = folder / fit_name(stem, suffix), 1
    while candidate in used:
        candidate = folder / fit_name(stem, f"_{k}{suffix}")
        k += 1
    used.add(candidate)
    return candidate


def overlay_png(image: torch.Tensor, amap: torch.Tensor, threshold: float | None) -> bytes:
    """Input with the anomaly map in jet over it; the decision contour when a threshold
    exists. Small inputs are upscaled with whole pixels (as in the report) so a 3-pixel
    spot stays visible."""
    import cv2

    from anomalyqc.evaluation.report import display_scale, heat_panel, rgb8

    rgb = rgb8(image.numpy())
    m = amap.float().numpy()
    finite = np.isfinite(m)
    top = max(float(m[finite].max()) if finite.any() else 0.0, threshold or 0.0, 1e-12)
    m = np.where(finite, m, top)  # a failed pixel shows as the hottest, inside the contour
    scale = display_scale(*m.shape)
    blend = heat_panel(rgb, m, (0.0, top), threshold, scale)
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(blend[..., ::-1]))
    if not ok:  # pragma: no cover - cv2 failure
        raise RuntimeError("could not encode heatmap PNG")
    return buf.tobytes()
