"""Hostile and odd image files (issue 7, section 4): every one is read correctly, warned
about once, or refused with one DataError line naming the file; none is decoded blindly.

All files are generated here, most by patching a few header bytes of a tiny real image.
"""

from __future__ import annotations

import os
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import SMALL, invoke

from anomalyqc.data import ImageDataset, ImageTransform, Record, mvtec_records, read_image, read_mask
from anomalyqc.data import io as image_io
from anomalyqc.data.headers import read_header
from anomalyqc.errors import ConfigError, DataError, DataWarning
from anomalyqc.types import GOOD

PNG_SIG = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ helpers


def encode(ext: str, img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


def put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def with_chunk_after_ihdr(png: bytes, kind: bytes, body: bytes) -> bytes:
    """Insert a chunk right after IHDR (8-byte signature + 25-byte IHDR chunk)."""
    return png[:33] + chunk(kind, body) + png[33:]


def png_bomb(width: int, height: int) -> bytes:
    """A valid-looking gray PNG declaring width x height: the IDAT holds the zlib stream of
    the first rows only, so the file is tiny while a decoder would allocate it all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compressobj(9)
    idat = rows.compress(b"\x00" * (width + 1) * 64) + rows.flush(zlib.Z_SYNC_FLUSH)
    return PNG_SIG + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def patched_jpeg(width: int, height: int) -> bytes:
    data = bytearray(encode(".jpg", np.zeros((8, 8), np.uint8)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def patched_bmp(width: int, height: int) -> bytes:
    data = bytearray(encode(".bmp", np.zeros((8, 8), np.uint8)))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def tiff_bytes(pixels: np.ndarray, orientation: int | None = None,
               declared: tuple[int, int] | None = None) -> bytes:
    """A minimal uncompressed 8-bit gray TIFF, optionally with an Orientation tag or a lying
    declared (height, width)."""
    h, w = declared or pixels.shape
    entries = [(256, 4, w), (257, 4, h), (258, 3, 8), (259, 3, 1), (262, 3, 1),
               (273, 4, 0), (277, 3, 1), (278, 4, h), (279, 4, pixels.size)]
    if orientation is not None:
        entries.append((274, 3, orientation))
    entries.sort()
    data_at = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = data_at if tag == 273 else value
        packed = struct.pack("<Hxx", value) if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + pixels.tobytes()


def exif_jpeg(img: np.ndarray, orientation: int) -> bytes:
    """A JPEG with an EXIF APP1 segment holding one Orientation tag, spliced in after SOI."""
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1)
    tiff += struct.pack("<HHIHxx", 274, 3, 1, orientation) + struct.pack("<I", 0)
    body = b"Exif\x00\x00" + tiff
    app1 = b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body
    plain = encode(".jpg", img)
    return plain[:2] + app1 + plain[2:]


def asymmetric(h: int = 16, w: int = 24) -> np.ndarray:
    """A colour image whose every orientation is distinguishable (big flat blocks, so JPEG
    keeps them)."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 3] = (255, 0, 0)
    img[h // 2:, w // 3: 2 * w // 3] = (0, 255, 0)
    img[:, 2 * w // 3:] = (0, 0, 255)
    img[:4, -4:] = 255
    return img


def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any decode attempt fail the test."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the decoder was called")

    monkeypatch.setattr(image_io.cv2, "imdecode", refuse)
    if image_io.spng is not None:
        monkeypatch.setattr(image_io.spng, "load", refuse)


def one_line_error(result) -> str:
    """The CLI's output for a refused input: status 2, an error line, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.fixture(autouse=True)
def default_limits(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(image_io.MAX_PIXELS_ENV, raising=False)
    monkeypatch.delenv(image_io.MAX_BYTES_ENV, raising=False)
    yield
    image_io.set_max_image_pixels(None)
    image_io.set_max_image_bytes(None)


# ------------------------------------------------------------------- decompression bombs


@pytest.mark.parametrize("kind", ["png", "jpg", "bmp", "tif"])
def test_decompression_bomb_is_refused_from_its_header(tmp_path, monkeypatch, kind):
    data = {"png": png_bomb(30000, 30000), "jpg": patched_jpeg(30000, 30000),
            "bmp": patched_bmp(30000, 30000),
            "tif": tiff_bytes(np.zeros((4, 4), np.uint8), declared=(30000, 30000))}[kind]
    assert len(data) < 100_000
    path = put(tmp_path / f"bomb.{kind}", data)
    no_decoding(monkeypatch)
    with pytest.raises(DataError) as err:
        read_image(path)
    msg = str(err.value)
    assert "bomb." + kind in msg and "30000x30000" in msg and "900.0 megapixels" in msg
    assert "100.0 megapixels" in msg and "ANOMALYQC_MAX_IMAGE_PIXELS" in msg
    with pytest.raises(DataError, match="megapixels"):
        read_mask(path)


def test_pixel_limit_is_configurable_by_setter_and_environment(tmp_path, monkeypatch):
    path = put(tmp_path / "wide.png", encode(".png", np.zeros((20, 50), np.uint8)))
    assert read_image(path).shape == (20, 50, 1)
    image_io.set_max_image_pixels(999)
    with pytest.raises(DataError, match=r"20x50 \(HxW\).*set_max_image_pixels"):
        read_image(path)
    image_io.set_max_image_pixels(None)
    monkeypatch.setenv(image_io.MAX_PIXELS_ENV, "999")
    with pytest.raises(DataError, match="megapixels"):
        read_image(path)
    monkeypatch.setenv(image_io.MAX_PIXELS_ENV, "1000")
    assert read_image(path).shape == (20, 50, 1)
    monkeypatch.setenv(image_io.MAX_PIXELS_ENV, "lots")
    with pytest.raises(ConfigError, match="ANOMALYQC_MAX_IMAGE_PIXELS"):
        read_image(path)
    with pytest.raises(ConfigError):
        image_io.set_max_image_pixels(0)


def test_headers_agree_with_the_encoders(tmp_path):
    """Our header parsers against files written by OpenCV and Pillow (incl. BigTIFF)."""
    from PIL import Image

    gray, rgb = np.zeros((13, 29), np.uint8), np.zeros((13, 29, 3), np.uint8)
    for ext in (".png", ".jpg", ".bmp", ".tif"):
        for img in (gray, rgb):
            header = read_header(encode(ext, img))
            assert header is not None and (header.height, header.width) == (13, 29), ext
    f32 = read_header(encode(".tiff", np.zeros((13, 29, 3), np.float32)))
    assert f32 is not None and (f32.height, f32.width, f32.pages) == (13, 29, 1)
    for options in ({"big_tiff": True}, {"compression": "tiff_lzw"}, {}):
        Image.fromarray(rgb).save(tmp_path / "p.tif", **options)
        header = read_header((tmp_path / "p.tif").read_bytes())
        assert header is not None and (header.height, header.width) == (13, 29), options
    Image.fromarray(rgb).save(tmp_path / "p.bmp")
    assert read_header((tmp_path / "p.bmp").read_bytes()).width == 29  # type: ignore[union-attr]
    assert read_header(b"GIF89a....") is None


def test_unknown_format_is_refused_without_decoding(tmp_path, monkeypatch):
    path = put(tmp_path / "really_a_gif.png", b"GIF89a" + b"\x00" * 64)
    no_decoding(monkeypatch)
    with pytest.raises(DataError, match="really_a_gif.png.*not a PNG, JPEG, BMP or TIFF"):
        read_image(path)


def test_broken_headers_are_one_line(tmp_path, monkeypatch):
    no_decoding(monkeypatch)
    with pytest.raises(DataError, match=r"zero.png: PNG header declares a 5x0 \(HxW\) image"):
        read_image(put(tmp_path / "zero.png", png_bomb(0, 5)))
    jpeg = encode(".jpg", np.zeros((8, 8), np.uint8))
    sof = jpeg.index(b"\xff\xc0")
    no_frame = jpeg[:sof] + b"\xff\xd9"  # markers end before any frame header
    with pytest.raises(DataError, match="noframe.jpg: JPEG without a frame header"):
        read_image(put(tmp_path / "noframe.jpg", no_frame))
    with pytest.raises(DataError, match="cut.tif: TIFF header cut short"):
        read_image(put(tmp_path / "cut.tif", b"II*\x00" + struct.pack("<I", 8) + b"\x05"))


# -------------------------------------------------------------------- huge and odd files


def test_huge_sparse_file_is_refused_by_size_without_reading(tmp_path, monkeypatch):
    path = tmp_path / "sparse.png"
    with open(path, "wb") as f:
        f.truncate(30 * 2**30)  # 30 GiB, no blocks allocated
    assert path.stat().st_size == 30 * 2**30
    with pytest.raises(DataError) as err:
        read_image(path)
    msg = str(err.value)
    assert "sparse.png" in msg and "30.0 GiB" in msg and "1.0 GiB" in msg
    assert "ANOMALYQC_MAX_IMAGE_BYTES" in msg


def test_byte_limit_is_configurable(tmp_path, monkeypatch):
    path = put(tmp_path / "noise.png", encode(".png", np.random.default_rng(0).integers(
        0, 255, (64, 64), dtype=np.uint8)))
    image_io.set_max_image_bytes(1000)
    with pytest.raises(DataError, match="noise.png.*over the .* limit"):
        read_image(path)
    image_io.set_max_image_bytes(None)
    monkeypatch.setenv(image_io.MAX_BYTES_ENV, "1000")
    with pytest.raises(DataError, match="ANOMALYQC_MAX_IMAGE_BYTES"):
        read_image(path)


def test_folder_or_pipe_named_png_is_one_line(tmp_path):
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(DataError, match="dir.png: not a regular file"):
        read_image(tmp_path / "dir.png")
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(DataError, match="pipe.png: not a regular file"):  # and no hang
        read_image(tmp_path / "pipe.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    with pytest.raises(DataError, match="loop.png"):
        read_image(tmp_path / "loop.png")


# ----------------------------------------------------------------- non-finite and floats


def test_float_tiff_with_nan_is_refused_naming_the_count(tmp_path):
    img = np.full((6, 7), 0.5, np.float32)
    img[1, 2] = np.nan
    img[3, 3] = np.inf
    path = put(tmp_path / "nan.tif", encode(".tiff", img))
    with pytest.raises(DataError, match=r"nan.tif: has 2 non-finite pixel"):
        read_image(path)


def test_float_tiff_rule_in_range_reads_outside_is_refused(tmp_path):
    rgb = np.random.default_rng(1).random((6, 7, 3), dtype=np.float32)
    got = read_image(put(tmp_path / "ok.tif", encode(".tiff", rgb)))
    np.testing.assert_array_equal(got, rgb[..., ::-1])  # BGR on disk -> RGB
    wide = np.linspace(-2, 1400, 42, dtype=np.float32).reshape(6, 7)
    with pytest.raises(DataError, match=r"wide.tif: floating-point pixels from -2 to 1400"):
        read_image(put(tmp_path / "wide.tif", encode(".tiff", wide)))


# --------------------------------------------------------------------- multi-image files


def test_multi_page_tiff_is_refused_naming_the_page_count(tmp_path):
    ok, buf = cv2.imencodemulti(".tiff", [np.full((8, 8), v, np.uint8) for v in (0, 99, 200)])
    assert ok
    path = put(tmp_path / "pages.tiff", buf.tobytes())
    with pytest.raises(DataError, match="pages.tiff: TIFF with 3 pages"):
        read_image(path)


def with_second_ifd(tiff: bytes, subfile: int) -> bytes:
    """Chain a second 2x2 IFD (NewSubfileType `subfile`) after the first one of tiff_bytes."""
    (count,) = struct.unpack("<H", tiff[8:10])
    at = len(tiff) + len(tiff) % 2
    entries = [(254, 4, subfile), (256, 4, 2), (257, 4, 2), (258, 3, 8), (259, 3, 1),
               (262, 3, 1), (273, 4, at + 2 + 12 * 10 + 4), (277, 3, 1), (278, 4, 2),
               (279, 4, 4)]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in sorted(entries):
        packed = struct.pack("<Hxx", value) if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    patched = tiff[:10 + 12 * count] + struct.pack("<I", at) + tiff[14 + 12 * count:]
    return patched + b"\x00" * (at - len(tiff)) + ifd + struct.pack("<I", 0) + bytes(4)


def test_tiff_thumbnail_is_not_a_page(tmp_path):
    pixels = np.arange(16, dtype=np.uint8).reshape(4, 4)
    with_thumb = with_second_ifd(tiff_bytes(pixels), subfile=1)
    got = read_image(put(tmp_path / "thumb.tif", with_thumb))
    np.testing.assert_array_equal(np.rint(got[..., 0] * 255), pixels)
    with pytest.raises(DataError, match="TIFF with 2 pages"):
        read_image(put(tmp_path / "two.tif", with_second_ifd(tiff_bytes(pixels), subfile=2)))


def test_animated_png_is_refused(tmp_path):
    png = encode(".png", np.zeros((8, 8), np.uint8))
    apng = with_chunk_after_ihdr(png, b"acTL", struct.pack(">II", 2, 0))
    with pytest.raises(DataError, match="anim.png: PNG with 2 animation frames"):
        read_image(put(tmp_path / "anim.png", apng))


# ------------------------------------------------------------------------ orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_exif_orientation_reads_as_displayed(tmp_path, orientation):
    data = exif_jpeg(asymmetric(), orientation)
    shown = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # applies EXIF
    got = read_image(put(tmp_path / "photo.jpg", data))
    assert got.shape == shown.shape
    np.testing.assert_array_equal(np.rint(got * 255).astype(np.uint8), shown[..., ::-1])
    if orientation in (6, 8):
        assert got.shape[:2] == (24, 16)  # rotated: height and width swap
    mask = read_mask(put(tmp_path / "mask.jpg", data))
    assert mask.shape == got.shape[:2]  # a mask turns with its image


def test_tiff_orientation_is_applied(tmp_path):
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    got = read_image(put(tmp_path / "o6.tif", tiff_bytes(pixels, orientation=6)))
    np.testing.assert_array_equal(np.rint(got[..., 0] * 255), np.rot90(pixels, -1))


# ------------------------------------------------------------------------- 12-bit data


def test_12_bit_png_with_sbit_is_scaled_by_4095(tmp_path):
    raw = np.array([[0, 1000, 4095]], np.uint16)
    png = with_chunk_after_ihdr(encode(".png", raw), b"sBIT", bytes([12]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        got = read_image(put(tmp_path / "twelve.png", png))
    np.testing.assert_allclose(got[0, :, 0], raw[0] / 4095, rtol=1e-6)


def test_sbit_png_stored_scaled_per_the_spec_stays_16_bit(tmp_path):
    raw = (np.array([[0, 100, 255]], np.uint16) << 4)  # 12-bit values shifted to 16 bits
    png = with_chunk_after_ihdr(encode(".png", raw), b"sBIT", bytes([12]))
    with pytest.warns(DataWarning):
        got = read_image(put(tmp_path / "scaled.png", png))
    np.testing.assert_allclose(got[0, :, 0], raw[0] / 65535, rtol=1e-6)


def test_12_bit_data_without_sbit_reads_16_bit_and_warns_once_per_dataset(tmp_path):
    recs = [Record(put(tmp_path / f"dark{i}.png", encode(".png", np.full((8, 8), 4000 + i,
                                                                         np.uint16))),
                   GOOD, "good") for i in range(3)]
    with pytest.warns(DataWarning) as caught:
        ds = ImageDataset(recs, ImageTransform(8))
        images = [ds[i].image for i in range(3)]
    low = [w for w in caught if "16-bit but its brightest pixel is 4000" in str(w.message)]
    assert len(low) == 1 and "dark0.png" in str(low[0].message)
    assert float(images[2].max()) == pytest.approx(4002 / 65535)  # the rule: /65535 still


# ----------------------------------------------------------- aspect ratio and channels


def test_extreme_aspect_ratio_warns_once(tmp_path):
    recs = [Record(put(tmp_path / f"line{i}.png", encode(".png", np.zeros((20, 400), np.uint8))),
                   GOOD, "good") for i in range(3)]
    ds = ImageDataset(recs, ImageTransform(32))
    with pytest.warns(DataWarning) as caught:
        for i in range(3):
            assert ds[i].image.shape == (1, 32, 32)
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "line0.png is 20x400 (HxW)" in msgs[0] and "factor of 20" in msgs[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        ImageTransform((32, 640)).image(np.zeros((20, 400, 1), np.float32))  # proportions kept


@pytest.mark.parametrize("model_channels, file_is_rgb", [(1, True), (3, False)])
def test_channel_conversion_warns_once(tmp_path, model_channels, file_is_rgb):
    img = np.zeros((8, 8, 3) if file_is_rgb else (8, 8), np.uint8)
    recs = [Record(put(tmp_path / f"c{i}.png", encode(".png", img)), GOOD, "good")
            for i in range(3)]
    ds = ImageDataset(recs, ImageTransform(8, channels=model_channels))
    with pytest.warns(DataWarning) as caught:
        shapes = {ds[i].image.shape for i in range(3)}
    assert shapes == {(model_channels, 8, 8)}
    assert len(caught) == 1 and "c0.png" in str(caught[0].message)
    assert ("takes gray" if model_channels == 1 else "takes RGB") in str(caught[0].message)


# ------------------------------------------------------------------------- file names


def test_long_and_non_utf8_file_names_read(tmp_path):
    img = encode(".png", np.full((4, 4), 128, np.uint8))
    long_name = tmp_path / ("a" * 251 + ".png")
    odd = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"\xff\xfe.png")))
    for path in (long_name, odd):
        put(path, img)
        assert read_image(path).shape == (4, 4, 1)
    bad = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"\xff\xfe_bad.png")))
    put(bad, b"junk")
    with pytest.raises(DataError, match="_bad.png: not a PNG"):
        read_image(bad)


def test_predict_with_long_and_non_utf8_names(tiny_run, tmp_path):
    folder = tmp_path / "odd"
    img = encode(".png", np.full((64, 80), 100, np.uint8))
    put(folder / ("b" * 251 + ".png"), img)
    put(Path(os.fsdecode(os.path.join(os.fsencode(folder), b"\xff\xfe.png"))), img)
    r = invoke("predict", tiny_run, folder, "--out", tmp_path / "pred")
    assert r.exit_code == 0, r.output
    heatmaps = [p for p in (tmp_path / "pred").iterdir() if p.name.endswith("_heatmap.png")]
    assert len(heatmaps) == 2 and all(len(os.fsencode(p.name)) <= 255 for p in heatmaps)


# ------------------------------------------------------------------------------- ROIs


def test_roi_masks_are_not_read_and_said_so_once(tmp_path):
    root = tmp_path / "ds"
    good = encode(".png", np.zeros((8, 8), np.uint8))
    for name in ("a", "b"):
        put(root / "test/good" / f"{name}.png", good)
    put(root / "test/crack/c.png", good)
    put(root / "roi/test/good/a_roi.png", b"not an image")  # would fail if it were read
    put(root / "roi/test/crack/c_roi.png", good)
    with pytest.warns(DataWarning) as caught:
        ds = ImageDataset(mvtec_records(root, "test"), ImageTransform(8))
        samples = [ds[i] for i in range(len(ds))]
    assert all(s.roi is None for s in samples)
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and f"ROI masks in {root / 'roi/test'} are not used" in msgs[0]
    assert "GRD-Net uses them" in msgs[0]
    # opted in (a detector that uses them), they are read, aligned and said nothing about
    put(root / "roi/test/good/a_roi.png", encode(".png", np.full((8, 8), 255, np.uint8)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        with_rois = ImageDataset(mvtec_records(root, "test"), ImageTransform(8), rois=True)
        by_name = {Path(s.path).name: s for s in (with_rois[i] for i in range(len(with_rois)))}
    assert by_name["a.png"].roi is not None and by_name["a.png"].roi.min() == 1.0
    assert by_name["b.png"].roi is None  # no ROI file: the whole image (Batch fills ones)


# -------------------------------------------------------------------------------- CLI


@pytest.fixture
def vials_copy(tiny_vials: Path, tmp_path: Path) -> Path:
    out = tmp_path / "vials"
    shutil.copytree(tiny_vials, out)
    return out


def test_cli_fit_refuses_a_bomb_in_one_line(vials_copy, tmp_path):
    put(vials_copy / "train/good/zz_bomb.png", png_bomb(30000, 30000))
    line = one_line_error(invoke("fit", "padim", "--data", vials_copy, "--out", tmp_path / "run",
                                 *SMALL))
    assert "zz_bomb.png" in line and "megapixels" in line


def test_cli_fit_worker_error_is_one_line(vials_copy, tmp_path):
    """With DataLoader workers torch wraps the error in the worker's traceback."""
    put(vials_copy / "train/good/zz_nan.tif", encode(".tiff", np.full((8, 8), np.nan,
                                                                      np.float32)))
    line = one_line_error(invoke("fit", "padim", "--data", vials_copy, "--out", tmp_path / "run",
                                 *SMALL, "--workers", 1))
    assert "zz_nan.tif" in line and "64 non-finite" in line


def test_cli_evaluate_refuses_multi_page_tiff_in_one_line(vials_copy, tiny_run):
    ok, buf = cv2.imencodemulti(".tiff", [np.zeros((8, 8), np.uint8)] * 2)
    put(vials_copy / "test/good/zz_pages.tiff", buf.tobytes())
    line = one_line_error(invoke("evaluate", tiny_run, "--data", vials_copy))
    assert "zz_pages.tiff" in line and "2 pages" in line


def test_cli_predict_refuses_sparse_file_and_warns_about_rgb(tiny_run, tmp_path):
    rgb = put(tmp_path / "in/rgb.png", encode(".png", np.zeros((64, 80, 3), np.uint8)))
    r = invoke("predict", tiny_run, rgb, "--out", tmp_path / "pred")
    assert r.exit_code == 0, r.output
    warned = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "rgb.png is RGB but the model takes gray" in warned[0]
    sparse = tmp_path / "in/huge.png"
    with open(sparse, "wb") as f:
        f.truncate(30 * 2**30)
    line = one_line_error(invoke("predict", tiny_run, sparse, "--out", tmp_path / "pred2"))
    assert "huge.png" in line and "30.0 GiB" in line
