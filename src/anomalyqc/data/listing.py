"""What a folder holds, entry by entry, and why each entry that is not an image was skipped.

Listing a folder never opens a file, so a FIFO or a device named like an image cannot block
it; symlinks are followed once with stat, so a dangling link or a loop is reported as such
instead of vanishing from the count. Callers (the dataset layouts, `predict`'s input
expansion) decide which of the non-image entries matter and record them as Skipped, which
every report and the CLI then show: nothing is left out of an evaluation without saying so.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomalyqc.data.io import IMAGE_EXTENSIONS
from anomalyqc.errors import DataError
from anomalyqc.pathtext import display

SUPPORTED = " ".join(sorted(IMAGE_EXTENSIONS))


@dataclass(frozen=True)
class Skipped:
    """An entry that was not read, and why."""

    path: Path
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": display(self.path), "reason": self.reason}

    def __str__(self) -> str:
        return f"{display(self.path)} ({self.reason})"


@dataclass
class Entry:
    """One folder entry: kind is 'image', 'folder', 'file' (regular, not an image
    extension), 'hidden' or 'broken' (not a regular file or folder: reason says what)."""

    path: Path
    kind: str
    reason: str = ""

    @property
    def named_like_image(self) -> bool:
        return self.path.suffix.lower() in IMAGE_EXTENSIONS


@dataclass
class FolderScan:
    """A folder's entries sorted by name and sorted into kinds."""

    folder: Path
    entries: list[Entry] = field(default_factory=list)

    def of(self, *kinds: str) -> list[Entry]:
        return [e for e in self.entries if e.kind in kinds]

    @property
    def images(self) -> list[Path]:
        return [e.path for e in self.of("image")]

    @property
    def folders(self) -> list[Path]:
        return [e.path for e in self.of("folder")]


def classify(path: Path, hidden: bool = True) -> Entry:
    """What `path` is, following a symlink once; never opens it. hidden=False for a path
    named explicitly (a user's `.` or `../x.png` is not a hidden entry)."""
    if hidden and path.name.startswith("."):
        return Entry(path, "hidden", "hidden " + ("folder" if path.is_dir() else "file"))
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return Entry(path, "broken", "symlink loop")
        if os.path.islink(path):
            return Entry(path, "broken", f"dangling symlink (to {display(os.readlink(path))})")
        return Entry(path, "broken", f"cannot be read ({exc.strerror or exc})")
    if stat.S_ISDIR(st.st_mode):
        return Entry(path, "folder")
    if stat.S_ISREG(st.st_mode):
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            return Entry(path, "image")
        ext = path.suffix or "no extension"
        return Entry(path, "file", f"unsupported extension {ext} (images are {SUPPORTED})")
    return Entry(path, "broken", f"not a regular file ({_special_kind(st.st_mode)})")


def _special_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "unknown kind"  # pragma: no cover - every POSIX kind is tested above


def scan(folder: Path) -> FolderScan:
    """Every entry of `folder` (not recursive), sorted by name."""
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise DataError(f"cannot list folder {display(folder)} ({exc.strerror or exc}); "
                        "check the path and its permissions") from None
    return FolderScan(folder, [classify(folder / name) for name in names])


def leaf_listing(folder: Path, subfolder_reason: str) -> tuple[list[Path], list[Skipped]]:
    """Images of a folder whose every entry should be an image (a type folder, a `predict`
    input folder), and every other entry as Skipped; subfolders get `subfolder_reason`."""
    found = scan(folder)
    skipped = []
    for e in found.entries:
        if e.kind == "image":
            continue
        if e.kind == "folder":
            reason = ("a folder named like an image" if e.named_like_image
                      else subfolder_reason)
            skipped.append(Skipped(e.path, reason))
        else:
            skipped.append(Skipped(e.path, e.reason))
    return found.images, skipped


def skipped_summary(found: int, scored: int | None, skipped: list[Skipped] | list[dict[str, Any]],
                    first: int = 5) -> str:
    """One line for the CLI: the counts, then the first few skipped entries."""
    scored_text = "" if scored is None else f", {scored} scored"
    entries = "entry" if len(skipped) == 1 else "entries"
    line = f"{found} image(s) found{scored_text}, {len(skipped)} {entries} skipped"
    if not skipped:
        return line
    shown = [s if isinstance(s, Skipped) else Skipped(Path(s["path"]), s["reason"])
             for s in skipped[:first]]
    more = f"; and {len(skipped) - first} more" if len(skipped) > first else ""
    return line + ": " + "; ".join(str(s) for s in shown) + more
