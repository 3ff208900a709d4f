"""`anomalyqc line calibrate` and `line validate` as library calls (the CLI wraps these)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from anomalyqc import __version__
from anomalyqc.errors import ConfigError
from anomalyqc.fileio import atomic_folder
from anomalyqc.line.decisions import AcceptancePolicy
from anomalyqc.line.inspect import LineModels, inspect_acquisition
from anomalyqc.line.kit import Kit, read_kit
from anomalyqc.line.layout import ProductLayout, load_layout
from anomalyqc.line.rank import KEY_FRAMES, key_frame_indices
from anomalyqc.line.report import (
    EXAMPLES,
    REPORT_HTML,
    REPORT_JSON,
    heatmap_panel,
    write_panel,
    write_report,
)
from anomalyqc.line.thresholds import RegionThresholds, load_thresholds
from anomalyqc.line.validate import build_report, calibrate, check_kit_layout, kit_digest, score_kit
from anomalyqc.progress import Progress
from anomalyqc.workflow import check_output_early, replaceable_output

THRESHOLDS_FILE = "thresholds.json"


def _layout(path: str | Path | None, kit_root: Path) -> ProductLayout:
    return load_layout(path if path is not None else kit_root / "layout.yaml")


def _check_kit(kit: Kit, key_frames: tuple[int, ...], policy: AcceptancePolicy | None) -> None:
    """What can be refused before any image is scored: key frames and runs per strip."""
    key_frame_indices(kit.n_frames, key_frames)
    if policy is not None and (bad := [s for s in kit.strips if len(s.runs) != policy.n]):
        raise ConfigError(
            f"{kit.root}: strip {bad[0].strip_id} has {len(bad[0].runs)} runs but the acceptance "
            f"policy {policy} needs {policy.n}; give --accept K/N with N the runs per strip"
        )


def _models(
    layout: ProductLayout, default: str | Path | None, per_region: Mapping[str, str | Path] | None,
    runtime: str = "torch",
) -> LineModels:
    """The region models, checked against the layout (ROIs included) before any scoring."""
    models = LineModels.from_runs(layout.region_names, default, per_region, runtime)
    models.check_layout(layout)
    return models


def _roi_files(layout: ProductLayout, path: str | Path) -> dict[str, dict[str, str]]:
    """Path and sha256 of each region's ROI mask (a new mask changes an ROI model's scores)."""
    import hashlib

    out = {}
    for r in layout.regions:
        if r.roi is not None:
            p = Path(path).parent / r.roi
            out[r.name] = {"path": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    return out


def _layout_record(layout: ProductLayout, path: str | Path) -> dict[str, Any]:
    return {"path": str(path), "name": layout.name, "roi_masks": _roi_files(layout, path)}


ROI_INFO = "roi_masks_sha256"  # in the thresholds' info: the masks the ROI models were calibrated with


def _roi_used(models: LineModels, layout: ProductLayout, path: str | Path) -> dict[str, str | None]:
    """sha256 of the ROI mask of each region scored by a model that uses ROIs (None: no mask)."""
    files = _roi_files(layout, path)
    uses = {r for d, idx in models.groups() if d.uses_roi for r in (models.regions[i] for i in idx)}
    return {r: files[r]["sha256"] if r in files else None for r in models.regions if r in uses}


def _check_roi_calibration(
    thr: RegionThresholds, models: LineModels, layout: ProductLayout, path: str | Path, source: str | Path
) -> None:
    """Thresholds of an ROI model hold only for the masks they were calibrated with."""
    then = thr.info.get(ROI_INFO)
    if then is None:
        return  # written before masks were recorded
    now = _roi_used(models, layout, path)
    if diff := sorted(r for r in set(now) | set(then) if now.get(r) != then.get(r)):
        raise ConfigError(
            f"{source}: calibrated with other ROI masks for regions {', '.join(diff)} than "
            f"{path} has now; recalibrate with this layout or use the layout it was calibrated with"
        )


def calibrate_line(
    kit_dir: str | Path,
    out_file: str | Path,
    default_model: str | Path | None = None,
    per_region: Mapping[str, str | Path] | None = None,
    layout_path: str | Path | None = None,
    metric: str = "accuracy",
    key_frames: tuple[int, ...] = KEY_FRAMES,
    use_rank: bool = False,
    progress: Progress | None = None,
    runtime: str = "torch",
) -> RegionThresholds:
    """Score a calibration kit and write per-region thresholds to `out_file`."""
    kit = read_kit(kit_dir)
    layout = _layout(layout_path, kit.root)
    check_kit_layout(kit, layout, layout_path or kit.root / "layout.yaml")
    _check_kit(kit, key_frames, None)
    models = _models(layout, default_model, per_region, runtime)
    scores = score_kit(kit, layout, models, key_frames, use_rank, progress)
    thr = calibrate(scores, metric, models, key_frames, use_rank)
    thr.info["layout"] = layout.name
    thr.info[ROI_INFO] = _roi_used(models, layout, layout_path or kit.root / "layout.yaml")
    thr.save(out_file)
    return thr


def _model_records(models: LineModels) -> list[dict[str, Any]]:
    from anomalyqc.models.storage import read_manifest

    out = models.describe()
    for m in out:
        m["files_sha256"] = read_manifest(m["run"]).files if m["run"] else None
    return out


def validate_line(
    kit_dir: str | Path,
    out_dir: str | Path,
    default_model: str | Path | None = None,
    per_region: Mapping[str, str | Path] | None = None,
    layout_path: str | Path | None = None,
    calibration_kit: str | Path | None = None,
    thresholds_file: str | Path | None = None,
    metric: str = "accuracy",
    policy: AcceptancePolicy | None = None,
    budget_ms: float = 500.0,
    key_frames: tuple[int, ...] = KEY_FRAMES,
    use_rank: bool = False,
    max_examples: int = 12,
    progress: Progress | None = None,
    runtime: str = "torch",
) -> dict[str, Any]:
    """Thresholds (calibrated on `calibration_kit`, or read from `thresholds_file`), then the
    validation report of the test kit written to `out_dir` (report.json, report.html,
    thresholds.json, examples/*.png). Returns the report."""
    from anomalyqc.provenance import provenance

    policy = policy or AcceptancePolicy()
    if (calibration_kit is None) == (thresholds_file is None):
        raise ConfigError(
            "give exactly one of --calibration KIT (calibrate here) or --thresholds FILE "
            "(written by `anomalyqc line calibrate`)"
        )
    if budget_ms <= 0:
        raise ConfigError(f"--budget-ms must be > 0, got {budget_ms}")
    out = Path(out_dir)
    report_check = replaceable_output("line validation report", REPORT_JSON)
    check_output_early(out, report_check)  # before minutes of scoring, not after
    kit = read_kit(kit_dir)
    layout = _layout(layout_path, kit.root)
    check_kit_layout(kit, layout, layout_path or kit.root / "layout.yaml")
    _check_kit(kit, key_frames, policy)
    models = _models(layout, default_model, per_region, runtime)
    if thresholds_file is not None:
        thr = load_thresholds(thresholds_file)
        thr.check_models(models.model_ids(), thresholds_file)
        if (thr.key_frames, thr.rank) != (tuple(key_frames), use_rank):
            raise ConfigError(
                f"{thresholds_file}: calibrated with key frames {list(thr.key_frames)} and rank "
                f"{thr.rank}, not {list(key_frames)} and {use_rank}; use the same --key-frames and "
                "--rank/--no-rank, or recalibrate"
            )
        _check_roi_calibration(thr, models, layout, layout_path or kit.root / "layout.yaml", thresholds_file)
    else:
        assert calibration_kit is not None
        cal = read_kit(calibration_kit)
        check_kit_layout(cal, layout, calibration_kit)
        _check_kit(cal, key_frames, None)
        thr = calibrate(
            score_kit(cal, layout, models, key_frames, use_rank, progress),
            metric,
            models,
            key_frames,
            use_rank,
        )
        thr.info["layout"] = layout.name
        thr.info[ROI_INFO] = _roi_used(models, layout, layout_path or kit.root / "layout.yaml")
    scores = score_kit(kit, layout, models, key_frames, use_rank, progress)
    report = build_report(scores, thr, policy, budget_ms)
    # Built aside and swapped in whole: a killed run never leaves a report that looks
    # complete, nor half of a new one over an earlier one.
    with atomic_folder(out, report_check) as tmp:
        thr.save(tmp / THRESHOLDS_FILE)
        panel_frame = key_frames[0] if key_frames else 1  # rank images only: show the first frame
        boxes = layout.boxes()
        for kind in ("false_rejects", "false_accepts"):
            for n, item in enumerate(report["errors"][kind]):
                item["heatmap"] = None
                if n >= max_examples:
                    continue
                strip = kit.strips[scores.acquisitions[item["acquisition"]][0]]
                run = next(r for r in strip.runs if r.run == item["run"])
                frames = run.load_frames()
                res = inspect_acquisition(frames, layout, models, thr, key_frames, use_rank)
                shown = frames[key_frame_indices(len(frames), (panel_frame,))[0] if panel_frame else 0]
                name = f"{EXAMPLES}/{kind}_{strip.strip_id}_run{item['run']:02d}.png"
                write_panel(tmp / name, heatmap_panel(shown, res, boxes))
                item["heatmap"] = name
        report.update(
            {
                "anomalyqc_version": __version__,
                "kit": {
                    "path": str(kit.root.resolve()),
                    "sha256": kit_digest(kit.root),
                    "n_strips": len(kit.strips),
                    "n_frames": kit.n_frames,
                },
                "layout": _layout_record(layout, layout_path or kit.root / "layout.yaml"),
                "models": _model_records(models),
                "thresholds": thr.to_json(),
                "calibration": {
                    "metric": thr.info.get("metric"),
                    "kit": thr.info.get("calibration_kit"),
                    "kit_sha256": thr.info.get("calibration_kit_sha256"),
                    "thresholds_file": str(thresholds_file) if thresholds_file else None,
                },
                "settings": {
                    "key_frames": list(key_frames),
                    "rank": use_rank,
                    "policy": str(policy),
                    "budget_ms": budget_ms,
                },
                "panel_frame": panel_frame,
                "provenance": provenance(),
            }
        )
        write_report(tmp, report)
    json_path, html_path = out / REPORT_JSON, out / REPORT_HTML
    report["report_json"], report["report_html"] = str(json_path), str(html_path)
    return report
