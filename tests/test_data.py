"""Data package: readers, transforms, layouts, dataset, and the errors for bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from anomalyqc.data import (
    ImageDataset,
    ImageTransform,
    Record,
    center_crop,
    detect_layout,
    folder_records,
    list_images,
    make_loader,
    mvtec_records,
    read_image,
    read_mask,
    records_for,
    resize_image,
    resize_mask,
)
from anomalyqc.errors import ConfigError, DataError, DataWarning
from anomalyqc.types import DEFECT, GOOD, Batch

H, W = 24, 32  # deliberately not square and not a multiple of the output size


# ------------------------------------------------------------------------------ helpers


def write(path: Path, array: np.ndarray) -> Path:
    """cv2.imwrite via imencode, creating folders (and coping with non-ASCII names)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix, array)
    assert ok
    buf.tofile(path)
    return path


def rgb_image(seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def gray_image(seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def defect_mask(h: int = H, w: int = W) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[5:15, 7:20] = 255
    return mask


def make_mvtec(root: Path, gray: bool = False, with_roi: bool = False) -> Path:
    """3 train goods, 2 test goods, 2 'crack' + 1 'scratch' with masks."""
    img = gray_image if gray else rgb_image
    for i in range(3):
        write(root / "train/good" / f"{i:03d}.png", img(i))
    for i in range(2):
        write(root / "test/good" / f"{i:03d}.png", img(10 + i))
    for defect, n in (("crack", 2), ("scratch", 1)):
        for i in range(n):
            write(root / "test" / defect / f"{i:03d}.png", img(20 + i))
            write(root / "ground_truth" / defect / f"{i:03d}_mask.png", defect_mask())
    if with_roi:
        roi = np.zeros((H, W), np.uint8)
        roi[2:-2, 2:-2] = 255
        write(root / "roi/test/crack/000_roi.png", roi)
    return root


def make_folder(root: Path) -> Path:
    """good/ (2), dent/ (2) with masks in masks/ under both accepted names, rois/."""
    for i in range(2):
        write(root / "good" / f"g{i}.png", rgb_image(i))
        write(root / "dent" / f"d{i}.png", rgb_image(5 + i))
    write(root / "masks/dent/d0.png", defect_mask())
    write(root / "masks/dent/d1_mask.png", defect_mask())
    write(root / "rois/good/g0_roi.png", np.full((H, W), 255, np.uint8))
    write(root / "rois/dent/d1.png", np.full((H, W), 255, np.uint8))
    return root


def raises_naming(exc_type: type[Exception], func, *args, **kwargs) -> str:
    with pytest.raises(exc_type) as info:
        func(*args, **kwargs)
    return str(info.value)


# ----------------------------------------------------------------------------------- io


def test_read_image_rgb_order_and_range(tmp_path: Path) -> None:
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 0] = 255  # pure blue in OpenCV's BGR order
    img = read_image(write(tmp_path / "blue.png", bgr))
    assert img.dtype == np.float32 and img.shape == (4, 5, 3)
    np.testing.assert_allclose(img[0, 0], [0.0, 0.0, 1.0])


def test_read_image_channels(tmp_path: Path) -> None:
    gray = write(tmp_path / "g.png", gray_image())
    rgb = write(tmp_path / "c.jpg", rgb_image())
    assert read_image(gray).shape == (H, W, 1)
    assert read_image(gray, channels=3).shape == (H, W, 3)
    assert read_image(rgb).shape == (H, W, 3)
    assert read_image(rgb, channels=1).shape == (H, W, 1)
    with pytest.raises(ConfigError):
        read_image(gray, channels=2)


def test_read_image_16bit_alpha_bmp_tiff_and_non_ascii(tmp_path: Path) -> None:
    img16 = np.full((4, 4), 65535, np.uint16)
    img16[0, 0] = 0
    out = read_image(write(tmp_path / "deep.png", img16))
    assert out[0, 0, 0] == 0.0 and out[1, 1, 0] == pytest.approx(1.0)
    rgba = np.dstack([rgb_image(), np.zeros((H, W), np.uint8)])
    assert read_image(write(tmp_path / "a.png", rgba)).shape == (H, W, 3)
    assert read_image(write(tmp_path / "b.BMP", rgb_image())).shape == (H, W, 3)
    assert read_image(write(tmp_path / "t.tiff", gray_image())).shape == (H, W, 1)
    assert read_image(write(tmp_path / "Ampulle_geprüft_安瓿.png", rgb_image())).shape == (H, W, 3)


@pytest.mark.parametrize("kind", ["gray8", "rgb8", "rgba8", "gray16", "rgb16", "gray_alpha", "palette"])
def test_every_png_type_reads_to_its_pixels(tmp_path: Path, kind: str) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    shape = {"gray8": (H, W), "rgb8": (H, W, 3), "rgba8": (H, W, 4), "gray16": (H, W),
             "rgb16": (H, W, 3), "gray_alpha": (H, W, 2), "palette": (H, W)}[kind]
    dtype = np.uint16 if kind.endswith("16") else np.uint8
    pixels = rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)
    path = tmp_path / f"{kind}.png"
    if kind in ("gray_alpha", "palette"):  # OpenCV cannot write these PNG colour types
        Image.fromarray(pixels, "LA" if kind == "gray_alpha" else "L").convert(
            "P" if kind == "palette" else "LA").save(path)
    else:
        write(path, pixels)  # OpenCV: colour stored from BGR(A)
    scale = np.float32(1.0 / np.iinfo(dtype).max)
    if kind == "palette":  # the colours the palette maps to, decoded by Pillow
        expected = np.asarray(Image.open(path).convert("RGB"), np.float32) * np.float32(1 / 255)
    elif pixels.ndim == 2:
        expected = pixels[..., None].astype(np.float32) * scale
    elif kind == "gray_alpha":
        expected = pixels[..., :1].astype(np.float32) * scale
    else:  # RGB order, alpha dropped
        expected = pixels[..., 2::-1].astype(np.float32) * scale
    got = read_image(path)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)


