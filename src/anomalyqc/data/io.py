"""Reading images and masks from disk into numpy arrays.

Everything that touches image files goes through here, so that every unreadable, truncated,
oversized or oddly encoded file ends up as one DataError that names the file and says what
to do. A file is checked before its pixels are decoded: its size on disk against
ANOMALYQC_MAX_IMAGE_BYTES (default 1 GiB), then the width x height its header declares
against ANOMALYQC_MAX_IMAGE_PIXELS (default 100 megapixels), since decoders allocate what
the header declares (a 2.6 MB PNG can declare 30000x30000). Both limits can also be set from
Python with set_max_image_bytes / set_max_image_pixels. Only PNG, JPEG, BMP and TIFF files
are read (see headers.py); multi-page TIFFs and animated PNGs are refused rather than
scored on their first page, and EXIF/TIFF orientation is applied so a photo reads as it is
displayed.

8-bit gray/RGB/RGBA PNGs, the common case on a line, are decoded by libspng (pyspng),
about twice as fast as OpenCV's libpng on a 900x900 image; everything else, and anything
libspng refuses, goes through cv2.imdecode.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

try:
    import pyspng as spng
except ImportError:  # optional speed-up: OpenCV decodes everything without it
    spng = None

from anomalyqc.data.headers import PNG_SIGNATURE, Header, HeaderError, read_header
from anomalyqc.data.notes import InputNotes
from anomalyqc.data.orientation import upright
from anomalyqc.data.transforms import check_channels, convert_channels, resize_mask
from anomalyqc.errors import ConfigError, DataError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

MAX_PIXELS_ENV = "ANOMALYQC_MAX_IMAGE_PIXELS"
MAX_BYTES_ENV = "ANOMALYQC_MAX_IMAGE_BYTES"
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_BYTES = 1 << 30
_limits: dict[str, int | None] = {MAX_PIXELS_ENV: None, MAX_BYTES_ENV: None}

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
# Trailing bytes tolerated after the end marker (some encoders pad or append metadata).
_TAIL_WINDOW = 1024
_FIX_HINT = "check the file is a complete PNG/JPEG/BMP/TIFF image, or remove it"
# A 16-bit image whose brightest pixel is below this probably holds 12-bit (or fewer) data.
_LOW_16BIT = 1 << 12


def set_max_image_pixels(limit: int | None) -> None:
    """Largest width x height a file may declare; None goes back to the environment
    variable ANOMALYQC_MAX_IMAGE_PIXELS, or the default of 100 megapixels."""
    _limits[MAX_PIXELS_ENV] = _positive(limit, "set_max_image_pixels")


def set_max_image_bytes(limit: int | None) -> None:
    """Largest image file size in bytes; None goes back to ANOMALYQC_MAX_IMAGE_BYTES, or
    the default of 1 GiB."""
    _limits[MAX_BYTES_ENV] = _positive(limit, "set_max_image_bytes")


def max_image_pixels() -> int:
    """The pixel limit in force: the setter's value, else the environment, else the default."""
    return _limit(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS)


def max_image_bytes() -> int:
    """The file size limit in force: the setter's value, else the environment, else 1 GiB."""
    return _limit(MAX_BYTES_ENV, DEFAULT_MAX_BYTES)


def _limit(env: str, default: int) -> int:
    value = _limits[env]
    if value is not None:
        return value
    text = os.environ.get(env, "").strip()
    if not text:
        return default
    try:
        parsed = int(text.replace("_", ""))
    except ValueError:
        parsed = 0
    if parsed < 1:
        raise ConfigError(f"environment variable {env}={text!r} must be a positive whole number")
    return parsed


def _positive(limit: int | None, where: str) -> int | None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ConfigError(f"{where} takes a positive whole number or None, got {limit!r}")
    return limit


def is_image_file(path: Path) -> bool:
    """True for a visible file with an image extension (case-insensitive)."""
    return (
        not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
    )


