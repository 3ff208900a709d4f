"""Paths as text that every writer accepts: JSON, HTML, matplotlib, a terminal.

Linux file names are bytes; Python maps bytes that are not UTF-8 to lone surrogates
(os.fsdecode's surrogateescape), which `str.encode("utf-8")`, strict JSON readers and font
renderers all refuse. display() writes such bytes as \\xNN instead, so a report can name the
file without failing, and a reader can still tell which file it was.
"""

from __future__ import annotations

import os


def display(path: str | os.PathLike[str]) -> str:
    """The path as valid Unicode: undecodable bytes become \\xNN, everything else is kept."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    return text


def name_bytes(name: str) -> int:
    """Length of a file name on disk, in bytes (the limit, NAME_MAX, is 255 bytes)."""
    return len(os.fsencode(name))


def fit_name(stem: str, suffix: str, limit: int = 255) -> str:
    """`stem + suffix`, the stem cut (on a character boundary) so the name fits in `limit`
    bytes: derived names (heatmaps of a 255-byte input name) must still be creatable."""
    room = limit - name_bytes(suffix)
    while name_bytes(stem) > room:
        stem = stem[:-1]
    return stem + suffix