def test_read_mask_binary_and_resized(tmp_path: Path) -> None:
    raw = defect_mask()
    raw[0, 0] = 1  # faint but nonzero still counts
    path = write(tmp_path / "m.png", raw)
    mask = read_mask(path)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert mask[0, 0] == 1 and mask.sum() == (raw > 0).sum()
    small = read_mask(path, size=(7, 9))
    assert small.shape == (7, 9) and set(np.unique(small)) <= {0, 1} and small.any()


def test_list_images_sorted_filtered(tmp_path: Path) -> None:
    for name in ("b.PNG", "a.jpeg", "c.tif", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpeg", "b.PNG", "c.tif"]


# ---------------------------------------------------------------------------- transforms


def test_resize_image_keeps_channel_axis_and_area_averages() -> None:
    img = np.zeros((16, 16, 1), np.float32)
    img[::4, ::4] = 1.0  # one bright pixel per 4x4 block
    small = resize_image(img, 4)
    assert small.shape == (4, 4, 1)
    # INTER_AREA averages each block; INTER_LINEAR would sample between the pixels.
    np.testing.assert_allclose(small, 1 / 16, atol=1e-6)
    assert resize_image(img, (20, 30)).shape == (20, 30, 1)
    assert resize_image(np.zeros((8, 8, 3), np.float32), (5, 6)).shape == (5, 6, 3)


def test_resize_mask_nearest_and_center_crop() -> None:
    mask = (defect_mask() > 0).astype(np.uint8)
    for size in ((7, 11), (50, 61)):
        out = resize_mask(mask, size)
        assert out.shape == size and set(np.unique(out)) == {0, 1}
    arr = np.arange(36).reshape(6, 6)
    np.testing.assert_array_equal(center_crop(arr, 2), [[14, 15], [20, 21]])
    with pytest.raises(ConfigError):
        center_crop(arr, 7)


def test_image_transform_shapes() -> None:
    tf = ImageTransform(image_size=(20, 18), crop_size=16)
    image, mask, roi = tf(rgb_image().astype(np.float32) / 255, defect_mask() > 0, None)
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert mask is not None and mask.shape == (1, 16, 16) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, 1.0} and roi is None
    with pytest.warns(DataWarning, match="RGB but the model takes gray"):
        gray = ImageTransform(12, channels=1).image(rgb_image().astype(np.float32) / 255)
    assert gray.shape == (1, 12, 12)
    with pytest.raises(ConfigError):
        ImageTransform(16, crop_size=20)


# ------------------------------------------------------------------------------- layouts


def test_mvtec_records(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "bottle", with_roi=True)
    write(root / "test/.ipynb_checkpoints/000.png", rgb_image())  # hidden: ignored
    assert detect_layout(root) == "mvtec"
    train = mvtec_records(root, "train")
    assert len(train) == 3 and {r.label for r in train} == {GOOD}
    assert all(r.mask_path is None for r in train)
    test = mvtec_records(root, "test")
    assert [(r.defect_type, r.label) for r in test] == [
        ("crack", DEFECT),
        ("crack", DEFECT),
        ("good", GOOD),
        ("good", GOOD),
        ("scratch", DEFECT),
    ]
    assert test[0].mask_path == root / "ground_truth/crack/000_mask.png"
    assert test[0].roi_path == root / "roi/test/crack/000_roi.png"
    assert test[1].roi_path is None
    assert all(r.mask_path is None for r in mvtec_records(root, "test", masks=False))


