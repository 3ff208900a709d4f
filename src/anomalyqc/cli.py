"""anomalyqc command line: thin wrappers over anomalyqc.workflow and friends.

Errors a user can fix (AnomalyQCError) are printed as one line and exit with status 2;
warnings about odd but readable input (DataWarning) as one `warning:` line each.
"""

from __future__ import annotations

import errno
import json
import sys
import warnings
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress as RichProgress
from rich.progress import TaskID

from anomalyqc.errors import AnomalyQCError, ConfigError, DataWarning
from anomalyqc.fileio import json_safe
from anomalyqc.options import (
    at_least,
    file_target,
    folder_target,
    no_dedicated_sets,
    threshold_options,
)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Visual anomaly detection for pharmaceutical quality control.")
synth_app = typer.Typer(no_args_is_help=True, help="Generate synthetic datasets.")
app.add_typer(synth_app, name="synth")
data_app = typer.Typer(no_args_is_help=True, help="Prepare datasets from existing ones.")
app.add_typer(data_app, name="data")
console = Console(stderr=True)


class DetectorName(str, Enum):
    padim = "padim"
    patchcore = "patchcore"
    mhbc = "mhbc"
    ganomaly = "ganomaly"
    draem = "draem"
    grdnet = "grdnet"
    resganad = "resganad"
    unet = "unet"
    blob = "blob"
    classifier = "classifier"


_ROI_DIR_HELP = ("Detectors that use ROIs (grdnet; resganad for its anomaly synthesis), "
                 "folder layout: the subfolder of --data with the ROI masks, "
                 "<roi-dir>/<type>/<stem>.png. The MVTec layout's ROOT/roi/ is read without it.")


class ThresholdMethod(str, Enum):
    f1 = "f1"
    accuracy = "accuracy"
    youden = "youden"
    fixed = "fixed"


