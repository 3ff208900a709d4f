"""Run folders: config.json + weights.safetensors + manifest.json, never pickled.

    run/
      config.json          format, package version, detector name, parameters
      weights.safetensors  tensors only
      manifest.json        SHA-256 of config and weights, the model id, detector, version,
                           input size and channels; written last, so a folder whose files
                           disagree with it was changed, swapped or half-written
      threshold.json       written by `calibrate` (or `evaluate` without one), optional;
                           records the model id it was chosen for; read and written only
                           by anomalyqc.evaluation.threshold_file

`fit` and `merge` write the folder whole (fileio.atomic_folder): built aside, swapped in
when complete, replaced only with --overwrite. Loading checks the files against the
manifest, the manifest's fields and the tensors' shapes against the config.

The model id is the SHA-256 of the config's and the weights' digests: two runs share it only
when both files are byte for byte the same, so a threshold, report or prediction that
records it can always be traced to, and checked against, the model that made it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from anomalyqc import __version__
from anomalyqc.errors import ConfigError, ModelFileError, OutputError
from anomalyqc.fileio import atomic_path, atomic_write_json, file_sha256, recover_if_interrupted

if TYPE_CHECKING:  # models.base imports this module lazily, in save and load
    from anomalyqc.models.base import Detector

FORMAT = "anomalyqc-run"
FORMAT_VERSION = 2  # 2: manifest.json and model ids
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
THRESHOLD_FILE = "threshold.json"
MANIFEST_FORMAT = "anomalyqc-manifest"
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # what the model id covers
MODEL_ID_CHARS = 16  # 64 bits of the SHA-256: enough to tell models apart, short to read


def save_detector(detector: Detector, run_dir: str | Path) -> Path:
    if not detector.fitted:
        raise ConfigError(f"cannot save an unfitted {detector.name}: call fit first")
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in detector.state_tensors().items()}
    with atomic_path(run / WEIGHTS_FILE) as tmp:
        # One metadata key: safetensors writes a map's keys in no fixed order, and the model
        # id needs the same model to give the same bytes.
        try:
            save_file(tensors, tmp, metadata={"format": f"{FORMAT}:{detector.name}"})
        except SafetensorError as exc:
            raise _os_error(exc, tmp) from exc
    atomic_write_json(run / CONFIG_FILE, {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "detector": detector.name,
        "params": detector.config.model_dump(mode="json"),
    })
    detector.model_id = write_manifest(run, detector.input_size,
                                       detector.config.channels).model_id
    return run


def _os_error(exc: SafetensorError, path: Path) -> Exception:
    """safetensors reports a failed write (a full disk) as its own error with the OS error
    number in the text: give it back as the OSError it is, so callers can say what to do."""
    found = re.search(r"os error (\d+)", str(exc))
    if found is None:
        return exc
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


def holds_model(folder: str | Path) -> bool:
    """Whether a folder holds (part of) a saved model."""
    return any(os.path.lexists(Path(folder) / name)
               for name in (CONFIG_FILE, WEIGHTS_FILE, MANIFEST_FILE))


def run_replacement_check(overwrite: bool) -> Callable[[Path], None]:
    """For fileio.atomic_folder: may `fit` or `merge` replace this existing, non-empty folder?

    Only a run folder, and only when asked (--overwrite): the whole folder is replaced, so
    the old model's threshold and reports never sit beside the new model.
    """
    def check(folder: Path) -> None:
        if not holds_model(folder):
            raise OutputError(f"{folder} is not empty and holds no anomalyqc model: refusing to "
                              f"replace it; choose a new or empty folder for --out")
        if not overwrite:
            raise OutputError(f"{folder} already holds a model; pass --overwrite to replace it "
                              f"(its threshold and reports go with it), or choose another --out")
    return check


# ------------------------------------------------------------------------------ identity
def model_id_of(digests: dict[str, str]) -> str:
    """The model id from the SHA-256 digests of MODEL_FILES."""
    joined = "\n".join(f"{name} {digests[name]}" for name in MODEL_FILES)
    return hashlib.sha256(joined.encode()).hexdigest()[:MODEL_ID_CHARS]


@dataclass(frozen=True)
class Manifest:
    """What a run folder holds, as written by `fit` (see the module docstring)."""

    model_id: str
    detector: str
    package_version: str
    input_size: tuple[int, int]
    channels: int | None
    files: dict[str, str]  # file name -> SHA-256
    path: Path


def write_manifest(run_dir: str | Path, input_size: tuple[int, int],
                   channels: int | None) -> Manifest:
    """Seal the run's config and weights as they are on disk now (the last step of a save)."""
    run = Path(run_dir)
    cfg = read_run_config(run)
    digests = {name: file_sha256(run / name) for name in MODEL_FILES}
    manifest = {
        "format": MANIFEST_FORMAT,
        "model_id": model_id_of(digests),
        "detector": str(cfg.get("detector")),
        "package_version": str(cfg.get("package_version")),
        "input_size": [int(v) for v in input_size],
        "channels": channels,
        "files": digests,
    }
    atomic_write_json(run / MANIFEST_FILE, manifest)
    return _manifest_from(manifest, run / MANIFEST_FILE)


