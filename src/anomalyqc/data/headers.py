"""What an image file declares about itself, read from its header without decoding pixels.

A decoder allocates what the header declares before it looks at the data, so a 2.6 MB PNG
declaring 30000x30000 pixels costs gigabytes. io.py reads the declared size here first and
refuses files over the pixel limit. The parsers are our own (a few dozen lines each) rather
than Pillow's: Pillow refuses to open headers it cannot map to one of its pixel modes (an
RGB float32 TIFF, for one) that OpenCV decodes fine.

Formats: PNG (IHDR; sBIT; acTL frame count of an animated PNG), JPEG (SOF; EXIF
orientation), BMP (info header) and TIFF (first IFD; page count; orientation), classic and
BigTIFF. Anything else is not read at all.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Chained IFDs looked at, at most (a hostile file could chain millions).
_MAX_IFDS = 10_000
# JPEG start-of-frame markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_TAG_SUBFILE, _TAG_WIDTH, _TAG_LENGTH, _TAG_ORIENTATION = 254, 256, 257, 274
_REDUCED_RESOLUTION = 1  # NewSubfileType bit of a thumbnail/preview IFD (not a page)


class HeaderError(ValueError):
    """The header is missing, cut short or inconsistent (the reason is the message)."""


@dataclass(frozen=True)
class Header:
    """Declared properties of an image file."""

    format: str  # "PNG", "JPEG", "BMP" or "TIFF"
    width: int
    height: int
    pages: int = 1  # TIFF pages / animated PNG frames
    orientation: int = 1  # EXIF/TIFF orientation 1..8 (1 = as stored)
    significant_bits: int | None = None  # PNG sBIT: bits of the colour channels, if declared

    @property
    def pixels(self) -> int:
        return self.width * self.height


def sniff_format(data: bytes) -> str | None:
    """'PNG', 'JPEG', 'BMP', 'TIFF' from the first bytes, or None."""
    if data.startswith(PNG_SIGNATURE):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"BM"):
        return "BMP"
    if data[:4] in _TIFF_MAGICS:
        return "TIFF"
    return None


def read_header(data: bytes) -> Header | None:
    """The header of a PNG/JPEG/BMP/TIFF file's bytes; None for another format.

    Raises HeaderError when the format is recognised but its header is unreadable.
    """
    fmt = sniff_format(data)
    if fmt is None:
        return None
    try:
        header = _PARSERS[fmt](data)
    except (struct.error, IndexError) as exc:
        raise HeaderError(f"{fmt} header cut short ({exc})") from exc
    if header.width <= 0 or header.height <= 0:
        raise HeaderError(f"{fmt} header declares a {header.height}x{header.width} (HxW) image")
    return header


# ------------------------------------------------------------------------------------ PNG


def _png(data: bytes) -> Header:
    if data[12:16] != b"IHDR":
        raise HeaderError("PNG without an IHDR chunk first")
    width, height = struct.unpack(">II", data[16:24])
    colour_type = data[25]
    sbit: int | None = None
    frames = 1
    pos = 8
    while pos + 8 <= len(data):  # chunks before the pixel data
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind in (b"IDAT", b"IEND"):
            break
        if kind == b"sBIT" and body:
            colour = body[:1] if colour_type in (0, 4) else body[:3]  # alpha excluded
            sbit = max(colour)
        elif kind == b"acTL" and len(body) >= 4:
            frames = max(1, int.from_bytes(body[:4], "big"))
        pos += 12 + length
    return Header("PNG", width, height, pages=frames, significant_bits=sbit)


# ----------------------------------------------------------------------------------- JPEG


def _jpeg(data: bytes) -> Header:
    orientation = 1
    pos = 2
    while pos < len(data):
        if data[pos] != 0xFF:
            raise HeaderError(f"JPEG marker expected at byte {pos}")
        while pos < len(data) and data[pos] == 0xFF:  # fill bytes
            pos += 1
        marker = data[pos]
        pos += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length field
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            break
        length = int.from_bytes(data[pos:pos + 2], "big")
        body = data[pos + 2:pos + length]
        if marker == 0xE1 and body.startswith(b"Exif\x00\x00"):
            orientation = _tiff_orientation(body[6:]) or orientation
        elif marker in _SOF_MARKERS:
            height, width = struct.unpack(">HH", body[1:5])
            return Header("JPEG", width, height, orientation=orientation)
        pos += length
    raise HeaderError("JPEG without a frame header (SOF) before the image data")


def _tiff_orientation(tiff: bytes) -> int | None:
    """Orientation tag of an EXIF block (a TIFF structure); None if absent or unreadable."""
    try:
        endian, big = _layout(tiff)
        value = _ifd_tags(tiff, _first_ifd(tiff, endian, big), endian, big)[0].get(
            _TAG_ORIENTATION)
    except (HeaderError, struct.error, IndexError):
        return None
    return value if value in range(1, 9) else None


# ------------------------------------------------------------------------------------ BMP


def _bmp(data: bytes) -> Header:
    info_size = int.from_bytes(data[14:18], "little")
    if info_size == 12:  # OS/2 BITMAPCOREHEADER: unsigned 16-bit sizes
        width, height = struct.unpack("<HH", data[18:22])
    else:  # BITMAPINFOHEADER and later: signed 32-bit, negative height = top-down rows
        width, height = struct.unpack("<ii", data[18:26])
    return Header("BMP", width, abs(height))


# ----------------------------------------------------------------------------------- TIFF

# (struct code, size) of the TIFF field types of the tags read: sizes, orientation, subfile.
_TYPES = {3: ("H", 2), 4: ("I", 4), 16: ("Q", 8)}


def _tiff(data: bytes) -> Header:
    endian, big = _layout(data)
    offset = _first_ifd(data, endian, big)
    tags, next_offset = _ifd_tags(data, offset, endian, big)
    if _TAG_WIDTH not in tags or _TAG_LENGTH not in tags:
        raise HeaderError("TIFF without ImageWidth/ImageLength tags")
    pages, seen = 1, {offset}
    while next_offset and len(seen) < _MAX_IFDS:
        if next_offset in seen or next_offset >= len(data):
            break  # a loop or a dangling offset: count what is there
        seen.add(next_offset)
        try:
            later, following = _ifd_tags(data, next_offset, endian, big)
        except (struct.error, IndexError):
            pages += 1  # a corrupt later page still makes the file more than one image
            break
        if not later.get(_TAG_SUBFILE, 0) & _REDUCED_RESOLUTION:  # thumbnails are no pages
            pages += 1
        next_offset = following
    orientation = tags.get(_TAG_ORIENTATION, 1)
    return Header("TIFF", tags[_TAG_WIDTH], tags[_TAG_LENGTH], pages=pages,
                  orientation=orientation if orientation in range(1, 9) else 1)


def _layout(data: bytes) -> tuple[str, bool]:
    """(struct byte order, is BigTIFF)."""
    if data[:2] not in (b"II", b"MM"):
        raise HeaderError("TIFF byte order is neither II nor MM")
    endian = "<" if data[:2] == b"II" else ">"
    (magic,) = struct.unpack(endian + "H", data[2:4])
    if magic not in (42, 43):
        raise HeaderError(f"TIFF magic number {magic} (expected 42 or 43)")
    return endian, magic == 43


def _first_ifd(data: bytes, endian: str, big: bool) -> int:
    code, at = ("Q", 8) if big else ("I", 4)
    return int(struct.unpack(endian + code, data[at:at + struct.calcsize(code)])[0])


def _ifd_tags(data: bytes, offset: int, endian: str, big: bool) -> tuple[dict[int, int], int]:
    """The single-valued integer tags of the IFD at `offset`, and the next IFD's offset."""
    count_fmt, entry_size, count_size = ("Q", 20, 8) if big else ("H", 12, 2)
    (count,) = struct.unpack(endian + count_fmt, data[offset:offset + count_size])
    tags: dict[int, int] = {}
    base = offset + count_size
    for i in range(count):
        entry = data[base + i * entry_size:base + (i + 1) * entry_size]
        tag, kind = struct.unpack(endian + "HH", entry[:4])
        if kind not in _TYPES or tag not in (_TAG_SUBFILE, _TAG_WIDTH, _TAG_LENGTH,
                                             _TAG_ORIENTATION):
            continue
        code, _ = _TYPES[kind]
        value_at = 12 if big else 8  # the value sits in the entry when it fits, as ours do
        (tags[tag],) = struct.unpack(endian + code, entry[value_at:value_at + struct.calcsize(code)])
    end = base + count * entry_size
    (next_offset,) = struct.unpack(endian + ("Q" if big else "I"),
                                   data[end:end + (8 if big else 4)])
    return tags, next_offset


_PARSERS = {"PNG": _png, "JPEG": _jpeg, "BMP": _bmp, "TIFF": _tiff}