def _run(job: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():  # restores the previous showwarning on the way out
        warnings.simplefilter("always", DataWarning)  # the library says each kind once
        default_show = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], *args: Any,
                 **kwargs: Any) -> None:
            if issubclass(category, DataWarning):
                console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False,
                              soft_wrap=True)
            else:
                default_show(message, category, *args, **kwargs)

        warnings.showwarning = show
        try:
            return job()
        except AnomalyQCError as exc:
            # escaped: a file name like "lot[/b].png" in the message is text, not markup
            console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False,
                          soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as exc:  # a full disk or a read-only folder outside an atomic write
            from anomalyqc.fileio import DISK_ERRNOS

            if exc.errno not in DISK_ERRNOS:
                raise
            reason, fix = DISK_ERRNOS[exc.errno]
            if exc.errno in (errno.EACCES, errno.EPERM):  # a read as well as a write
                fix = "check its permissions"
            where = exc.filename if exc.filename is not None else "a file"
            console.print(f"[bold red]error:[/] {escape(f'{where}: {reason}; {fix}')}",
                          highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None


def _parse_sets(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; values parsed as JSON when they can be (numbers, true, null)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _parse_size(text: str, option: str) -> int | tuple[int, int]:
    """'256' -> 256 (a square); '256x320' -> (256, 320), height first."""
    parts = text.lower().replace(" ", "").split("x")
    if len(parts) in (1, 2) and all(p.isdigit() and int(p) > 0 for p in parts):
        return int(parts[0]) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    raise typer.BadParameter(f"expected a size like 256 or 256x320 (height x width), got {text!r}",
                             param_hint=option)


def _print_json(obj: Any) -> None:
    """Strict JSON on stdout (NaN and inf as null), like every file we write."""
    sys.stdout.write(json.dumps(json_safe(obj), indent=2, default=str, allow_nan=False) + "\n")


def _print_listing(result: dict[str, Any]) -> None:
    """One stderr line: images found and scored, entries skipped and the first few of them
    (all of them are in the command's JSON output and report)."""
    from anomalyqc.data.listing import skipped_summary

    if "images_found" in result:
        console.print(skipped_summary(result["images_found"], result.get("images_scored"),
                                      result.get("skipped") or []),
                      highlight=False, soft_wrap=True, markup=False)


class _Bars:
    """The progress callback the CLI hands to the library (anomalyqc.progress.Progress): one
    rich bar per description, drawn on stderr because stdout carries the JSON. Nothing is drawn
    until the first report, so a torchrun worker that never reports draws nothing."""

    def __init__(self) -> None:
        self._bars: RichProgress | None = None
        self._tasks: dict[str, TaskID] = {}

    def __call__(self, description: str, completed: int, total: int | None) -> None:
        if self._bars is None:
            self._bars = RichProgress(console=console, transient=False)
            self._bars.start()
        task = self._tasks.get(description)
        if task is None:
            task = self._tasks[description] = self._bars.add_task(description, total=total)
        self._bars.update(task, completed=completed, total=total)

    def __enter__(self) -> _Bars:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bars is not None:
            self._bars.stop()


@synth_app.command("vials")
def synth_vials(
    out: Path = typer.Option(..., "--out", help="Output folder (MVTec AD layout)."),
    seed: int = typer.Option(0, help="Random seed: the same seed gives identical files."),
    n_train: int = typer.Option(200, help="Good training strips."),
    n_test_good: int = typer.Option(40, help="Good test strips."),
    n_test_defect: int = typer.Option(40, help="Defective test strips (split over the types)."),
    patches: bool = typer.Option(False, help="Write per-vial, per-region patches."),
    regions: str = typer.Option("0,1,2,3", help="With --patches: the regions to write, e.g. 1 "
                                                "for the shoulder patches (meniscus) only."),
    keep_clean_patches: bool = typer.Option(
        True, "--keep-clean-patches/--drop-clean-patches",
        help="With --patches: the defect-free patches of defective strips go to test/good as "
             "<type>_<strip>_v<vial>_r<region>.png (meta.json: strip_type), since a strip is "
             "judged on all its patches; --drop-clean-patches leaves them out."),
    meniscus_levels: str | None = typer.Option(
        None, help="Distinct fill levels as fractions of the strip height, e.g. 0.36,0.46,0.56: "
                   "each vial draws one, so normal appearance is multi-modal at a location."),
) -> None:
    """Synthetic Blow-Fill-Seal vial strips (5 vials x 4 regions) with defects and masks."""
    from anomalyqc.synth.vials import VialStripConfig, generate_vial_dataset

    def job() -> dict:
        try:
            region_ids = tuple(int(r) for r in regions.split(","))
            levels = tuple(float(v) for v in meniscus_levels.split(",")) if meniscus_levels else ()
        except ValueError:
            raise typer.BadParameter("expected comma-separated numbers, e.g. 1,2 or 0.4,0.5")
        cfg = VialStripConfig(regions=region_ids, meniscus_levels=levels,
                              keep_clean_patches_of_defective=keep_clean_patches)
        return generate_vial_dataset(out, seed, n_train, n_test_good, n_test_defect, patches,
                                     cfg=cfg, progress=bars)

    with _Bars() as bars:
        summary = _run(job)
    summary = {k: v for k, v in summary.items() if k != "paths"}
    _print_json(summary)


@app.command()
def fit(
    ctx: typer.Context,
    detector: DetectorName = typer.Argument(..., help="Which detector."),
    data: Path = typer.Option(..., "--data", help="Dataset folder (MVTec or folder layout)."),
    out: Path = typer.Option(..., "--out", help="Run folder to write the model to."),
    backbone: str | None = typer.Option(None,
                                        help="Embedding detectors: efficientnet_lite0 (default) "
                                             "| efficientnet_lite2 | resnet18 | wide_resnet50_2; "
                                             "classifier: efficientnet_lite0 | efficientnet_lite2 "
                                             "| resnet18 | resnet50 | mobilenet_v3_large"),
    image_size: str = typer.Option("256", help="Resize images to this size: 256 for a square, "
                                                 "HxW (e.g. 256x320) otherwise."),
    crop_size: str | None = typer.Option(None, help="Optional centre crop after resizing "
                                                    "(same format)."),
    batch_size: int = typer.Option(8, help="Images per batch."),
    workers: int = typer.Option(0, help="Data-loading worker processes."),
    set_: list[str] = typer.Option([], "--set",
                                   help="Detector parameter KEY=VALUE (repeatable), e.g. "
                                        "--set coreset_ratio=0.01 --set n_clusters=8"),
    nproc: int = typer.Option(1, "--nproc", min=1,
                              help="Processes to shard the training images over (launches "
                                   "torchrun; gloo on CPU, NCCL with CUDA)."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace the model in --out (the whole folder: its "
                                        "threshold and reports go with it)."),
    epochs: int | None = typer.Option(None, help="Trained detectors (ganomaly, draem, grdnet, "
                                                 "resganad, classifier): epochs to train "
                                                 "(default 10)."),
    width: int | None = typer.Option(None, help="Trained detectors: the networks' stem width "
                                                "(stage i outputs width * 2**(i+1))."),
    resume: bool = typer.Option(False, "--resume", help="Trained detectors: continue the run "
                                                        "checkpointed in RUN.training/ (or, "
                                                        "with --overwrite, the finished run "
                                                        "in RUN, e.g. past its budget)."),
    roi_dir: str | None = typer.Option(None, "--roi-dir", help=_ROI_DIR_HELP),
) -> None:
    """Fit a detector on the good training images and save it to a run folder."""
    from anomalyqc.models.base import detector_class
    from anomalyqc.models.trained import TrainedDetector
    from anomalyqc.workflow import fit_run

    sets = _parse_sets(set_)
    trains = issubclass(detector_class(detector.value), TrainedDetector)
    dedicated = {"backbone": backbone, "epochs": epochs, "width": width}
    params = {"image_size": _parse_size(image_size, "--image-size"),
              "crop_size": _parse_size(crop_size, "--crop-size") if crop_size else None,
              **{k: v for k, v in dedicated.items() if v is not None},
              **({"batch_size": batch_size, "num_workers": workers} if trains else {}), **sets}

    def check() -> None:  # everything that can be refused before any image is read
        at_least(batch_size, 1, "--batch-size")
        at_least(workers, 0, "--workers")
        no_dedicated_sets(sets)
        folder_target(out, "--out")
        detector_class(detector.value)(params)  # parameter ranges and types, one line

    _run(check)
    out = out.absolute()  # `--out .` is swapped for a new folder: the old cwd goes with it
    if nproc > 1:
        from anomalyqc.launch import relaunch_with_torchrun

        raise typer.Exit(relaunch_with_torchrun(ctx, nproc, console))
    with _Bars() as bars:
        _run(lambda: fit_run(detector.value, data, out, params, batch_size, workers,
                             progress=bars, overwrite=overwrite, resume=resume, roi_dir=roi_dir))
    from anomalyqc.distributed import world_from_env
    from anomalyqc.launch import mark_rank_done

    rank = world_from_env()[0]
    mark_rank_done(rank)
    if rank != 0:  # a torchrun worker other than rank 0: rank 0 reports
        return
    info = json.loads((out / "fit_info.json").read_text())
    _print_json(info)
    _print_listing(info)
    if info.get("stopped_by") in ("max_steps", "max_minutes"):
        console.print(f"training stopped by its budget ({info['stopped_by']}) after "
                      f"{info['epochs_reached']} epochs, {info['steps']} steps; `fit --resume "
                      f"--overwrite` with a larger budget continues it", markup=False,
                      highlight=False)
    console.print(f"model saved to {out}", markup=False, highlight=False)


@app.command()
def merge(
    runs: list[Path] = typer.Argument(..., help="Run folders fitted on disjoint data (two or "
                                                "more)."),
    out: Path = typer.Option(..., "--out", help="Run folder to write the merged model to."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace the model in --out (the whole folder: its "
                                        "threshold and reports go with it)."),
) -> None:
    """Combine runs fitted on different machines or days into one (PaDiM and MhBC-PatchCore
    exactly up to K-Means re-clustering; PatchCore as the union of the banks)."""
    from anomalyqc.workflow import merge_runs

    _run(lambda: folder_target(out, "--out"))
    out = out.absolute()  # as for fit
    _run(lambda: merge_runs(runs, out, overwrite))
    _print_json(json.loads((out / "fit_info.json").read_text()))
    console.print(f"merged model saved to {out}", markup=False, highlight=False)


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="Run folder written by `anomalyqc fit`."),
    data: Path = typer.Option(..., "--data", help="Dataset with a labelled test split."),
    report: Path | None = typer.Option(None, help="Write the metrics JSON here (the HTML "
                                                     "report goes beside it)."),
    threshold_method: ThresholdMethod | None = typer.Option(
        None, help="How to choose the threshold when the run has none, or with "
                   "--recalibrate (default f1)."),
    threshold: float | None = typer.Option(None, help="Threshold for --threshold-method "
                                                         "fixed."),
    recalibrate: bool = typer.Option(False, help="Choose a new threshold even if the run "
                                                 "has one."),
    no_masks: bool = typer.Option(False, "--no-masks",
                                  help="Ignore ground-truth masks: image metrics only (for a "
                                       "dataset where only some defect images have masks)."),
    batch_size: int = typer.Option(8),
    roi_dir: str | None = typer.Option(None, "--roi-dir", help=_ROI_DIR_HELP),
    runtime: str = typer.Option("torch", help="torch | onnx | onnx-int8: score with the run's "
                                              "checked ONNX export (see `anomalyqc export`)."),
) -> None:
    """Metrics on a test split: AUROCs, AUPRO, and accuracy/F1/... at the threshold.

    Without ground-truth masks (no ground_truth/ folder, or --no-masks) pixel_auroc and
    aupro are null and the report has no ground-truth column.
    """
    from anomalyqc.evaluation.threshold_file import threshold_path
    from anomalyqc.workflow import evaluate_run

    def check() -> str:
        at_least(batch_size, 1, "--batch-size")  # --report is checked by evaluate_run first
        stored = threshold_path(run)
        return threshold_options(threshold_method.value if threshold_method else None,
                                 threshold, recalibrate, stored if stored.is_file() else None)

    method = _run(check)
    with _Bars() as bars:
        metrics = _run(lambda: evaluate_run(run, data, report, method, threshold,
                                            recalibrate or method == "fixed",
                                            batch_size, progress=bars, masks=not no_masks,
                                            roi_dir=roi_dir, runtime=runtime))
    _print_json(metrics)
    _print_listing(metrics)
    for note in metrics["notes"]:
        console.print(f"note: {note}", highlight=False, soft_wrap=True, markup=False)
    console.print(f"report: {metrics['report_html']}", highlight=False, soft_wrap=True,
                  markup=False)


@app.command()
def calibrate(
    run: Path = typer.Argument(..., help="Run folder written by `anomalyqc fit`."),
    data: Path = typer.Option(..., "--data", help="Labelled validation data (its test split: "
                                                 "good and defective images), not the data "
                                                 "you will evaluate on."),
    threshold_method: ThresholdMethod = typer.Option(ThresholdMethod.f1,
                                                     help="How to choose the threshold."),
    threshold: float | None = typer.Option(None, help="Threshold for --threshold-method "
                                                         "fixed."),
    no_masks: bool = typer.Option(False, "--no-masks",
                                  help="Accepted as on `evaluate`; calibration uses image "
                                       "labels only and never reads masks, so any dataset "
                                       "works with or without it."),
    batch_size: int = typer.Option(8),
    roi_dir: str | None = typer.Option(None, "--roi-dir", help=_ROI_DIR_HELP),
) -> None:
    """Choose the decision threshold on validation data and store it in the run.

    Only the image labels (good/defective) are used: datasets without masks are fine.
    """
    from anomalyqc.workflow import calibrate_run

    del no_masks  # calibration never reads masks (see the option's help)

    def check() -> None:
        at_least(batch_size, 1, "--batch-size")
        threshold_options(threshold_method.value, threshold)

    _run(check)
    with _Bars() as bars:
        result = _run(lambda: calibrate_run(run, data, threshold_method.value, threshold,
                                            batch_size, progress=bars, roi_dir=roi_dir))
    _print_json(result)
    for note in result["notes"]:
        console.print(f"note: {note}", highlight=False, soft_wrap=True, markup=False)
    _print_listing(result)
    console.print(f"threshold {result['threshold']:.6g} ({result['threshold_method']}) chosen "
                  f"by `anomalyqc calibrate` on {data}, saved to {result['threshold_file']}",
                  highlight=False, soft_wrap=True, markup=False)


@app.command()
def predict(
    run: Path = typer.Argument(..., help="Run folder."),
    inputs: list[Path] = typer.Argument(..., help="Image files or folders."),
    out: Path = typer.Option(..., "--out", help="Folder for heatmaps and predictions.json."),
    batch_size: int = typer.Option(8),
    roi_dir: Path | None = typer.Option(None, "--roi-dir",
                                        help="Detectors that use ROIs: a folder with one ROI mask "
                                             "per image, <stem>.png or <stem>_roi.png (needed by "
                                             "a grdnet run trained with ROIs)."),
    runtime: str = typer.Option("torch", help="torch | onnx | onnx-int8 (the run's checked "
                                              "ONNX export, see `anomalyqc export`)."),
) -> None:
    """Score images: score, decision (when the run is calibrated) and a heatmap each.

    An image whose score is not a finite number (the detector failed on it) is a defect,
    calibrated or not, with a warning: a failure is never passed as good.
    """
    from anomalyqc.workflow import predict_paths

    def check() -> None:
        at_least(batch_size, 1, "--batch-size")
        folder_target(out, "--out")

    _run(check)
    with _Bars() as bars:
        rows = _run(lambda: predict_paths(run, inputs, out, batch_size, progress=bars,
                                          roi_dir=roi_dir, runtime=runtime))
    for r in rows:
        if r["score"] is None:
            console.print(f"warning: {r['path']}: {r['reason']}", highlight=False,
                          soft_wrap=True)
    for r in rows:
        decision = r["decision"] or "uncalibrated (run `anomalyqc calibrate` first)"
        score = "non-finite" if r["score"] is None else f"{r['score']:.4f}"
        sys.stdout.write(f"{r['path']}\t{score}\t{decision}\t{r['heatmap']}\n")
    _print_listing({"images_found": rows.found, "images_scored": len(rows),
                    "skipped": [s.to_dict() for s in rows.skipped]})


@app.command()
def benchmark(
    run: Path = typer.Argument(..., help="Run folder."),
    data: Path = typer.Option(..., "--data", help="Dataset whose test images are timed."),
    batch_size: int = typer.Option(16, help="Batch size N for the batched figures."),
    repeats: int = typer.Option(50, help="Batch-1 timings taken (median and p95)."),
    out: Path | None = typer.Option(None, help="Also write the JSON here."),
    roi_dir: str | None = typer.Option(None, "--roi-dir", help=_ROI_DIR_HELP),
    onnx: bool = typer.Option(False, "--onnx", help="Also time ONNX Runtime against torch on "
                                                    "the same images (batch 1, N and 60; the "
                                                    "run must be exported)."),
) -> None:
    """Fit time and memory (from the fit), latency, throughput and peak RSS, as JSON."""
    from anomalyqc.benchmark import benchmark_run

    def check() -> None:
        at_least(batch_size, 1, "--batch-size")
        at_least(repeats, 1, "--repeats")
        if out is not None:
            file_target(out, "--out", "benchmark.json")

    _run(check)
    result = _run(lambda: benchmark_run(run, data, batch_size, repeats, roi_dir=roi_dir,
                                        onnx=onnx))
    if out:
        from anomalyqc.fileio import atomic_write_json

        atomic_write_json(out, result)
    _print_json(result)


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="Run folders to put side by side."),
    data: Path = typer.Option(..., "--data", help="Dataset whose labelled test split every "
                                                 "run is evaluated on."),
    out: Path = typer.Option(..., "--out", help="Folder for comparison.json/.md/.html and "
                                               "each run's full report (runs/<label>/)."),
    batch_size: int = typer.Option(8),
    no_masks: bool = typer.Option(False, "--no-masks", help="Image metrics only."),
    timing_images: int = typer.Option(16, help="Test images timed one at a time per run."),
) -> None:
    """Evaluate several runs on the same data and write one table: AUROCs, AUPRO,
    accuracy/TPR/TNR at each run's stored threshold, ms per image, model size. Runs are
    read, never changed (no threshold is written into them)."""
    from anomalyqc.evaluation.compare import compare_runs, markdown_table

    def check() -> None:
        at_least(batch_size, 1, "--batch-size")
        at_least(timing_images, 1, "--timing-images")
        folder_target(out, "--out")

    _run(check)
    with _Bars() as bars:
        result = _run(lambda: compare_runs(runs, data, out, batch_size, masks=not no_masks,
                                           timing_images=timing_images, progress=bars))
    _print_json(result)
    console.print(markdown_table(result["rows"]), markup=False, highlight=False,
                  soft_wrap=True)
    for note in result["notes"]:
        console.print(f"note: {note}", highlight=False, soft_wrap=True, markup=False)
    console.print(f"comparison: {out / 'comparison.html'}", markup=False, highlight=False)


