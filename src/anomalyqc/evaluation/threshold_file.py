"""The run's threshold.json: the only reader and writer of that file.

    {"image": ThresholdChoice fields, "data": absolute path of the data that chose it,
     "data_sha256": content hash of its images (anomalyqc.data.fingerprint),
     "written_by": "calibrate" | "evaluate", "model_id": the id of the model it was chosen for}

A threshold belongs to the model whose scores chose it: reading it for a model with another
id (the run was refitted) or without an id (written before ids existed) is refused, with both
ids and the command that chooses a new one, never applied to scores of another scale.

A file that is not valid JSON, lacks a field or has a field of the wrong type is a
ModelFileError naming the file and the fix, never a traceback: the file is small and
people do edit it by hand.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomalyqc.errors import ModelFileError
from anomalyqc.evaluation.thresholds import ThresholdChoice
from anomalyqc.fileio import atomic_write_json
from anomalyqc.models.storage import THRESHOLD_FILE
from anomalyqc.pathtext import display

WRITERS = ("calibrate", "evaluate")


@dataclass
class StoredThreshold:
    """A run's decision threshold, with the data that chose it and the command that did."""

    choice: ThresholdChoice
    data: str
    written_by: str | None  # None in files written before the field existed
    path: Path
    model_id: str
    data_sha256: str | None = None  # None in files written before the field existed

    @property
    def value(self) -> float:
        return self.choice.value

    def describe(self) -> str:
        """Where the threshold came from, for threshold_source in metrics."""
        by = f" by `anomalyqc {self.written_by}`" if self.written_by else ""
        return f"from {self.path}, chosen{by} on {self.data} for model {self.model_id}"


def threshold_path(run: str | Path) -> Path:
    return Path(run) / THRESHOLD_FILE


def write_threshold(run: str | Path, choice: ThresholdChoice, data: str | Path,
                    written_by: str, model_id: str,
                    data_sha256: str | None = None) -> StoredThreshold:
    """Store `choice`, made on the scores of model `model_id`, in the run (atomically);
    `data` is recorded as an absolute path, with the content hash of its images when given."""
    if written_by not in WRITERS:
        raise ValueError(f"written_by must be one of {WRITERS}, got {written_by!r}")
    if not model_id:
        raise ValueError("a threshold needs the id of the model whose scores chose it")
    path = threshold_path(run)
    stored = StoredThreshold(choice, display(Path(data).resolve()), written_by, path, model_id,
                             data_sha256)
    atomic_write_json(path, {"image": choice.to_dict(), "data": stored.data,
                             "data_sha256": data_sha256, "written_by": written_by,
                             "model_id": model_id})
    return stored


def read_threshold(run: str | Path, model_id: str) -> StoredThreshold | None:
    """The run's stored threshold, or None when it has none; refused (ModelFileError) when
    it was chosen for a model other than `model_id`, the loaded model's id."""
    path = threshold_path(run)
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise _corrupt(path, f"expected a JSON object, got {type(raw).__name__}")
    image = raw.get("image")
    if not isinstance(image, dict):
        raise _corrupt(path, "no \"image\" object")
    if not _is_number(image.get("value")) or not math.isfinite(float(image["value"])):
        raise _corrupt(path, f"\"image\".\"value\" is {image.get('value')!r}, not a finite number")
    try:
        choice = ThresholdChoice.from_dict(image)
    except ModelFileError as exc:
        raise _corrupt(path, str(exc).split(";")[0]) from None
    data = raw.get("data")
    if not isinstance(data, str):
        raise _corrupt(path, f"\"data\" is {data!r}, not a path")
    written_by = raw.get("written_by")
    if written_by is not None and written_by not in WRITERS:
        raise _corrupt(path, f"\"written_by\" is {written_by!r}, not one of {', '.join(WRITERS)}")
    digest = raw.get("data_sha256")
    if digest is not None and not isinstance(digest, str):
        raise _corrupt(path, f"\"data_sha256\" is {digest!r}, not a hex digest")
    made_for = raw.get("model_id")
    if made_for != model_id:
        made = (f"was chosen for model {made_for}" if isinstance(made_for, str) and made_for
                else "records no model id (written before thresholds named their model)")
        raise ModelFileError(
            f"{path} {made}, but the run's model is {model_id} (refitted since?): its "
            f"scores may live on another scale; choose a threshold for this model with "
            f"`anomalyqc calibrate {path.parent} --data VALIDATION_DIR`")
    return StoredThreshold(choice, data, written_by, path, model_id, digest)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _corrupt(path: Path, detail: str) -> ModelFileError:
    return ModelFileError(
        f"{path} is corrupt ({detail}); write a new one with `anomalyqc calibrate "
        f"{path.parent} --data VALIDATION_DIR`, or delete it"
    )
