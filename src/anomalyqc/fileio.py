"""Atomic file writes: a crash or a full disk never leaves half a file where a good one was.

Every file the package writes goes through `atomic_path` (directly, or through
atomic_write_bytes / atomic_write_json / atomic_write_png): the content is written to a
temporary file in the target's folder, flushed to disk, renamed over the target
(os.replace, atomic on POSIX) and the folder entry is flushed too. The temporary file is
created with mode 0666 filtered by the process umask, like any file `open(path, "w")`
creates, so run folders and reports are readable by whoever the user's umask allows
(tempfile.mkstemp would make them 0600).

Folders that are written as a whole (a run folder, a report, a predictions folder) go
through `atomic_folder`: built in a hidden temporary sibling and swapped in once complete,
under a lock that keeps a second writer out (see atomic_folder).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from anomalyqc.errors import DataError, OutputError
from anomalyqc.pathtext import fit_name


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in chunks (model files can be large)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


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


# --------------------------------------------------------------------------- disk errors
# What the operating system says when an output cannot be written, and what the user can do.
DISK_ERRNOS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free some space or write elsewhere"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or write elsewhere"),
    errno.EROFS: ("read-only file system", "choose a folder you can write to"),
    errno.EACCES: ("permission denied", "choose a folder you can write to"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write to"),
}


def disk_error(exc: BaseException, target: str | Path, outcome: str = "") -> OutputError | None:
    """A one-line OutputError for a write that failed for want of space or permission
    (None for any other error), naming `target` rather than a temporary file inside it."""
    code = exc.errno if isinstance(exc, (OSError, OutputError)) else None
    if code not in DISK_ERRNOS:
        return None
    reason, fix = DISK_ERRNOS[code]
    return OutputError(f"cannot write {target}: {reason}; {fix}{outcome}", code)


# ------------------------------------------------------------------------------- folders
def _sibling_key(path: Path) -> str:
    """The name part of path's hidden siblings; long names are shortened with a hash so that
    '.NAME.tmp-XXXXXXXXXXXX' stays within the 255-byte limit of a file name."""
    name = path.name
    if len(os.fsencode(name)) <= 100:
        return name
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    return os.fsdecode(os.fsencode(name)[:60]) + "-" + digest


def _siblings(path: Path, kind: str) -> list[Path]:
    prefix = f".{_sibling_key(path)}.{kind}-"
    try:
        return sorted(p for p in path.parent.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def folder_lock(path: str | Path) -> Iterator[None]:
    """Hold the write lock of `path` (a lock file beside it), or fail at once with an
    OutputError when another process holds it.

    flock locks belong to the open file: the kernel drops them when the process ends, even
    on kill -9, so a crashed writer never leaves the folder locked. The lock file is removed
    on release; a writer that finds the file replaced after locking it tries again.
    """
    path = Path(path)
    lock = path.parent / f".{_sibling_key(path)}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"{path} is being written by another anomalyqc process (it holds "
                              f"{lock}); wait for it to finish or write elsewhere") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder before us removed the file: lock the new one
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def recover_folder(path: str | Path) -> None:
    """Finish or undo a swap that a killed process left half-done, and remove the temporary
    siblings that killed or failed writers left. Call it holding folder_lock(path).

    A swap renames the complete new folder to .NAME.new-*, the old one to .NAME.old-*, then
    the new one to NAME: if NAME is missing, the newest complete .new-* (else the .old-*)
    becomes NAME again; every other sibling is stale, since no live writer owns it.
    """
    path = Path(path)
    if not os.path.lexists(path):
        for kind in ("new", "old"):
            found = sorted(_siblings(path, kind), key=lambda p: p.stat().st_mtime)
            if found:
                os.rename(found[-1], path)
                break
    for kind in ("tmp", "new", "old"):
        for stale in _siblings(path, kind):
            _remove(stale)


def recover_if_interrupted(path: str | Path) -> bool:
    """For readers: when `path` is missing because a writer was killed in the middle of its
    swap, put the complete folder back (under the lock, as a writer would); True if done."""
    path = Path(os.path.abspath(path))
    if os.path.lexists(path) or not (_siblings(path, "new") or _siblings(path, "old")):
        return False
    try:
        with folder_lock(path):
            recover_folder(path)
    except (OSError, OutputError):  # a live writer holds it, or the folder is read-only
        return False
    return os.path.lexists(path)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    C library, kernel or file system cannot, and the caller falls back to two renames."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_tree(folder: Path) -> None:
    for root, _dirs, _files in os.walk(folder):
        _fsync_dir(Path(root))


@contextmanager
def atomic_folder(path: str | Path,
                  check_existing: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder to build `path`'s new content in; on success the
    complete folder replaces `path`, so a reader never sees a half-written one and a
    killed, failed or out-of-space run leaves the previous `path` as it was.

    The temporary folder is a hidden sibling (.NAME.tmp-*), on the same file system, so the
    swap is a rename. Everything runs under folder_lock(path): a second writer is refused,
    and the temporaries of writers killed earlier are cleaned up (recover_folder) first.
    When `path` exists and is not empty, `check_existing(path)` decides whether it may be
    replaced (raise to refuse); without it, it may. A failure to write for want of space or
    permission is an OutputError naming `path`.
    """
    path = Path(os.path.abspath(path))  # "." or "out/.." have no usable name or sibling
    if path.parent == path:
        raise OutputError(f"{path} cannot be written as a whole; choose a folder inside it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with folder_lock(path):
            recover_folder(path)
            if os.path.lexists(path) and not path.is_dir():
                raise OutputError(f"{path} exists and is not a folder; choose a folder name")
            if path.is_dir() and any(path.iterdir()) and check_existing is not None:
                check_existing(path)
            key = _sibling_key(path)
            tmp = path.parent / f".{key}.tmp-{secrets.token_hex(6)}"
            os.mkdir(tmp)  # mode 0777 less the umask, like any folder the user makes
            try:
                yield tmp
                _fsync_tree(tmp)
                old = None
                if path.is_dir() and _exchange(tmp, path):
                    # one atomic step: `path` is never missing, and `tmp` now holds the
                    # old content, which a recovery removes like any temporary
                    old = tmp
                else:
                    new = path.parent / f".{key}.new-{secrets.token_hex(6)}"
                    os.rename(tmp, new)  # complete: from here on a recovery keeps it
                    if path.is_dir():
                        old = path.parent / f".{key}.old-{secrets.token_hex(6)}"
                        os.rename(path, old)
                    os.rename(new, path)
                _fsync_dir(path.parent)
            except BaseException:
                _remove(tmp)
                try:  # a failed swap: put back a complete folder (recover_folder says which)
                    recover_folder(path)
                except OSError:  # pragma: no cover - the original error matters more
                    pass
                raise
            if old is not None:
                _remove(old)
    except (OSError, OutputError) as exc:
        err = None if _elsewhere(exc, path) else \
            disk_error(exc, path, f" ({path} was left as it was)")
        if err is None:
            raise
        raise err from None


def _elsewhere(exc: OSError | OutputError, path: Path) -> bool:
    """Whether the error names a file outside path's folder (an input image that cannot be
    read, a temporary file on another file system): that file, not `path`, is at fault."""
    name = exc.filename if isinstance(exc, OSError) else None
    if name is None:
        return False
    where = Path(os.fsdecode(name)).absolute()
    folder = path.parent.absolute()
    return where != folder and folder not in where.parents


def prepare_generated_folder(out: Path, entries: tuple[str, ...], ours: bool, what: str) -> None:
    """Make `out` ready for a generator: refuse a file or a foreign non-empty folder (ours:
    the folder holds this generator's earlier output), and clear only the entries the
    generator writes, so a regenerated set never mixes with the last one."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another output folder")
    if out.exists() and any(out.iterdir()):
        if not ours:
            raise DataError(f"{out}: folder is not empty and is not {what}; choose an empty "
                            f"or new folder")
        for name in entries:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