class ExportFormat(str, Enum):
    onnx = "onnx"


@app.command("export")
def export_cmd(
    run: Path = typer.Argument(..., help="Run folder to export (written to RUN/onnx/)."),
    format_: ExportFormat = typer.Option(ExportFormat.onnx, "--format", help="Export format."),
    data: Path | None = typer.Option(None, "--data", help="Dataset whose first test images "
                                                          "check the export (default: seeded "
                                                          "random images)."),
    n_check: int = typer.Option(8, "--check-images", help="Images the parity check compares."),
    rtol: float = typer.Option(1e-4, help="Parity: relative tolerance (times max |torch output|)."),
    atol: float = typer.Option(1e-4, help="Parity: absolute tolerance."),
    int8: bool = typer.Option(False, "--int8", help="Also write a dynamically quantised int8 "
                                                    "model, kept only within --int8-rtol."),
    int8_rtol: float = typer.Option(2e-2, "--int8-rtol", help="Parity tolerance of the int8 model."),
    map_rtol: float | None = typer.Option(
        None, "--map-rtol", help="Parity: relative tolerance of the map when looser than "
                                 "--rtol (default: the model's own, 5% for the classifier's "
                                 "gradient maps, else --rtol)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier export."),
) -> None:
    """Export a run's model (scores, maps and their post-processing) to ONNX; ONNX Runtime's
    outputs are checked against the torch model's and an export outside the tolerance is
    refused."""
    from anomalyqc.export.onnx import export_run

    def check() -> None:
        at_least(n_check, 1, "--check-images")
        if rtol < 0 or atol < 0 or int8_rtol < 0 or (map_rtol is not None and map_rtol < 0):
            raise ConfigError("tolerances must be >= 0")

    _run(check)
    _print_json(_run(lambda: export_run(run, data, n_check, rtol, atol, int8, int8_rtol,
                                        overwrite=overwrite, map_rtol=map_rtol)))