def list_images(directory: str | Path) -> list[Path]:
    """Image files directly inside `directory`, sorted by name, hidden files skipped.

    Not recursive: the layouts give subfolders a meaning (defect type), so they are walked
    explicitly by the caller.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"image folder {directory} does not exist; check the path")
    return sorted(p for p in directory.iterdir() if is_image_file(p))


def read_image(
    path: str | Path, channels: int | None = None, notes: InputNotes | None = None
) -> np.ndarray:
    """Read an image as float32 (H, W, C) in [0, 1], RGB channel order.

    channels=1 converts to gray, channels=3 converts gray to RGB, None keeps what the file
    has (gray stays one channel, an alpha channel is dropped). Pixel values:

    - 8-bit files are divided by 255.
    - 16-bit files are divided by 65535, except a PNG whose sBIT chunk declares n < 16
      significant bits and whose pixels are stored unscaled (all below 2**n, not all
      multiples of 2**(16-n)): that one is divided by 2**n - 1. A 16-bit file whose
      brightest pixel is below 4096 without such a chunk (12-bit camera data, most likely)
      is still divided by 65535, and `notes` warns about it once.
    - float32/float64 files (TIFF) must hold finite values in [0, 1]; anything else is a
      DataError (no scale is guessed).
    """
    check_channels(channels)
    path = Path(path)
    raw, bgr, header = _decode(path, "image")
    # Channel reordering on the integer pixels, then one float conversion: 2-3x cheaper on
    # large images than converting first (this is on the inline latency path).
    img = _to_float(_to_rgb_or_gray(raw, bgr), path, header, notes or InputNotes())
    return convert_channels(img, channels) if channels is not None else img


def read_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a mask as uint8 (H, W) with values 0/1; any nonzero pixel counts as 1.

    Colour masks are accepted (nonzero in any colour channel); alpha is ignored. If `size`
    (H, W) is given the mask is resized with nearest neighbour so it stays binary.
    """
    path = Path(path)
    raw, _, _ = _decode(path, "mask")
    if raw.ndim == 3:
        raw = raw[..., :3].max(axis=2) if raw.shape[2] >= 3 else raw[..., 0]
    mask = (raw > 0).astype(np.uint8)
    if size is not None and mask.shape != tuple(size):
        mask = resize_mask(mask, size)
    return mask


Fail = Callable[..., DataError]


def _decode(path: Path, kind: str) -> tuple[np.ndarray, bool, Header]:
    """Bytes -> (array as stored: any depth, any channels, turned upright; True if colour
    is in BGR order; the header), or a DataError."""

    def fail(reason: str, fix: str = _FIX_HINT) -> DataError:
        return DataError(f"cannot read {kind} {path}: {reason}; {fix}")

    data = _read_bytes(path, fail)
    reason = _truncation_reason(data)
    if reason:
        raise fail(reason)
    header = _checked_header(data, fail)
    fast = _decode_png8(data)
    if fast is not None:
        raw, bgr = fast, False
    else:
        try:
            decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        except cv2.error as exc:
            raise fail(f"decoder error ({str(exc).strip().splitlines()[-1]})") from exc
        if decoded is None or decoded.size == 0:
            raise fail("not a supported image format or corrupt data")
        raw, bgr = decoded, True
        if _is_gray_alpha_png(data) and raw.ndim == 3 and raw.shape[2] == 4:
            raw = np.ascontiguousarray(raw[..., 0])  # OpenCV expands gray+alpha to BGRA
    if raw.dtype.kind == "f":
        bad = int(raw.size - np.count_nonzero(np.isfinite(raw)))
        if bad:
            raise fail(f"has {bad} non-finite pixel value(s) (NaN or infinity)",
                       "fix or remove the file: a NaN pixel has no defined anomaly score")
    return upright(raw, header.format, header.orientation), bgr, header


def _read_bytes(path: Path, fail: Fail) -> bytes:
    """The file's bytes, refused before reading when the file is not a regular file or is
    over the size limit (a 30 GB sparse file named .png costs nothing to make)."""
    limit = max_image_bytes()
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise fail("not a regular file (a folder, pipe or device)", "remove it or rename it")
        if info.st_size > limit:
            raise _too_big(fail, info.st_size, limit)
        with open(path, "rb") as f:
            data = f.read(limit + 1)  # bounded even if the file grows meanwhile
    except FileNotFoundError:
        raise fail("file not found") from None
    except OSError as exc:
        raise fail(exc.strerror or str(exc)) from None
    except ValueError as exc:  # a name the file system cannot take (NUL byte, bad encoding)
        raise fail(f"unusable file name ({exc})", "rename the file") from None
    if not data:
        raise fail("file is empty")
    if len(data) > limit:
        raise _too_big(fail, len(data), limit)
    return data


def _too_big(fail: Fail, size: int, limit: int) -> DataError:
    return fail(f"the file is {_bytes(size)}, over the {_bytes(limit)} limit for one image",
                f"if it is a genuine image, raise the limit with {MAX_BYTES_ENV}=<bytes> (or "
                "anomalyqc.data.io.set_max_image_bytes)")


def _checked_header(data: bytes, fail: Fail) -> Header:
    """The declared size, pages and orientation, refused before any pixel is decoded."""
    try:
        header = read_header(data)
    except HeaderError as exc:
        raise fail(str(exc)) from None
    if header is None:
        raise fail(f"not a PNG, JPEG, BMP or TIFF file (it starts with {data[:8]!r})",
                   "convert it to PNG, or remove it")
    limit = max_image_pixels()
    if header.pixels > limit:
        raise fail(f"its header declares {header.height}x{header.width} (HxW) = "
                   f"{header.pixels / 1e6:.1f} megapixels, over the limit of "
                   f"{limit / 1e6:.1f} megapixels (decoding it would need that much memory)",
                   f"if it is a genuine image, raise the limit with {MAX_PIXELS_ENV}=<pixels> "
                   "(or anomalyqc.data.io.set_max_image_pixels); otherwise remove it")
    if header.pages > 1:
        what = "pages" if header.format == "TIFF" else "animation frames"
        raise fail(f"{header.format} with {header.pages} {what}; only single-image files "
                   "are scored", "save each page as its own file")
    return header


