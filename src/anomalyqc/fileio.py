"""Atomic file writes: a crash or a full disk never leaves half a file where a good one was.

Every file the package writes goes through `atomic_path` (directly, or through
atomic_write_bytes / atomic_write_json / atomic_write_png): the content is written to a
temporary file in the target's folder, flushed to disk, renamed over the target
(os.replace, atomic on POSIX) and the folder entry is flushed too. The temporary file is
created with mode 0666 filtered by the process umask, like any file `open(path, "w")`
creates, so run folders and reports are readable by whoever the user's umask allows
(tempfile.mkstemp would make them 0600).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from anomalyqc.errors import DataError
from anomalyqc.pathtext import fit_name


def _new_temp(folder: Path, name: str) -> Path:
    """Create an empty, new temporary file beside the target; the umask sets its mode."""
    for _ in range(100):
        # cut so that a target name of up to 255 bytes still gets a creatable temporary name
        tmp = folder / fit_name(f".{name}", f".{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file in {folder}")  # pragma: no cover


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable; some filesystems cannot fsync a folder, which is harmless."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platform without folder handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to; on success it replaces `path`.

    For writers that want a file name (safetensors, cv2). If the block raises, the
    temporary file is removed and the previous `path` (if any) is left untouched.
    durable=False skips the two fsyncs: the rename still never shows a half-written file
    after a crash of this process, but a power cut may lose the file. Only for output that
    can be regenerated exactly (the synthetic generator writes thousands of small files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(path.parent, path.name)
    umask_mode = stat.S_IMODE(tmp.stat().st_mode)
    try:
        yield tmp
        # Some writers replace the file they are given (safetensors makes it 0600).
        if stat.S_IMODE(tmp.stat().st_mode) != umask_mode:
            os.chmod(tmp, umask_mode)
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> None:
    """Write `data` to `path` atomically (see atomic_path)."""
    with atomic_path(path, durable) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def json_safe(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by None: strict JSON has no NaN, and
    a bare NaN in a file makes most readers other than Python's fail on the whole file."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Indented, strict JSON (non-finite floats as null) with sorted keys, so that reruns
    diff cleanly."""
    text = json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_png(path: str | Path, image: np.ndarray, durable: bool = True) -> None:
    """Encode an (H, W) or (H, W, 3) BGR uint8 array as PNG and write it atomically."""
    import cv2

    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise DataError(f"{path}: could not encode the image as PNG")
    atomic_write_bytes(path, buf.tobytes(), durable)