@synth_app.command("library")
def synth_library(
    out: Path = typer.Option(..., "--out", help="Output folder (MVTec AD layout)."),
    seed: int = typer.Option(0, help="Random seed: the same seed gives identical files."),
    counts: str = typer.Option("good=100,glass=27,particle_cake=36,foam=30",
                               help="Images per split and class, CLASS=N,... (thesis table 7.1: "
                                    "100 / 27 / 36; foam is the unseen class)."),
    holdout: list[str] = typer.Option([], "--holdout",
                                      help="A defect class written to test/ only (repeatable): "
                                           "the defect no client library labelled."),
    patch_size: int = typer.Option(128, help="Image side in px."),
    height: int = typer.Option(512, help="Vial height in px (its pitch, the window width, is a "
                                         "quarter of it); 512 is the line kit's 156 um/px."),
    min_contrast: float = typer.Option(12.0, help="Redraw a defect whose pixels differ from "
                                                  "their surroundings by less than this many gray "
                                                  "levels on average (0 keeps invisible ones)."),
) -> None:
    """A labelled defect library (good / glass / particle_cake / foam vial patches) for the
    supervised classifier; see anomalyqc.synth.library for the classes' defect types."""
    from anomalyqc.synth.library import LibraryConfig, generate_library

    def job() -> dict:
        parsed: dict[str, int] = {}
        for item in counts.split(","):
            name, sep, n = item.partition("=")
            if not sep or not n.strip().isdigit():
                raise typer.BadParameter(f"--counts: expected CLASS=N,..., got {item!r}")
            parsed[name.strip()] = int(n)
        cfg = LibraryConfig(counts=parsed, holdout=tuple(holdout), patch_size=patch_size,
                            strip_height=height, min_contrast=min_contrast)
        return generate_library(out, seed, cfg, progress=bars)

    with _Bars() as bars:
        summary = _run(job)
    _print_json(summary)


