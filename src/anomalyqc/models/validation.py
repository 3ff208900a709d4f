"""Checks on what a detector is built or loaded from: parameters in one line a user can act
on, and weights that hold only finite numbers (a NaN in a model makes every score NaN).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError

from anomalyqc.errors import ConfigError, ModelFileError

if TYPE_CHECKING:  # models.base imports this module
    from anomalyqc.models.base import Detector

_RULES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "literal_error": "must be one of {expected}",
    "finite_number": "must be a finite number",
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parameter_error(detector: str, fields: Iterable[str], exc: ValidationError) -> ConfigError:
    """One line per pydantic error, joined: the parameter, its value and what it accepts."""
    parts: list[str] = []
    for err in exc.errors():
        key = str(err["loc"][0]) if err["loc"] else ""
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown parameter {key!r} (valid parameters: "
                         f"{', '.join(sorted(fields))})")
            continue
        rule = _RULES.get(err["type"])
        if rule is not None:
            rule = rule.format(**(err.get("ctx") or {}))
        else:
            rule = str(err["msg"]).removeprefix("Value error, ")
            rule = rule.replace("Input should be", "must be")
        parts.append(f"{key}={_short(err.get('input'))}: {rule}" if key else rule)
    return ConfigError(f"invalid {detector} parameters: {'; '.join(parts)}")


def detector_from_params(cls: type[Detector], params: Any, config_file: Path) -> Detector:
    """The detector a run's config.json describes; bad parameters name that file."""
    if not isinstance(params, dict):
        raise ModelFileError(f"{config_file} is corrupt (\"params\" is "
                             f"{type(params).__name__}, not an object); retrain or restore "
                             f"the run")
    try:
        return cls(params)
    except ConfigError as exc:
        raise ModelFileError(f"{config_file} holds parameters this version refuses ({exc}); "
                             f"retrain or restore the run") from None


def check_finite_tensors(tensors: dict[str, torch.Tensor], weights_file: Path) -> None:
    """Refuse weights with a NaN or infinite value in any float tensor, naming the tensor."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            continue
        bad = sum(int((~torch.isfinite(part)).sum())  # in chunks: no full-size bool copy
                  for part in t.reshape(-1).split(1 << 24))
        if bad:
            raise ModelFileError(f"{weights_file} is corrupt: tensor {name!r} holds {bad} NaN "
                                 f"or infinite values, which would make every score NaN; "
                                 f"retrain or restore the run")
