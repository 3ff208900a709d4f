"""The model the service runs, and its hot reload.

A `LoadedModel` is built completely (weights read and checked, threshold and line thresholds
read and matched to the model, one warm-up forward pass) before it is published; publishing
is a single reference assignment, so a request sees the old model or the new one, never a
mix. A request takes the reference once at its start and uses it to the end: a reload in the
middle of a request does not change the model that request is scored by. A failed load
leaves the old model in place and keeps the reason (`ModelHolder.last_error`).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from anomalyqc.data.transforms import ImageTransform, as_hw
from anomalyqc.errors import AnomalyQCError, ConfigError
from anomalyqc.models.base import Detector


@dataclass(frozen=True)
class LoadedModel:
    run: Path
    detector: Detector
    model_id: str
    threshold: float | None  # None: the run is not calibrated (no decision is "good")
    transform: ImageTransform
    loaded_at: float
    layout: Any = None  # line.layout.ProductLayout
    line_models: Any = None  # line.inspect.LineModels
    line_thresholds: Any = None  # line.thresholds.RegionThresholds

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "run": str(self.run), "model_id": self.model_id, "detector": self.detector.name,
            "threshold": self.threshold, "calibrated": self.threshold is not None,
            "input_size": list(as_hw(self.detector.config.image_size)),
            "channels": self.detector.config.channels,
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
        }
        if self.layout is not None:
            out["layout"] = self.layout.name
            out["line_thresholds"] = None if self.line_thresholds is None else self.line_thresholds.as_dict()
        return out


def load_model(run: str | Path, layout: str | Path | None = None,
               thresholds: str | Path | None = None, runtime: str = "torch") -> LoadedModel:
    """Everything a request needs, loaded and checked; raises AnomalyQCError on any fault.
    runtime "onnx" serves the run's checked ONNX export (workflow.load_for_inference)."""
    from anomalyqc.workflow import load_for_inference, load_threshold, transform_for

    run = Path(run)
    det = load_for_inference(run, runtime)
    if det.needs_roi and layout is None:
        raise ConfigError(f"{run}: this {det.name} model was trained with ROIs and needs one per image, "
                          "which a single-image request does not carry; serve it with --layout (the "
                          "layout's region ROIs)")
    model_id = det.model_id or ""
    threshold = load_threshold(run, model_id)
    tf = transform_for(det)
    line_layout = line_models = line_thr = None
    if thresholds is not None and layout is None:
        raise ConfigError("--thresholds are per region of a layout: give --layout as well")
    if layout is not None:
        from anomalyqc.line.inspect import LineModels
        from anomalyqc.line.layout import load_layout
        from anomalyqc.line.thresholds import load_thresholds

        line_layout = load_layout(layout)
        line_models = LineModels.shared(det, line_layout.region_names, str(run))
        line_models.check_layout(line_layout)
        if thresholds is not None:
            line_thr = load_thresholds(thresholds)
            line_thr.check_models(line_models.model_ids(), thresholds)
            if line_thr.regions != line_layout.region_names:
                raise ConfigError(f"{thresholds}: thresholds are for regions {line_thr.regions}, layout "
                                  f"{line_layout.name!r} has {line_layout.region_names}")
    if not det.needs_roi:  # warm-up: a model that cannot run is refused here, not on a request
        h, w = tf.output_size
        with torch.inference_mode():
            det.predict(torch.zeros(1, det.config.channels or 3, h, w))
    return LoadedModel(run, det, model_id, threshold, tf, time.time(), line_layout, line_models, line_thr)


def _stat_key(path: Path | None) -> tuple[Any, ...]:
    if path is None:
        return ()
    try:
        st = os.stat(path)
    except OSError:
        return (str(path), None)
    return (str(path), st.st_ino, st.st_mtime_ns, st.st_size)


class ModelHolder:
    """The published model, the paths it comes from, and reloads (one at a time)."""

    def __init__(self, run: str | Path, layout: str | Path | None = None,
                 thresholds: str | Path | None = None, runtime: str = "torch") -> None:
        self.run = Path(run)
        self.runtime = runtime
        self.layout = Path(layout) if layout is not None else None
        self.thresholds = Path(thresholds) if thresholds is not None else None
        self.current: LoadedModel | None = None
        self.last_error: str | None = None
        self.loads = 0
        self._reload_lock = threading.Lock()
        self._seen: tuple[Any, ...] | None = None

    def fingerprint(self) -> tuple[Any, ...]:
        """What changes when a model file is replaced: the run folder itself (fit --overwrite
        swaps it whole), its manifest and threshold, the layout and the thresholds file."""
        from anomalyqc.models.storage import MANIFEST_FILE, THRESHOLD_FILE

        real = self.run.resolve()
        return (_stat_key(real), _stat_key(real / MANIFEST_FILE), _stat_key(real / THRESHOLD_FILE),
                _stat_key(self.layout), _stat_key(self.thresholds))

    def reload(self, run: str | Path | None = None) -> tuple[bool, str | None]:
        """Load (the configured run, or `run`) fully, then publish it. (True, None) on success;
        (False, reason) with the old model still published on failure."""
        with self._reload_lock:
            target = Path(run) if run is not None else self.run
            seen = self.fingerprint()
            try:
                loaded = load_model(target, self.layout, self.thresholds, self.runtime)
            except AnomalyQCError as exc:
                self.last_error = str(exc)
                self._seen = seen  # do not retry the same broken files on every poll
                return False, self.last_error
            except Exception as exc:  # noqa: BLE001 - any fault in a new model keeps the old one
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._seen = seen
                return False, self.last_error
            self.current = loaded  # one assignment: the swap
            self.run = target
            self._seen = self.fingerprint() if run is not None else seen
            self.last_error = None
            self.loads += 1
            return True, None

    def changed(self) -> bool:
        return self._seen is not None and self.fingerprint() != self._seen