@data_app.command("folds")
def data_folds(
    data: Path = typer.Option(..., "--data", help="MVTec-layout dataset with test defect masks."),
    out: Path = typer.Option(..., "--out", help="Output folder (MVTec layout)."),
    folds: int = typer.Option(2, help="Folds the test defects of each type are dealt into."),
    fold: int = typer.Option(0, help="The fold kept in test/; the others go to train/<type>/."),
) -> None:
    """Labelled training data for the supervised detectors out of a dataset whose defects
    are only in its test split (MVTec AD): its test defects split into folds, one kept for
    testing (see anomalyqc.data.folds)."""
    from anomalyqc.data.folds import write_fold

    _print_json(_run(lambda: write_fold(data, out, folds, fold)))


# ----------------------------------------------------------------------------- line (issue 9)
line_app = typer.Typer(no_args_is_help=True, help="The inspection line: layouts, thresholds "
                                                  "per region, validation on a test kit.")
app.add_typer(line_app, name="line")


@synth_app.command("kit")
def synth_kit(
    out: Path = typer.Option(..., "--out", help="Kit folder to write (see anomalyqc.synth.kit)."),
    seed: int = typer.Option(0, help="Random seed: the same seed gives identical files."),
    n_good: int = typer.Option(120, help="Good strips."),
    n_defect: int = typer.Option(141, help="Defective strips (split over the defect types)."),
    runs: int = typer.Option(10, help="Acquisitions per strip."),
    frames: int = typer.Option(16, help="Frames per acquisition."),
    height: int = typer.Option(512, help="Strip height in px (vial pitch scales with it); 512 "
                                         "is 156 um/px, particles of 100-1000 um at 1-6.4 px."),
    patch_size: int = typer.Option(256, help="Patch size written into the kit's layout.yaml."),
    defect_types: str | None = typer.Option(None, help="Comma-separated defect types (default: "
                                                       "all the thesis's line defects)."),
) -> None:
    """A line test kit: good and defective strips, each acquired --runs times."""
    from anomalyqc.synth.acquisition import LINE_DEFECT_TYPES, AcquisitionConfig
    from anomalyqc.synth.kit import generate_kit
    from anomalyqc.synth.vials import VialStripConfig

    def job() -> dict:
        at_least(height, 32, "--height")
        strip = VialStripConfig(height=height, vial_pitch=max(8, round(height / 4)))
        types = tuple(t.strip() for t in defect_types.split(",")) if defect_types else LINE_DEFECT_TYPES
        cfg = AcquisitionConfig(strip=strip, n_frames=frames, defect_types=types)
        return generate_kit(out, seed, n_good, n_defect, runs, cfg, patch_size, progress=bars)

    with _Bars() as bars:
        summary = _run(job)
    _print_json(summary)


