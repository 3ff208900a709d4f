"""Run folders: config.json + weights.safetensors, written atomically, never pickled.

    run/
      config.json          format, package version, detector name, parameters
      weights.safetensors  tensors only
      threshold.json       written by `calibrate` (or `evaluate` without one), optional;
                           read and written only by anomalyqc.evaluation.threshold_file
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from anomalyqc import __version__
from anomalyqc.errors import ConfigError, ModelFileError
from anomalyqc.fileio import atomic_path, atomic_write_json

if TYPE_CHECKING:  # models.base imports this module lazily, in save and load
    from anomalyqc.models.base import Detector

FORMAT = "anomalyqc-run"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
THRESHOLD_FILE = "threshold.json"


def save_detector(detector: Detector, run_dir: str | Path) -> Path:
    if not detector.fitted:
        raise ConfigError(f"cannot save an unfitted {detector.name}: call fit first")
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in detector.state_tensors().items()}
    with atomic_path(run / WEIGHTS_FILE) as tmp:
        save_file(tensors, tmp, metadata={"format": FORMAT, "detector": detector.name})
    atomic_write_json(run / CONFIG_FILE, {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "detector": detector.name,
        "params": detector.config.model_dump(mode="json"),
    })
    return run


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    run = Path(run_dir)
    cfg_path = run / CONFIG_FILE
    if not run.is_dir():
        raise ModelFileError(f"run folder {run} does not exist; pass the --out folder of "
                             f"`anomalyqc fit`")
    if not cfg_path.is_file():
        raise ModelFileError(f"{cfg_path} is missing: {run} is not an anomalyqc run folder "
                             f"(train one with `anomalyqc fit`)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{cfg_path} is corrupt ({exc}); retrain or restore the run") from exc
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise ModelFileError(f"{cfg_path} is not an anomalyqc run config (no format "
                             f"{FORMAT!r}); was it written by another tool?")
    version = cfg.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"{cfg_path} has run format version {version} (written by anomalyqc "
            f"{cfg.get('package_version', '?')}); this anomalyqc {__version__} reads version "
            f"{FORMAT_VERSION}: retrain the model with this version or use the matching release")
    return cfg


# Tensors only a merge needs (moments, K-Means sums): as large as the model itself for
# PaDiM, so predicting never reads them.
MERGE_STATE_PREFIXES = ("moments.", "kmeans.")


def load_detector(run_dir: str | Path, merge_state: bool = False) -> Detector:
    """The detector saved in a run folder; merge_state=True also reads what `merge` needs."""
    from anomalyqc.models.base import detector_class
    from anomalyqc.models.validation import check_finite_tensors, detector_from_params

    run = Path(run_dir)
    cfg = read_run_config(run)
    cls = detector_class(str(cfg.get("detector")))
    weights = run / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelFileError(f"{weights} is missing; the run folder is incomplete: retrain")
    try:
        if merge_state:
            tensors = load_file(weights)
        else:
            with safe_open(str(weights), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()
                           if not k.startswith(MERGE_STATE_PREFIXES)}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{weights} is corrupt or not a safetensors file ({exc}); "
                             f"retrain or restore the run") from exc
    check_finite_tensors(tensors, weights)
    det = detector_from_params(cls, cfg.get("params", {}), run / CONFIG_FILE)
    try:
        det.load_state_tensors(tensors)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{weights} does not hold a valid {cls.name} model ({exc}); "
                             f"retrain or restore the run") from exc
    det.fitted = True
    return det


def tensor(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """Fetch a required tensor with a KeyError that names it."""
    if key not in tensors:
        raise KeyError(f"missing tensor {key!r}")
    return tensors[key]
