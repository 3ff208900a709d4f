"""User-facing errors: each names the file at fault and what to do about it.

The CLI prints these as one line (no traceback); anything else is a bug.
"""

from __future__ import annotations


class AnomalyQCError(Exception):
    """Base class for errors caused by input the user can fix."""


class DataError(AnomalyQCError):
    """An image, mask or dataset folder is unreadable or laid out wrongly."""


class ModelFileError(AnomalyQCError):
    """A run folder is missing, corrupt, or written by an incompatible version."""


class CalibrationError(AnomalyQCError):
    """Threshold fitting or evaluation got data it cannot use (e.g. a single class)."""


class ConfigError(AnomalyQCError):
    """An option has a value that cannot work."""


class OutputError(AnomalyQCError):
    """An output folder cannot be written: no space, read-only, no permission, another writer
    busy with it, or a folder that holds something else.

    `errno` keeps the operating system's error number when there was one, so a caller that
    knows the folder being written can name it instead of a temporary file inside it.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class DataWarning(UserWarning):
    """Input that is read, but in a way the user should know about (a channel conversion, a
    strong stretch, 12-bit data in 16-bit files). The CLI prints each as one line."""
