"""Atomic writes: files get the user's umask, and a failed write leaves the old file intact."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from anomalyqc.fileio import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_png


@pytest.fixture
def umask() -> Iterator[Callable[[int], int]]:
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_follow_the_umask(tmp_path: Path, umask, mask: int, expected: int) -> None:
    umask(mask)
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    atomic_write_json(tmp_path / "sub" / "b.json", {"k": 1})
    atomic_write_png(tmp_path / "c.png", np.zeros((4, 4), np.uint8))
    with atomic_path(tmp_path / "d.safetensors") as tmp:
        tmp.write_bytes(b"y")
    for name in ("a.bin", "sub/b.json", "c.png", "d.safetensors"):
        assert mode(tmp_path / name) == expected, name
    assert mode(tmp_path / "sub") == 0o777 & ~mask


def test_a_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "threshold.json"
    atomic_write_json(target, {"value": 1})
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b'{"val')  # half written, then the writer fails
            raise RuntimeError("disk full")
    assert target.read_bytes() == before
    with pytest.raises(TypeError):  # not serialisable: fails before anything is replaced
        atomic_write_json(target, {"value": object()})
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["threshold.json"]  # no temp left


def test_a_failed_weights_save_keeps_the_previous_run(tmp_path: Path, monkeypatch) -> None:
    from anomalyqc.models import storage
    from anomalyqc.models.base import detector_class

    det = detector_class("padim")({"backbone": "efficientnet_lite0", "image_size": 32})
    det.fit([torch.rand(4, 3, 32, 32)])
    run = tmp_path / "run"
    det.save(run)
    weights = (run / storage.WEIGHTS_FILE).read_bytes()

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(weights[:100])  # a partial file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage, "save_file", broken_save)
    with pytest.raises(OSError, match="No space"):
        det.save(run)
    assert (run / storage.WEIGHTS_FILE).read_bytes() == weights
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
