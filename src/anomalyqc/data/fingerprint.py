"""A content hash of the files a command read, so a report can say which data it was.

data_sha256 is the SHA-256 of one line per image read, sorted by path relative to the
dataset root: `<relative path bytes> NUL <SHA-256 of the file's bytes> LF`. The relative
path carries the split and type folder, so the hash covers the labels too. It changes when
any image read is edited, added, removed or renamed, and not when the folder is moved or
copied elsewhere, nor when files that were not read change (a readme, a skipped entry).
Masks and ROIs are hashed separately (annotations_sha256): `calibrate` never reads masks,
and its threshold's data hash must be comparable with the hash `evaluate` reports.
File contents rather than sizes and mtimes, because a copy keeps neither mtime reliably
and an edit can keep the size; see the README for its cost.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from anomalyqc.data.layouts import Record
from anomalyqc.errors import DataError
from anomalyqc.pathtext import display


def _file_digest(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError as exc:
        raise DataError(f"cannot read {display(path)} to hash it ({exc.strerror or exc}); "
                        "check the file") from None


def _hash_files(paths: Iterable[Path], root: str | Path) -> str:
    root = Path(os.path.abspath(root))  # not resolve(): a symlinked file keeps its own path
    lines = []
    for path in paths:
        full = Path(os.path.abspath(path))
        try:
            rel = os.fsencode(full.relative_to(root))
        except ValueError:  # records from elsewhere: the absolute path
            rel = os.fsencode(full)
        lines.append(rel + b"\0" + _file_digest(full).encode() + b"\n")
    return hashlib.sha256(b"".join(sorted(lines))).hexdigest()


def data_sha256(records: Iterable[Record], root: str | Path) -> str:
    """The content hash of the records' images (see the module docstring)."""
    return _hash_files((r.path for r in records), root)


def annotations_sha256(records: Iterable[Record], root: str | Path) -> str | None:
    """The content hash of the records' masks and ROIs, or None when there are none."""
    files = [p for r in records for p in (r.mask_path, r.roi_path) if p is not None]
    return _hash_files(files, root) if files else None