def _bytes(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def _is_gray_alpha_png(data: bytes) -> bool:
    """PNG colour type 4 (gray + alpha), which should read as gray like any gray image."""
    return len(data) >= 26 and data.startswith(PNG_SIGNATURE) and data[25] == 4


def _decode_png8(data: bytes) -> np.ndarray | None:
    """libspng for 8-bit gray (colour type 0), RGB (2) and RGBA (6) PNGs, in RGB order; None
    for anything else (16-bit, palette, gray+alpha) or when libspng refuses the file."""
    if spng is None or len(data) < 26 or not data.startswith(PNG_SIGNATURE):
        return None
    if data[24] != 8 or data[25] not in (0, 2, 6):  # IHDR bit depth and colour type
        return None
    try:
        img = spng.load(data)
    except (RuntimeError, ValueError):
        return None
    return img if img.ndim == 2 or img.shape[2] in (3, 4) else None


def _truncation_reason(data: bytes) -> str | None:
    """Catch truncated PNG/JPEG/BMP files that some decoders would half-decode silently."""
    head = data[:8]
    tail = data[-_TAIL_WINDOW:]
    if head.startswith(PNG_SIGNATURE) and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk at the end)"
    if head.startswith(_JPEG_SOI) and _JPEG_EOI not in tail:
        return "truncated JPEG (no end-of-image marker FFD9)"
    if head.startswith(b"BM") and len(data) >= 6:
        declared = int.from_bytes(data[2:6], "little")
        if declared > len(data):
            return f"truncated BMP ({len(data)} of {declared} bytes)"
    return None


def _to_float(raw: np.ndarray, path: Path, header: Header, notes: InputNotes) -> np.ndarray:
    """Scale integer pixels to [0, 1] (see read_image for the rule); float files must
    already be in [0, 1]."""
    if raw.dtype in (np.uint8, np.uint16):
        top = 255 if raw.dtype == np.uint8 else _full_scale_16(raw, path, header, notes)
        out = raw.astype(np.float32)
        out *= np.float32(1.0 / top)
        return out
    if raw.dtype in (np.float32, np.float64):
        low, high = float(raw.min()), float(raw.max())
        if low < 0.0 or high > 1.0:
            raise DataError(
                f"cannot read image {path}: floating-point pixels from {low:.6g} to {high:.6g}, "
                "outside [0, 1]; save it as 8- or 16-bit, or scale it to [0, 1]"
            )
        return raw.astype(np.float32)
    raise DataError(
        f"cannot read image {path}: unsupported pixel type {raw.dtype}; save it as 8- or 16-bit"
    )


def _full_scale_16(raw: np.ndarray, path: Path, header: Header, notes: InputNotes) -> int:
    """The value that reads as 1.0 in a 16-bit image."""
    top = int(raw.max())
    bits = header.significant_bits
    if bits is not None and 0 < bits < 16 and top < 1 << bits:
        # Stored per the PNG spec (scaled up to 16 bits), a dark image's values are all
        # multiples of 2**(16-bits); unscaled n-bit data is not.
        if np.any(raw & np.uint16((1 << (16 - bits)) - 1)):
            return (1 << bits) - 1
    if 0 < top < _LOW_16BIT:
        notes.warn(
            "16-bit-low-range",
            f"image {path} is 16-bit but its brightest pixel is {top} of 65535 (12-bit "
            "camera data stored unscaled?); it is read as 16-bit, so it looks almost black "
            "to the model: rescale the images to the 16-bit range, or give the PNGs an sBIT "
            "chunk declaring their bit depth",
        )
    return 65535


def _to_rgb_or_gray(img: np.ndarray, bgr: bool = True) -> np.ndarray:
    """(H, W) / BGR(A) or RGB(A) / gray+alpha -> (H, W, 1) gray or (H, W, 3) RGB."""
    if img.ndim == 2:
        return img[..., None]
    c = img.shape[2]
    if c == 1:
        return img
    if c == 2:  # gray + alpha
        return np.ascontiguousarray(img[..., :1])
    if not bgr:
        return img if c == 3 else np.ascontiguousarray(img[..., :3])
    if img.dtype in (np.uint8, np.uint16, np.float32):
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB if c == 4 else cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(img[..., 2::-1])  # BGR(A) -> RGB, alpha dropped
