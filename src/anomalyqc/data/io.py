"""Reading images and masks from disk into numpy arrays.

Everything that touches image files goes through here, so that every unreadable, truncated
or oddly encoded file ends up as one DataError that names the file and says what to do.
Files are read as bytes with np.fromfile (which, unlike cv2.imread, works with non-ASCII
paths on every platform). 8-bit gray/RGB/RGBA PNGs, the common case on a line, are decoded
by libspng (pyspng), about twice as fast as OpenCV's libpng on a 900x900 image; everything
else, and anything libspng refuses, goes through cv2.imdecode.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

try:
    import pyspng as spng
except ImportError:  # optional speed-up: OpenCV decodes everything without it
    spng = None

from anomalyqc.data.transforms import check_channels, convert_channels, resize_mask
from anomalyqc.errors import DataError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
# Trailing bytes tolerated after the end marker (some encoders pad or append metadata).
_TAIL_WINDOW = 1024
_FIX_HINT = "check the file is a complete PNG/JPEG/BMP/TIFF image, or remove it"


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


def read_image(path: str | Path, channels: int | None = None) -> np.ndarray:
    """Read an image as float32 (H, W, C) in [0, 1], RGB channel order.

    channels=1 converts to gray, channels=3 converts gray to RGB, None keeps what the file
    has (gray stays one channel, an alpha channel is dropped). 8- and 16-bit files are
    scaled by their full range so both land in [0, 1].
    """
    check_channels(channels)
    path = Path(path)
    raw, bgr = _decode(path, "image")
    # Channel reordering on the integer pixels, then one float conversion: 2-3x cheaper on
    # large images than converting first (this is on the inline latency path).
    img = _to_float(_to_rgb_or_gray(raw, bgr), path)
    return convert_channels(img, channels) if channels is not None else img


def read_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a mask as uint8 (H, W) with values 0/1; any nonzero pixel counts as 1.

    Colour masks are accepted (nonzero in any colour channel); alpha is ignored. If `size`
    (H, W) is given the mask is resized with nearest neighbour so it stays binary.
    """
    path = Path(path)
    raw, _ = _decode(path, "mask")
    if raw.ndim == 3:
        raw = raw[..., :3].max(axis=2) if raw.shape[2] >= 3 else raw[..., 0]
    mask = (raw > 0).astype(np.uint8)
    if size is not None and mask.shape != tuple(size):
        mask = resize_mask(mask, size)
    return mask


def _decode(path: Path, kind: str) -> tuple[np.ndarray, bool]:
    """Bytes -> (array as stored: any depth, any channels; True if colour is in BGR order),
    or a DataError."""

    def fail(reason: str) -> DataError:
        return DataError(f"cannot read {kind} {path}: {reason}; {_FIX_HINT}")

    if not path.is_file():
        raise fail("file not found")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise fail(f"{exc.strerror or exc}") from exc
    if data.size == 0:
        raise fail("file is empty")
    reason = _truncation_reason(data)
    if reason:
        raise fail(reason)
    fast = _decode_png8(data)
    if fast is not None:
        return fast, False
    try:
        raw = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise fail(f"decoder error ({str(exc).strip().splitlines()[-1]})") from exc
    if raw is None or raw.size == 0:
        raise fail("not a supported image format or corrupt data")
    if _is_gray_alpha_png(data) and raw.ndim == 3 and raw.shape[2] == 4:
        raw = np.ascontiguousarray(raw[..., 0])  # OpenCV expands gray+alpha to BGRA
    return raw, True


def _is_gray_alpha_png(data: np.ndarray) -> bool:
    """PNG colour type 4 (gray + alpha), which should read as gray like any gray image."""
    return data.size >= 26 and data[:8].tobytes() == _PNG_SIGNATURE and data[25] == 4


def _decode_png8(data: np.ndarray) -> np.ndarray | None:
    """libspng for 8-bit gray (colour type 0), RGB (2) and RGBA (6) PNGs, in RGB order; None
    for anything else (16-bit, palette, gray+alpha) or when libspng refuses the file."""
    if spng is None or data.size < 26 or data[:8].tobytes() != _PNG_SIGNATURE:
        return None
    if data[24] != 8 or data[25] not in (0, 2, 6):  # IHDR bit depth and colour type
        return None
    try:
        img = spng.load(data.tobytes())
    except (RuntimeError, ValueError):
        return None
    return img if img.ndim == 2 or img.shape[2] in (3, 4) else None


def _truncation_reason(data: np.ndarray) -> str | None:
    """Catch truncated PNG/JPEG/BMP files that some decoders would half-decode silently."""
    head = data[:8].tobytes()
    tail = data[-_TAIL_WINDOW:].tobytes()
    if head.startswith(_PNG_SIGNATURE) and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk at the end)"
    if head.startswith(_JPEG_SOI) and _JPEG_EOI not in tail:
        return "truncated JPEG (no end-of-image marker FFD9)"
    if head.startswith(b"BM") and data.size >= 6:
        declared = int.from_bytes(data[2:6].tobytes(), "little")
        if declared > data.size:
            return f"truncated BMP ({data.size} of {declared} bytes)"
    return None


def _to_float(raw: np.ndarray, path: Path) -> np.ndarray:
    """Scale by the integer type's full range; float files must already be in [0, 1]."""
    if raw.dtype in (np.uint8, np.uint16):
        out = raw.astype(np.float32)
        out *= np.float32(1.0 / np.iinfo(raw.dtype).max)
        return out
    if raw.dtype in (np.float32, np.float64):
        if raw.min() < 0.0 or raw.max() > 1.0:
            raise DataError(
                f"cannot read image {path}: floating-point pixels outside [0, 1]; "
                "save it as 8- or 16-bit, or scale it to [0, 1]"
            )
        return raw.astype(np.float32)
    raise DataError(
        f"cannot read image {path}: unsupported pixel type {raw.dtype}; save it as 8- or 16-bit"
    )


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