def read_manifest(run_dir: str | Path, verify: bool = True) -> Manifest:
    """The run's manifest; verify=True also checks every file against its SHA-256.

    Any disagreement is a ModelFileError naming the file: a model whose config and weights
    do not belong together must never score an image.
    """
    run = Path(run_dir)
    path = run / MANIFEST_FILE
    if not path.is_file():
        raise ModelFileError(f"{path} is missing: the run folder is incomplete (a fit that was "
                             f"stopped, or files copied by hand); retrain or restore the run")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        manifest = _manifest_from(raw, path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
            ValueError) as exc:
        raise ModelFileError(f"{path} is corrupt ({exc}); retrain or restore the run") from None
    if verify:
        for name in MODEL_FILES:
            if name not in manifest.files:
                raise ModelFileError(f"{path} does not list {name}; retrain or restore the run")
            target = run / name
            if not target.is_file():
                raise ModelFileError(f"{target} is missing; the run folder is incomplete: "
                                     f"retrain or restore the run")
            if file_sha256(target) != manifest.files[name]:
                raise ModelFileError(
                    f"{target} does not match {path} (SHA-256 differs): it was edited, "
                    f"corrupted or swapped after `fit` wrote it; retrain or restore the run")
        if model_id_of(manifest.files) != manifest.model_id:
            raise ModelFileError(f"{path} is corrupt (its model id does not match its file "
                                 f"digests); retrain or restore the run")
    return manifest


def _manifest_from(raw: Any, path: Path) -> Manifest:
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"not an anomalyqc manifest (no format {MANIFEST_FORMAT!r})")
    files = raw["files"]
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise ValueError("\"files\" must map file names to SHA-256 digests")
    size = raw["input_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        raise ValueError(f"\"input_size\" is {size!r}, not [height, width]")
    channels = raw["channels"]
    if channels is not None and not isinstance(channels, int):
        raise ValueError(f"\"channels\" is {channels!r}, not an integer")
    return Manifest(str(raw["model_id"]), str(raw["detector"]), str(raw["package_version"]),
                    (size[0], size[1]), channels, dict(files), path)


def run_model_id(run_dir: str | Path) -> str:
    """The verified model id of a run folder."""
    return read_manifest(run_dir).model_id


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    run = Path(run_dir)
    cfg_path = run / CONFIG_FILE
    if not run.is_dir():
        recover_if_interrupted(run)  # a fit killed between its two renames
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
    from anomalyqc.models.validation import check_finite_tensors

    run = Path(run_dir)
    cfg = read_run_config(run)
    weights = run / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelFileError(f"{weights} is missing; the run folder is incomplete: retrain")
    manifest = read_manifest(run)  # first: any edit since the fit is named as one
    det = detector_from_config(cfg, run / CONFIG_FILE)
    cls = type(det)
    _check_manifest_fields(det, manifest)
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
    try:
        det.check_state_tensors(tensors)
    except (ValueError, ConfigError) as exc:
        raise ModelFileError(f"{weights} does not fit {run / CONFIG_FILE}: {exc}; the files "
                             f"were edited or come from different fits: retrain or restore "
                             f"the run") from None
    try:
        det.load_state_tensors(tensors)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{weights} does not hold a valid {cls.name} model ({exc}); "
                             f"retrain or restore the run") from exc
    det.fitted = True
    det.model_id = manifest.model_id
    return det


def detector_from_config(cfg: dict[str, Any], path: Path) -> Detector:
    """An unfitted detector built from a run config's parameters; parameters of the wrong
    type or out of range are a ModelFileError naming the config file."""
    from anomalyqc.models.base import detector_class
    from anomalyqc.models.validation import detector_from_params

    try:
        cls = detector_class(str(cfg.get("detector")))
    except ConfigError as exc:
        raise ModelFileError(f"{path}: {exc}; retrain or restore the run") from None
    params = cfg.get("params")
    det = detector_from_params(cls, {} if params is None else params, path)
    try:
        det.input_size  # noqa: B018  (a size that cannot be read fails here, not at predict)
    except (ConfigError, ValueError, TypeError) as exc:
        detail = " ".join(str(exc).split())
        raise ModelFileError(f"{path} has invalid parameters ({detail}); it was edited or "
                             f"corrupted: retrain or restore the run") from None
    return det


def _check_manifest_fields(det: Detector, manifest: Manifest) -> None:
    """The manifest's description must match the config it seals (both can be rewritten,
    but never one without the other going unnoticed)."""
    found = {"detector": manifest.detector, "input_size": manifest.input_size,
             "channels": manifest.channels}
    want = {"detector": det.name, "input_size": det.input_size,
            "channels": det.config.channels}
    for key, value in want.items():
        if found[key] != value:
            raise ModelFileError(f"{manifest.path} says {key} {found[key]!r} but "
                                 f"{manifest.path.parent / CONFIG_FILE} says {value!r}; the "
                                 f"files were edited: retrain or restore the run")


def tensor(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """Fetch a required tensor with a KeyError that names it."""
    if key not in tensors:
        raise KeyError(f"missing tensor {key!r}")
    return tensors[key]
