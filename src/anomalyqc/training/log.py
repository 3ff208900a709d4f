"""The training log: one CSV row per logged interval and per validation, optionally mirrored
to TensorBoard.

Columns: epoch, step, phase (train/val), each loss, each optimizer's learning rate
(lr_<name>), seconds since the run started. A new loss name extends the header: the file is
then rewritten atomically. Rows are appended otherwise (and flushed, so a killed run keeps
them). A checkpoint records how many rows the log had; a resumed run first cuts the log back
to those rows, so the rows of the lost steps are not doubled.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from anomalyqc.errors import ConfigError, DataError
from anomalyqc.fileio import atomic_write_bytes

FIXED = ["epoch", "step", "phase"]
TIMES = ("seconds", "cpu_seconds")  # clocks, not curves


def _text(value: Any) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class CsvLog:
    """Append-only CSV with a header that may grow. Disabled (writes nothing) on ranks > 0."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        self.columns: list[str] = []
        self.rows = 0

    def start(self, rows: int = 0, columns: list[str] | None = None) -> None:
        """Begin a new log, or (rows > 0) keep the first `rows` rows of the existing one."""
        self.rows, self.columns = 0, list(columns or [])
        if not self.enabled:
            self.rows = rows
            return
        kept: list[dict[str, str]] = []
        if rows:
            kept = read_log(self.path)[:rows]
            if len(kept) < rows:
                raise DataError(f"{self.path}: has {len(kept)} rows but the checkpoint counted "
                                f"{rows}; the log was changed since")
        self._rewrite(kept)

    def append(self, row: dict[str, Any]) -> None:
        new = [k for k in row if k not in self.columns]
        if not self.enabled:
            self.columns += new
            self.rows += 1
            return
        if new or not self.path.exists():
            self.columns += new
            self._rewrite([*read_log(self.path)[: self.rows], {k: _text(v) for k, v in row.items()}])
            return
        buf = io.StringIO()
        csv.DictWriter(buf, self.columns, lineterminator="\n").writerow(
            {k: _text(v) for k, v in row.items()})
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, buf.getvalue().encode("utf-8"))
        finally:
            os.close(fd)
        self.rows += 1

    def sync(self) -> None:
        """Flush the rows to disk (before a checkpoint records their count)."""
        if self.enabled and self.path.exists():
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.path, buf.getvalue().encode("utf-8"))
        self.rows = len(rows)


def read_log(path: Path) -> list[dict[str, str]]:
    """The log's rows (complete lines only: a row cut by a kill is dropped)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return list(csv.DictReader(io.StringIO(text)))


class TensorBoard:
    """Scalars to TensorBoard, when asked for and installed."""

    def __init__(self, folder: Path) -> None:
        self.check()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    @staticmethod
    def check() -> None:
        """ConfigError when the tensorboard package is missing (it is optional)."""
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("tensorboard=True needs the tensorboard package: pip install "
                              "tensorboard (or leave tensorboard off; the CSV log has the same "
                              "numbers)") from None

    def append(self, row: dict[str, Any]) -> None:
        for k, v in row.items():
            if k not in (*FIXED, *TIMES) and isinstance(v, float):
                self.writer.add_scalar(f"{row['phase']}/{k}", v, int(row["step"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