def test_mvtec_layout_with_only_a_test_split_is_a_validation_set(tmp_path: Path) -> None:
    import shutil

    root = make_mvtec(tmp_path / "val")
    shutil.rmtree(root / "train")
    assert detect_layout(root) == "mvtec"
    assert len(records_for(root, "test")) == 5
    msg = raises_naming(DataError, records_for, root, "train")
    assert "val" in msg and "train/good" in msg


def test_folder_records_with_masks_and_roi(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "vials")
    assert detect_layout(root) == "folder"
    recs = folder_records(root, mask_dir="masks", roi_dir="rois")
    by_name = {r.path.name: r for r in recs}
    assert [r.path.name for r in recs] == ["g0.png", "g1.png", "d0.png", "d1.png"]
    assert by_name["g0.png"].label == GOOD and by_name["g0.png"].mask_path is None
    assert by_name["g0.png"].roi_path == root / "rois/good/g0_roi.png"
    assert by_name["d0.png"].defect_type == "dent" and by_name["d0.png"].label == DEFECT
    assert by_name["d0.png"].mask_path == root / "masks/dent/d0.png"
    assert by_name["d1.png"].mask_path == root / "masks/dent/d1_mask.png"
    assert by_name["d1.png"].roi_path == root / "rois/dent/d1.png"
    train = records_for(root, "train", mask_dir="masks", roi_dir="rois")
    assert [r.path.name for r in train] == ["g0.png", "g1.png"]
    assert len(records_for(root, "test", mask_dir="masks", roi_dir="rois")) == 4


# ------------------------------------------------------------------------------- dataset


def test_dataset_and_loader_mvtec(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "bottle", with_roi=True)
    with pytest.warns(DataWarning, match="ROI masks in .*roi.* are not used"):
        ds = ImageDataset(mvtec_records(root, "test"), ImageTransform(20, crop_size=16))
    assert len(ds) == 5 and ds.channels == 3
    sample = ds[0]
    assert sample.image.shape == (3, 16, 16) and sample.label == DEFECT
    assert sample.mask is not None and set(sample.mask.unique().tolist()) == {0.0, 1.0}
    assert sample.roi is None  # ROIs are indexed but not read (nothing uses them yet)
    assert sample.defect_type == "crack" and sample.path.endswith("000.png")
    batches = list(make_loader(ds, batch_size=3))
    assert [len(b) for b in batches] == [3, 2] and isinstance(batches[0], Batch)
    first = batches[0]
    assert first.image.shape == (3, 3, 16, 16) and first.mask is not None
    assert first.label.tolist() == [DEFECT, DEFECT, GOOD]
    assert first.mask[2].sum() == 0  # good image: all-zero mask from collate


def test_dataset_grayscale_and_folder_layout(tmp_path: Path) -> None:
    gray = ImageDataset(mvtec_records(make_mvtec(tmp_path / "g", gray=True)), ImageTransform(8))
    assert gray.channels == 1 and gray[0].image.shape == (1, 8, 8)
    recs = folder_records(make_folder(tmp_path / "f"), mask_dir="masks", roi_dir="rois")
    with pytest.warns(DataWarning, match="not used by this detector"):
        ds = ImageDataset(recs, ImageTransform(8))
    batch = next(iter(make_loader(ds, batch_size=4)))
    assert batch.image.shape == (4, 3, 8, 8) and batch.mask is not None and batch.roi is None
    assert batch.mask[:2].sum() == 0 and batch.mask[2:].sum() > 0


def test_dataset_reads_lazily(tmp_path: Path) -> None:
    good = write(tmp_path / "ok.png", rgb_image())
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    ds = ImageDataset([Record(good, GOOD, "good"), Record(bad, GOOD, "good")], ImageTransform(8))
    assert ds[0].image.shape == (3, 8, 8)
    with pytest.raises(DataError, match="bad.png"):
        ds[1]


def test_explicit_channels_convert_mixed_dataset(tmp_path: Path) -> None:
    recs = [
        Record(write(tmp_path / "a.png", rgb_image()), GOOD, "good"),
        Record(write(tmp_path / "b.png", gray_image()), GOOD, "good"),
    ]
    with pytest.warns(DataWarning, match="b.png is gray but the model takes RGB"):
        assert ImageDataset(recs, ImageTransform(8), channels=3)[1].image.shape == (3, 8, 8)
    with pytest.warns(DataWarning, match="a.png is RGB but the model takes gray"):
        assert ImageDataset(recs, ImageTransform(8), channels=1)[0].image.shape == (1, 8, 8)


# ---------------------------------------------------------------------------- bad input


