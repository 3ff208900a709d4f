"""EXIF/TIFF orientation: turning a decoded array the way a viewer displays the file.

OpenCV's cv2.imdecode(IMREAD_UNCHANGED) ignores the EXIF orientation of a JPEG, while
OpenCV 5 applies a TIFF's Orientation tag itself; which decoder does what has changed
between releases, so it is probed once per format on a tiny tagged image instead of
assumed. A mask is turned with its image, since both are read the same way.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from functools import cache

import cv2
import numpy as np

# Orientation tag value -> the array operation that shows the image as displayed.
_UPRIGHT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def upright(raw: np.ndarray, fmt: str, orientation: int) -> np.ndarray:
    """`raw` as cv2.imdecode(IMREAD_UNCHANGED) returned it for a file of format `fmt`
    whose header says `orientation`, turned as displayed."""
    op = _UPRIGHT.get(orientation)
    if op is None or decoder_applies_orientation(fmt):
        return raw
    return np.ascontiguousarray(op(raw))


@cache
def decoder_applies_orientation(fmt: str) -> bool:
    """Whether cv2.imdecode(IMREAD_UNCHANGED) already turns images of this format: decode
    an 8x16 image tagged 'rotate 90 degrees' (6) and see if it comes out 16x8."""
    if fmt not in ("JPEG", "TIFF"):
        return False
    probe = _jpeg_probe() if fmt == "JPEG" else _tiff_probe()
    out = cv2.imdecode(np.frombuffer(probe, np.uint8), cv2.IMREAD_UNCHANGED)
    return out is not None and out.shape[:2] == (16, 8)


def _ifd(entries: list[tuple[int, int, int]]) -> bytes:
    """A little-endian TIFF IFD of single SHORT (3) / LONG (4) values, no next IFD."""
    out = struct.pack("<H", len(entries))
    for tag, kind, value in sorted(entries):
        packed = struct.pack("<Hxx", value) if kind == 3 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, 1) + packed
    return out + struct.pack("<I", 0)


def _jpeg_probe() -> bytes:
    ok, buf = cv2.imencode(".jpg", np.zeros((8, 16), np.uint8))
    plain = buf.tobytes()
    body = b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + _ifd([(274, 3, 6)])
    return plain[:2] + b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body + plain[2:]


def _tiff_probe() -> bytes:
    h, w = 8, 16
    entries = [(256, 4, w), (257, 4, h), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0),
               (274, 3, 6), (277, 3, 1), (278, 4, h), (279, 4, h * w)]
    data_at = 8 + 2 + 12 * len(entries) + 4
    entries[5] = (273, 4, data_at)
    return b"II*\x00" + struct.pack("<I", 8) + _ifd(entries) + bytes(h * w)