@line_app.command("layout")
def line_layout(
    out: Path = typer.Option(..., "--out", help="Layout YAML file to write."),
    height: int = typer.Option(256, help="Strip height in px of the synthetic strip."),
    patch_size: int = typer.Option(256, help="Square patch size the regions are resized to."),
    rois: bool = typer.Option(True, "--rois/--no-rois",
                              help="Also write each region's ROI mask (the synthetic vial's plastic "
                                   "in every pose) to <out stem>_roi/<region>.png beside --out."),
) -> None:
    """Write the layout of the synthetic strip (5 vials x 4 regions) to edit for a product."""
    from anomalyqc.line.layout import DEFAULT_REGION_NAMES
    from anomalyqc.synth.kit import write_synthetic_layout
    from anomalyqc.synth.vials import VialStripConfig

    def job() -> None:
        at_least(height, 32, "--height")
        file_target(out, "--out", "layout.yaml")
        roi_dir = f"{out.stem}_roi"
        folder = out.parent / roi_dir
        ours = {f"{n}.png" for n in DEFAULT_REGION_NAMES}
        if rois and folder.exists() and (
            not folder.is_dir() or (other := sorted(p.name for p in folder.iterdir() if p.name not in ours))
        ):
            what = f"holds {other[0]}" if folder.is_dir() else "is a file"
            raise ConfigError(f"{folder} {what}: the ROI masks of --out go there; choose another "
                              "--out name or pass --no-rois")
        write_synthetic_layout(out, VialStripConfig(height=height, vial_pitch=max(8, round(height / 4))),
                               patch_size, roi_dir if rois else None)

    _run(job)
    console.print(f"layout written to {out}", highlight=False, soft_wrap=True)