def test_unreadable_image(tmp_path: Path) -> None:
    path = tmp_path / "noise_img.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    msg = raises_naming(DataError, read_image, path)
    assert "noise_img.png" in msg and "cannot read image" in msg
    empty = tmp_path / "empty_img.png"
    empty.write_bytes(b"")
    assert "empty_img.png" in raises_naming(DataError, read_image, empty)


def test_truncated_png_and_jpeg(tmp_path: Path) -> None:
    whole = write(tmp_path / "whole.png", rgb_image(h=64, w=64)).read_bytes()
    half = tmp_path / "half_png.png"
    half.write_bytes(whole[: len(whole) // 2])
    msg = raises_naming(DataError, read_image, half)
    assert "half_png.png" in msg and "truncated PNG" in msg
    jpeg = write(tmp_path / "whole.jpg", rgb_image(h=64, w=64)).read_bytes()
    cut = tmp_path / "cut_jpeg.jpg"
    cut.write_bytes(jpeg[: len(jpeg) - 40])
    msg = raises_naming(DataError, read_image, cut)
    assert "cut_jpeg.jpg" in msg and "truncated JPEG" in msg
    assert "half_png.png" in raises_naming(DataError, read_mask, half)


def test_missing_root_and_wrong_layout(tmp_path: Path) -> None:
    assert "nowhere_ds" in raises_naming(DataError, mvtec_records, tmp_path / "nowhere_ds")
    odd = tmp_path / "odd_ds"
    write(odd / "images" / "x.png", rgb_image())
    msg = raises_naming(DataError, mvtec_records, odd)
    assert "odd_ds" in msg and "ROOT/train/good/*.png" in msg
    assert "odd_ds" in raises_naming(DataError, detect_layout, odd)
    assert "odd_ds" in raises_naming(DataError, records_for, odd, "train")
    assert "good/" in raises_naming(DataError, folder_records, odd)


def test_empty_folders(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "train/good").mkdir(parents=True)
    msg = raises_naming(DataError, mvtec_records, root, "train")
    assert str(root / "train" / "good") in msg and "no images" in msg
    write(root / "train/good/0.png", rgb_image())
    (root / "test").mkdir()
    assert str(root / "test") in raises_naming(DataError, mvtec_records, root, "test")
    folder = tmp_path / "flat"
    write(folder / "good/0.png", rgb_image())
    (folder / "empty_defect").mkdir()
    assert "empty_defect" in raises_naming(DataError, folder_records, folder)
    assert "no images" in raises_naming(DataError, ImageDataset, [], ImageTransform(8))


def test_missing_mask(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "bottle")
    (root / "ground_truth/scratch/000_mask.png").unlink()
    msg = raises_naming(DataError, mvtec_records, root, "test")
    assert "scratch" in msg and "000.png" in msg and "000_mask.png" in msg
    assert "masks=False" in msg and "--no-masks" in msg and "2 of the 3" in msg
    assert all(r.mask_path is None for r in mvtec_records(root, "test", masks=False))
    folder = make_folder(tmp_path / "vials")
    (folder / "masks/dent/d1_mask.png").unlink()
    msg = raises_naming(DataError, folder_records, folder, mask_dir="masks", roi_dir="rois")
    assert "d1.png" in msg and "d1_mask.png" in msg


def test_no_ground_truth_folder_reads_image_labels_only(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "bottle")
    shutil.rmtree(root / "ground_truth")
    test = records_for(root, "test")
    assert [r.label for r in test] == [DEFECT, DEFECT, GOOD, GOOD, DEFECT]
    assert all(r.mask_path is None for r in test)
    # an empty ground_truth/ folder means the same: no defect image has a mask
    (root / "ground_truth" / "crack").mkdir(parents=True)
    assert all(r.mask_path is None for r in records_for(root, "test"))


def test_mask_of_wrong_size(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "bottle")
    write(root / "ground_truth/crack/001_mask.png", defect_mask(h=H + 6, w=W))
    ds = ImageDataset(mvtec_records(root, "test"), ImageTransform(8))
    ds[0]  # the intact pair still loads
    msg = raises_naming(DataError, ds.__getitem__, 1)
    assert "001_mask.png" in msg and "001.png" in msg
    assert f"{H + 6}x{W}" in msg and f"{H}x{W}" in msg


def test_mixed_channels(tmp_path: Path) -> None:
    recs = [
        Record(write(tmp_path / "rgb0.png", rgb_image()), GOOD, "good"),
        Record(write(tmp_path / "gray_one.png", gray_image()), GOOD, "good"),
    ]
    ds = ImageDataset(recs, ImageTransform(8))
    assert ds.channels == 3
    msg = raises_naming(DataError, ds.__getitem__, 1)
    assert "gray_one.png" in msg and "--channels 1" in msg and "--channels 3" in msg
