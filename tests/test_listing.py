"""Dataset and predict listings: every entry not read is listed with its reason, FIFOs never
block a listing, and annotation folders are never read as defect classes."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from anomalyqc.data import dataset_listing, folder_listing, mvtec_listing, records_for
from anomalyqc.data.listing import classify, skipped_summary
from anomalyqc.errors import DataError
from anomalyqc.types import GOOD
from tests.test_data import make_folder, make_mvtec, raises_naming, rgb_image, write


@pytest.fixture
def alarm():
    """Fail (instead of hanging the suite) if a listing blocks on a FIFO."""
    def hang(*_):
        raise TimeoutError("blocked: a FIFO was opened")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def add_hostile_entries(folder: Path) -> dict[str, str]:
    """Every kind of entry that is named like an image (or sits among images) but is not a
    readable image; returns name -> a word its skip reason must contain."""
    os.symlink(folder / "missing.png", folder / "dead.png")
    os.symlink(folder / "loop.png", folder / "loop.png")
    os.mkfifo(folder / "pipe.png")
    (folder / "dir.png").mkdir()
    (folder / "sub").mkdir()
    write(folder / "sub" / "nested.png", rgb_image(9))
    (folder / "anim.gif").write_bytes(b"GIF89a")
    (folder / "notes.txt").write_text("n")
    write(folder / ".hidden.png", rgb_image(8))
    return {"dead.png": "dangling symlink", "loop.png": "symlink loop", "pipe.png": "FIFO",
            "dir.png": "folder named like an image", "sub": "subfolder",
            "anim.gif": "unsupported extension .gif", "notes.txt": "unsupported extension .txt",
            ".hidden.png": "hidden file"}


def reasons(listing) -> dict[str, str]:
    return {s.path.name: s.reason for s in listing.skipped}


def test_type_folder_lists_every_entry_it_skips(tmp_path: Path, alarm) -> None:
    root = make_mvtec(tmp_path / "bottle")
    expected = add_hostile_entries(root / "test" / "good")
    listing = mvtec_listing(root, "test")
    assert len(listing.records) == 5  # the five real images, nothing else
    got = reasons(listing)
    for name, word in expected.items():
        assert word in got[name], (name, got[name])
    assert len(listing.skipped) == len(expected)
    # records_for is the same listing without the skipped entries
    assert [r.path for r in records_for(root, "test")] == [r.path for r in listing.records]


def test_root_and_split_entries_are_listed_documentation_is_not(tmp_path: Path, alarm) -> None:
    root = make_mvtec(tmp_path / "bottle")
    write(root / "stray.png", rgb_image(3))
    (root / "validation").mkdir()
    (root / "readme.txt").write_text("docs")
    os.mkfifo(root / "test" / "pipe.png")
    write(root / "test" / ".ipynb_checkpoints" / "000.png", rgb_image(4))
    got = reasons(mvtec_listing(root, "test"))
    assert "loose in the dataset root" in got["stray.png"]
    assert "not part of the MVTec layout" in got["validation"]
    assert "FIFO" in got["pipe.png"] and "hidden folder" in got[".ipynb_checkpoints"]
    assert "readme.txt" not in got
    folder = make_folder(tmp_path / "vials")
    write(folder / "loose.jpg", rgb_image(5))
    listing = folder_listing(folder, mask_dir="masks", roi_dir="rois")
    assert "loose in the dataset root" in reasons(listing)["loose.jpg"]
    train = dataset_listing(folder, "train", mask_dir="masks", roi_dir="rois")
    assert all(r.label == GOOD for r in train.records) and "loose.jpg" in reasons(train)


def test_classify_never_opens_a_fifo(tmp_path: Path, alarm) -> None:
    os.mkfifo(tmp_path / "p.png")
    entry = classify(tmp_path / "p.png")
    assert entry.kind == "broken" and "FIFO" in entry.reason


@pytest.mark.parametrize("name", ["masks", "Ground_Truth", "roi", "mask", "labels"])
def test_annotation_folder_in_folder_layout_is_an_error(tmp_path: Path, name: str) -> None:
    root = tmp_path / "ds"
    write(root / "good" / "g.png", rgb_image(0))
    write(root / "dent" / "d.png", rgb_image(1))
    write(root / name / "dent" / "d.png", rgb_image(2))
    msg = raises_naming(DataError, records_for, root, "test")
    assert name in msg and "mask_dir" in msg and "defective" in msg
    # named as what it is, it is read correctly
    if name.lower() in ("masks", "mask", "labels"):
        recs = records_for(root, "test", mask_dir=name)
        assert [r.defect_type for r in recs] == ["good", "dent"]
        assert recs[1].mask_path == root / name / "dent" / "d.png"
    # or the defect folders are listed explicitly
    assert len(records_for(root, "test", defect_dirs=["dent"])) == 2


def test_annotation_folder_in_mvtec_split_is_an_error(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "bottle")
    write(root / "test" / "masks" / "000_mask.png", rgb_image(0))
    msg = raises_naming(DataError, records_for, root, "test")
    assert "masks" in msg and "ground_truth" in msg


def test_summary_line_counts_and_first_entries(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "bottle")
    add_hostile_entries(root / "test" / "good")
    listing = mvtec_listing(root, "test")
    line = skipped_summary(5, 5, listing.skipped, first=3)
    assert line.startswith("5 image(s) found, 5 scored, 8 entries skipped: ")
    assert "and 5 more" in line and line.count("(") >= 3
    assert skipped_summary(2, None, []) == "2 image(s) found, 0 entries skipped"