def _line_models(items: list[str]) -> tuple[Path | None, dict[str, Path]]:
    """--model RUN (all regions) and --model REGION=RUN (one region), repeatable."""
    default: Path | None = None
    per: dict[str, Path] = {}
    for item in items:
        name, sep, run = item.partition("=")
        if sep and name and "/" not in name and not Path(item).exists():
            if name in per:
                raise typer.BadParameter(f"region {name} given twice", param_hint="--model")
            per[name] = Path(run)
        elif default is None:
            default = Path(item)
        else:
            raise typer.BadParameter("one shared RUN at most; give the others as REGION=RUN",
                                     param_hint="--model")
    return default, per


def _key_frames(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise typer.BadParameter(f"expected frame numbers like 1,8,16, got {text!r}",
                                 param_hint="--key-frames") from None


class LineMetric(str, Enum):
    accuracy = "accuracy"
    f1 = "f1"
    strip_accuracy = "strip_accuracy"
    strip_f1 = "strip_f1"


_MODEL_HELP = "RUN for every region, or REGION=RUN for one (repeatable)."
_KEY_HELP = "Key frames, 1-based (-1 = last); empty with --rank for rank images only."


@line_app.command("calibrate")
def line_calibrate(
    model: list[str] = typer.Option(..., "--model", help=_MODEL_HELP),
    kit: Path = typer.Option(..., "--kit", help="Calibration kit (good and defective strips)."),
    out: Path = typer.Option(..., "--out", help="Thresholds JSON file to write."),
    layout: Path | None = typer.Option(None, help="Product layout (default: the kit's)."),
    metric: LineMetric = typer.Option(
        LineMetric.accuracy,
        help="accuracy/f1: maximised per region over its region samples; strip_accuracy/strip_f1: "
        "the thresholds that together maximise it over whole acquisitions (eq. 10.3).",
    ),
    key_frames: str = typer.Option("1,8,16", help=_KEY_HELP),
    rank: bool = typer.Option(False, "--rank/--no-rank", help="Also inspect the rank images."),
    runtime: str = typer.Option("torch", help="torch | onnx | onnx-int8: run the models' checked "
                                              "ONNX exports in ONNX Runtime (`anomalyqc export`)."),
) -> None:
    """Choose a threshold per region on a calibration kit and write them to --out."""
    from anomalyqc.line.workflow import calibrate_line

    default, per = _line_models(model)
    frames = _key_frames(key_frames)
    _run(lambda: file_target(out, "--out", "thresholds.json"))
    with _Bars() as bars:
        thr = _run(lambda: calibrate_line(kit, out, default, per, layout, metric.value, frames,
                                          rank, progress=bars, runtime=runtime))
    _print_json(thr.to_json())
    console.print(f"thresholds written to {out}", highlight=False, soft_wrap=True)


@line_app.command("validate")
def line_validate(
    model: list[str] = typer.Option(..., "--model", help=_MODEL_HELP),
    kit: Path = typer.Option(..., "--kit", help="Test kit to validate on."),
    out: Path = typer.Option(..., "--out", help="Report folder (report.json, report.html)."),
    calibration: Path | None = typer.Option(None, help="Calibration kit: thresholds are "
                                                       "chosen on it here."),
    thresholds: Path | None = typer.Option(None, help="Thresholds file from `line calibrate` "
                                                      "(instead of --calibration)."),
    layout: Path | None = typer.Option(None, help="Product layout (default: the kit's)."),
    metric: LineMetric = typer.Option(LineMetric.accuracy, help="With --calibration."),
    accept: str = typer.Option("7/10", help="Acceptance policy K/N: a product is good (or "
                                            "defective) when K of its N runs say so."),
    budget_ms: float = typer.Option(500.0, help="Time budget of one batch, ms."),
    key_frames: str = typer.Option("1,8,16", help=_KEY_HELP),
    rank: bool = typer.Option(False, "--rank/--no-rank", help="Also inspect the rank images."),
    max_examples: int = typer.Option(12, help="Heatmaps written per error kind."),
    runtime: str = typer.Option("torch", help="torch | onnx | onnx-int8: run the models' checked "
                                              "ONNX exports in ONNX Runtime (`anomalyqc export`)."),
) -> None:
    """The thesis's three tables, confusion matrices, errors with heatmaps and batch timing on
    a test kit (positive class: defective)."""
    from anomalyqc.line.decisions import AcceptancePolicy
    from anomalyqc.line.workflow import validate_line

    default, per = _line_models(model)
    frames = _key_frames(key_frames)

    def check() -> AcceptancePolicy:
        at_least(max_examples, 0, "--max-examples")
        folder_target(out, "--out")
        return AcceptancePolicy.parse(accept)

    policy = _run(check)
    with _Bars() as bars:
        report = _run(lambda: validate_line(kit, out, default, per, layout, calibration,
                                            thresholds, metric.value, policy, budget_ms, frames,
                                            rank, max_examples, progress=bars,
                                            runtime=runtime))
    _print_json({k: report[k] for k in ("positive_class", "table_10_1_region_vial",
                                        "table_10_2_strip", "table_10_3_run_policy", "timing")})
    console.print(f"report: {report['report_html']}", highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------- serve (issue 11)
audit_app = typer.Typer(no_args_is_help=True, help="The service's audit trail.")
app.add_typer(audit_app, name="audit")


@app.command()
def serve(
    model: Path = typer.Option(..., "--model", help="Run folder of the model to serve (a symlink to "
                                                    "one can be swapped for a hot reload)."),
    layout: Path | None = typer.Option(None, help="Line layout: enables POST /v1/inspect-strip."),
    thresholds: Path | None = typer.Option(None, help="Per-region thresholds from `line calibrate` "
                                                      "(with --layout)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="TCP port."),
    audit: str = typer.Option("audit.db", help="Audit trail: an SQLite file path, or a "
                                               "postgresql://user@host:port/db URL."),
    heatmaps: Path | None = typer.Option(None, help="Folder for heatmap PNGs (default: heatmaps/ "
                                                    "beside an SQLite audit file, else ./heatmaps)."),
    token_file: Path | None = typer.Option(None, "--token-file",
                                           help="API tokens, one 'ID TOKEN' a line (or set "
                                                "ANOMALYQC_API_TOKEN / ANOMALYQC_API_TOKEN_FILE)."),
    max_image_bytes: int = typer.Option(20 << 20, help="Largest upload per image, bytes (413 above)."),
    concurrency: int = typer.Option(2, help="Requests scored at once."),
    queue: int = typer.Option(16, help="Requests waiting for a place; more get 503 at once."),
    queue_timeout: float = typer.Option(30.0, help="Seconds a request may wait in the queue (503 after)."),
    reload_poll: float = typer.Option(2.0, help="Seconds between checks of the model files for a "
                                                "change (reload on change); 0 turns it off."),
    threads: int | None = typer.Option(None, help="torch threads (default: torch's choice)."),
    runtime: str = typer.Option("torch", help="torch | onnx | onnx-int8: serve the run's checked "
                                              "ONNX export in ONNX Runtime (`anomalyqc export`)."),
) -> None:
    """Serve a model over HTTP: POST an image (or a strip acquisition) -> score, decision,
    threshold, model id, timings and a heatmap URL; every decision goes to the audit trail
    before it is answered."""
    from anomalyqc.serve.app import ServeSettings, create_app
    from anomalyqc.serve.auth import load_tokens

    def build() -> Any:
        at_least(concurrency, 1, "--concurrency")
        at_least(queue, 0, "--queue")
        at_least(max_image_bytes, 1, "--max-image-bytes")
        if not model.is_dir():
            raise ConfigError(f"--model {model}: not a run folder; give the folder `anomalyqc fit` wrote")
        where = heatmaps
        if where is None:
            pg = audit.startswith(("postgresql://", "postgres://"))
            where = Path("heatmaps") if pg else Path(audit.removeprefix("sqlite:///")).parent / "heatmaps"
        settings = ServeSettings(model=model, audit=audit, tokens=load_tokens(token_file), heatmaps=where,
                                 layout=layout, thresholds=thresholds, max_image_bytes=max_image_bytes,
                                 concurrency=concurrency, queue=queue, queue_timeout_s=queue_timeout,
                                 reload_poll_s=reload_poll, torch_threads=threads,
                                 runtime=runtime)
        return create_app(settings)

    api = _run(build)
    import uvicorn

    console.print(f"serving {model} on http://{host}:{port} (audit: {audit})", highlight=False,
                  soft_wrap=True, markup=False)
    uvicorn.run(api, host=host, port=port, log_level="warning")


@audit_app.command("verify")
def audit_verify(
    db: str = typer.Option(..., "--db", help="The audit trail: SQLite file path or postgresql:// URL."),
    expect_head: str | None = typer.Option(None, help="SEQ:HASH printed by an earlier verify and kept "
                                                      "elsewhere: that row must still be in the chain."),
) -> None:
    """Check the hash chain of the audit trail: exit 0 when every row holds, 1 with the first
    bad row when a row was changed, deleted or inserted."""
    from anomalyqc.serve.audit import verify_audit

    result = _run(lambda: verify_audit(db, expect_head))
    _print_json(result.to_dict())
    if not result.ok:
        console.print(f"audit trail NOT intact: {result.reason}", highlight=False, soft_wrap=True,
                      markup=False)
        raise typer.Exit(1)
    console.print(f"audit trail intact: {result.rows} rows, head {result.head_seq}:{result.head_hash}",
                  highlight=False, soft_wrap=True, markup=False)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
