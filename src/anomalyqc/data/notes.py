"""Warnings about input that is read but looks odd, each kind said once per dataset or run.

A folder of 10,000 RGB images scored by a gray model needs one line, not 10,000. Each
ImageTransform (one per dataset, one per predict run) carries an InputNotes; the dataset,
the reader and the transform report through it. They are Python warnings of category
DataWarning, so a library user filters them as usual and the CLI prints them as
`warning: ...` lines. With DataLoader workers each worker process says each kind once.
"""

from __future__ import annotations

import warnings

from anomalyqc.errors import DataWarning


class InputNotes:
    """Emits each kind of DataWarning at most once."""

    def __init__(self) -> None:
        self.said: set[str] = set()

    def warn(self, kind: str, message: str) -> None:
        """Warn with `message` unless a warning of this `kind` was already given."""
        if kind in self.said:
            return
        self.said.add(kind)
        warnings.warn(f"{message} (said once, not per image)", DataWarning, stacklevel=3)
