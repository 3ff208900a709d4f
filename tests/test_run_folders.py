"""Run folders a reviewer can trust: tensors checked against the config, thresholds bound to
their model, folders written whole (fit, merge, report, predict), a second writer refused,
and a kill -9 or a full disk never leaving a mix of old and new."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import SMALL, invoke, stdout_json
from safetensors.torch import load_file, save_file

from anomalyqc.errors import ModelFileError, OutputError
from anomalyqc.fileio import atomic_folder, atomic_write_bytes, folder_lock, recover_folder
from anomalyqc.models.base import detector_class
from anomalyqc.models.storage import (
    MODEL_FILES,
    file_sha256,
    load_detector,
    model_id_of,
    read_manifest,
    write_manifest,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- helpers
def siblings(folder: Path) -> list[str]:
    """The hidden temporaries, swap leftovers and lock files a writer of `folder` makes."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def fitted(name: str, size: int | tuple[int, int] = 32, **params) -> object:
    """A detector fitted on random images with a random-weight backbone (plumbing only)."""
    det = detector_class(name)({"image_size": size, "pretrained": False, **params})
    g = torch.Generator().manual_seed(0)
    h, w = (size, size) if isinstance(size, int) else size
    det.fit([torch.rand(4, 3, h, w, generator=g) for _ in range(2)])
    return det


def reseal(run: Path, params: Callable[[dict], object] | None = None,
           tensors: Callable[[dict], dict] | None = None) -> None:
    """Edit a run's config and/or weights and rewrite its manifest to match: a consistent
    forgery that SHA-256 checks alone cannot catch."""
    cfg_path = run / "config.json"
    if params is not None:
        cfg = json.loads(cfg_path.read_text())
        cfg["params"] = params(cfg["params"])
        cfg_path.write_text(json.dumps(cfg))
    if tensors is not None:
        t = tensors(load_file(run / "weights.safetensors"))
        save_file(t, run / "weights.safetensors", metadata={"format": "anomalyqc-run:x"})
    man_path = run / "manifest.json"
    man = json.loads(man_path.read_text())
    man["files"] = {n: file_sha256(run / n) for n in MODEL_FILES}
    man["model_id"] = model_id_of(man["files"])
    man_path.write_text(json.dumps(man))


def _reseal_manifest(run: Path, cfg: dict) -> None:
    """write_manifest as save_detector calls it, for the edited config: a consistent forgery."""
    det = detector_class(cfg["detector"])(cfg["params"])
    write_manifest(run, det.input_size, det.config.channels)


def with_params(**changes) -> Callable[[dict], dict]:
    return lambda p: {**p, **changes}


# ----------------------------------------------------- 1. tensors checked against config
VARIANTS = [
    ("padim", {}),
    ("padim", {"reduction": "pca", "reduced_dim": 8, "pca_images": 4}),
    ("padim", {"reduction": "srp", "reduced_dim": 8, "pca_images": 4}),
    ("padim", {"reduction": "random", "reduced_dim": 8}),
    ("padim", {"keep_moments": False}),
    ("patchcore", {}),
    ("patchcore", {"coreset": "kmeans"}),
    ("mhbc", {"n_clusters": 3}),
    ("mhbc", {"n_clusters": 3, "covariance": "pooled"}),
    ("mhbc", {"n_clusters": 3, "covariance": "global"}),
    ("mhbc", {"n_clusters": 3, "covariance": "none"}),
    ("mhbc", {"clustering": "coreset", "coreset_ratio": 0.5}),
    ("mhbc", {"n_clusters": 3, "passes": 2}),
]


@pytest.mark.parametrize("name,params", VARIANTS, ids=lambda v: str(v))
def test_every_variant_passes_the_shape_check(tmp_path: Path, name: str, params: dict):
    det = fitted(name, **params)
    x = torch.rand(2, 3, 32, 32)
    for merge_state in (False, True):
        loaded = load_detector(det.save(tmp_path / "run"), merge_state=merge_state)
        assert loaded.predict(x).score.shape == (2,)  # (random backbone: scores differ)
        for key, value in loaded.state_tensors().items():
            torch.testing.assert_close(value, det.state_tensors()[key])


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "efficientnet_lite2", "resnet18"])
def test_odd_sizes_pass_the_shape_check(tmp_path: Path, backbone: str):
    # backbones round odd sizes differently (lite0 and lite2 disagree on 63x65)
    det = fitted("padim", (63, 65), backbone=backbone)
    load_detector(det.save(tmp_path / "run"))


FORGERIES = {
    "image size": ("padim", {}, {"image_size": 64}, "64x64"),
    "backbone": ("padim", {}, {"backbone": "efficientnet_lite2"}, "efficientnet_lite2"),
    "reduced dim": ("padim", {"reduction": "pca", "reduced_dim": 8, "pca_images": 4},
                    {"reduced_dim": 9}, "reduction to 9"),
    "clusters": ("mhbc", {"n_clusters": 3}, {"n_clusters": 4}, "centroids"),
    "covariance": ("mhbc", {"n_clusters": 3}, {"covariance": "global"}, "1x152"),
    "reduction dropped": ("padim", {"reduction": "srp", "reduced_dim": 8, "pca_images": 4},
                          {"reduction": "none"}, "efficientnet_lite0 at 32x32"),
}


@pytest.mark.parametrize("case", sorted(FORGERIES))
def test_a_consistent_forgery_of_the_config_is_refused(tmp_path: Path, case: str):
    """Config edited and the manifest rewritten to match (write_manifest does both): the
    SHA-256 checks pass, the tensors no longer fit the config."""
    name, params, edit, word = FORGERIES[case]
    run = fitted(name, **params).save(tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    cfg["params"].update(edit)
    (run / "config.json").write_text(json.dumps(cfg))
    _reseal_manifest(run, cfg)
    read_manifest(run)  # the forgery is consistent: every digest matches
    with pytest.raises(ModelFileError) as info:
        load_detector(run)
    msg = str(info.value)
    assert "weights.safetensors" in msg and "config.json" in msg and word in msg, msg
    assert "\n" not in msg


def test_an_extra_tensor_the_config_has_no_place_for_is_refused(tmp_path: Path):
    run = fitted("padim").save(tmp_path / "run")
    reseal(run, tensors=lambda t: {**t, "reduction.matrix": torch.eye(152)[:, :8].contiguous(),
                                   "reduction.mean": torch.zeros(152)})
    with pytest.raises(ModelFileError, match="unexpected tensor 'reduction"):
        load_detector(run)


def test_tensors_of_the_wrong_dtype_are_refused(tmp_path: Path):
    run = fitted("patchcore").save(tmp_path / "run")
    reseal(run, tensors=lambda t: {**t, "memory_bank": t["memory_bank"].to(torch.int32)})
    with pytest.raises(ModelFileError, match="memory_bank.*dtype"):
        load_detector(run)


@pytest.mark.parametrize("params", [
    with_params(image_size="big"),
    with_params(n_clusters="four"),
    with_params(reduction="magic"),
    with_params(no_such_param=1),
    lambda p: [1, 2, 3],
    lambda p: "padim",
], ids=["size-type", "int-type", "literal", "unknown", "list", "string"])
def test_params_of_the_wrong_type_name_config_json(tmp_path: Path, params):
    run = fitted("mhbc", n_clusters=3).save(tmp_path / "run")
    reseal(run, params=params)
    with pytest.raises(ModelFileError) as info:
        load_detector(run)
    assert str(run / "config.json") in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("size", [100_000, [4, 4]])
def test_absurd_sizes_in_config_json_are_refused_without_allocating(tmp_path: Path, size):
    run = fitted("padim").save(tmp_path / "run")
    reseal(run, params=with_params(image_size=size))
    with pytest.raises(ModelFileError) as info:
        load_detector(run)
    assert str(run / "config.json") in str(info.value)


def test_manifest_fields_must_match_the_config(tmp_path: Path):
    run = fitted("padim").save(tmp_path / "run")
    man = json.loads((run / "manifest.json").read_text())
    man["input_size"] = [64, 64]  # not covered by the model id: checked against the config
    (run / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ModelFileError, match="manifest.json says input_size"):
        load_detector(run)


# -------------------------------------------------------------- 3. atomic folder writes
def test_atomic_folder_swaps_a_complete_folder_in(tmp_path: Path):
    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        assert not out.exists()  # nothing visible until the folder is complete
        atomic_write_bytes(tmp / "a.txt", b"one")
    assert snapshot(out) == {"a.txt": b"one"} and siblings(out) == []
    with atomic_folder(out) as tmp:
        atomic_write_bytes(tmp / "b.txt", b"two")
    assert snapshot(out) == {"b.txt": b"two"} and siblings(out) == []  # replaced whole


def test_a_replaced_folder_is_never_missing(tmp_path: Path, monkeypatch):
    """Replacing an existing folder swaps it in one atomic exchange where the kernel can
    (the folder is never renamed away, so no reader finds it missing); elsewhere the
    fallback's two renames give the same result."""
    from anomalyqc import fileio

    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        atomic_write_bytes(tmp / "a.txt", b"one")
    moved: list[str] = []
    real_rename = os.rename

    def spy(src, dst, *a, **k):
        moved.append(Path(src).name)
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", spy)
    with atomic_folder(out) as tmp:
        atomic_write_bytes(tmp / "b.txt", b"two")
    assert snapshot(out) == {"b.txt": b"two"} and siblings(out) == []
    if fileio._exchange(tmp_path / "out", tmp_path / "out"):  # this kernel swaps atomically
        assert "out" not in moved, moved
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    with atomic_folder(out) as tmp:
        atomic_write_bytes(tmp / "c.txt", b"three")
    assert snapshot(out) == {"c.txt": b"three"} and siblings(out) == []
    assert "out" in moved  # the fallback renamed the old folder away


def test_a_failed_write_leaves_the_old_folder_and_no_temporaries(tmp_path: Path):
    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        atomic_write_bytes(tmp / "a.txt", b"one")
    with pytest.raises(RuntimeError), atomic_folder(out) as tmp:
        atomic_write_bytes(tmp / "b.txt", b"half")
        raise RuntimeError("failed half way")
    assert snapshot(out) == {"a.txt": b"one"} and siblings(out) == []


def test_check_existing_can_refuse_and_a_file_is_never_replaced(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def refuse(folder: Path) -> None:
        raise OutputError(f"{folder} is not mine")

    with pytest.raises(OutputError, match="is not mine"), atomic_folder(out, refuse):
        pytest.fail("the body must not run")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"), atomic_folder(tmp_path / "file"):
        pytest.fail("the body must not run")
    assert (out / "keep.txt").read_text() == "mine" and siblings(out) == []


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path: Path):
    out = tmp_path / "out"
    with folder_lock(out):
        with pytest.raises(OutputError, match="another anomalyqc process"), atomic_folder(out):
            pytest.fail("the body must not run")
    with atomic_folder(out) as tmp:  # released: the next writer gets it
        (tmp / "x").write_text("x")
    assert siblings(out) == []  # the lock file goes with the lock


def test_a_killed_lock_holder_does_not_leave_the_folder_locked(tmp_path: Path):
    out = tmp_path / "out"
    code = ("import os, signal, sys; from anomalyqc.fileio import folder_lock\n"
            f"with folder_lock({str(out)!r}):\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", code], check=False)
    assert r.returncode == -9
    assert siblings(out) == [".out.lock"]  # the file stays, the lock does not
    with atomic_folder(out) as tmp:
        (tmp / "x").write_text("x")
    assert siblings(out) == []


@pytest.mark.parametrize("left,expected", [
    ({"new": "N", "old": "O"}, "N"),  # killed between the two renames: the new one is complete
    ({"old": "O"}, "O"),  # killed after moving the old one aside, before any new one
    ({"tmp": "T", "new": "N"}, "N"),  # a half-built folder never wins
])
def test_an_interrupted_swap_is_recovered(tmp_path: Path, left: dict, expected: str):
    out = tmp_path / "out"
    for kind, content in left.items():
        d = tmp_path / f".out.{kind}-abc"
        d.mkdir()
        (d / "x").write_text(content)
    with folder_lock(out):
        recover_folder(out)
    assert (out / "x").read_text() == expected and siblings(out) == []


def test_a_reader_recovers_a_run_whose_swap_was_interrupted(tmp_path: Path):
    fitted("padim").save(tmp_path / ".run.new-abc")  # complete, not yet renamed
    (tmp_path / ".run.old-abc").mkdir()
    det = load_detector(tmp_path / "run")
    assert det.model_id == read_manifest(tmp_path / "run").model_id
    assert siblings(tmp_path / "run") == []


def test_stale_temporaries_beside_a_complete_folder_are_removed(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("current")
    for kind in ("tmp", "new", "old"):
        (tmp_path / f".out.{kind}-abc").mkdir()
    (tmp_path / ".other.tmp-abc").mkdir()  # another folder's: not ours to touch
    with atomic_folder(out) as tmp:
        (tmp / "x").write_text("next")
    assert siblings(out) == [] and (tmp_path / ".other.tmp-abc").is_dir()


def test_long_folder_names_get_short_temporaries(tmp_path: Path):
    out = tmp_path / ("r" * 250)
    with atomic_folder(out) as tmp:
        assert len(tmp.name) < 255
        (tmp / "x").write_text("x")
    assert (out / "x").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


# --------------------------------------------------- fit, merge, report, predict: folders
def test_fit_into_a_run_needs_overwrite_and_never_replaces_foreign_folders(
        tiny_vials: Path, run_copy: Path, tmp_path: Path):
    before = snapshot(run_copy)
    r = invoke("fit", "padim", "--data", tiny_vials, "--out", run_copy, *SMALL)
    assert r.exit_code == 2 and "--overwrite" in r.output and "Traceback" not in r.output
    assert snapshot(run_copy) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        r = invoke("fit", "padim", "--data", tiny_vials, "--out", mine, *SMALL, *extra)
        assert r.exit_code == 2 and "holds no anomalyqc model" in r.output
    assert snapshot(mine) == {"notes.txt": b"keep me"}
    # merge writes its --out the same way
    r = invoke("merge", run_copy, run_copy, "--out", run_copy)
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert snapshot(run_copy) == before


def test_refit_replaces_the_whole_run_and_an_old_threshold_is_refused(
        tiny_vials: Path, run_copy: Path, tmp_path: Path):
    good = tiny_vials / "test" / "good"
    assert invoke("calibrate", run_copy, "--data", tiny_vials).exit_code == 0
    old_threshold = (run_copy / "threshold.json").read_text()
    old_id = read_manifest(run_copy).model_id
    assert json.loads(old_threshold)["model_id"] == old_id
    r = invoke("fit", "padim", "--data", tiny_vials, "--out", run_copy, *SMALL,
               "--set", "eps=0.02", "--overwrite")
    assert r.exit_code == 0, r.output
    new_id = read_manifest(run_copy).model_id
    assert new_id != old_id
    assert not (run_copy / "threshold.json").exists()  # went with the old model
    assert siblings(run_copy) == []
    # put back by hand (or by a tool that copies files): refused, never applied
    (run_copy / "threshold.json").write_text(old_threshold)
    for args in (["predict", run_copy, good, "--out", tmp_path / "p"],
                 ["evaluate", run_copy, "--data", tiny_vials]):
        r = invoke(*args)
        assert r.exit_code == 2, r.output
        assert old_id in r.output and new_id in r.output and "anomalyqc calibrate" in r.output
    # a threshold written before thresholds named their model is refused the same way
    raw = json.loads(old_threshold)
    del raw["model_id"]
    (run_copy / "threshold.json").write_text(json.dumps(raw))
    r = invoke("predict", run_copy, good, "--out", tmp_path / "p")
    assert r.exit_code == 2 and "records no model id" in r.output and new_id in r.output
    assert not (tmp_path / "p").exists()


def test_predictions_and_metrics_record_the_model_id(tiny_vials: Path, run_copy: Path,
                                                     tmp_path: Path):
    model_id = read_manifest(run_copy).model_id
    r = invoke("evaluate", run_copy, "--data", tiny_vials, "--report", tmp_path / "r" / "m.json")
    assert r.exit_code == 0, r.output
    assert stdout_json(r.stdout)["model_id"] == model_id
    assert json.loads((tmp_path / "r" / "m.json").read_text())["model_id"] == model_id
    assert json.loads((run_copy / "threshold.json").read_text())["model_id"] == model_id
    r = invoke("predict", run_copy, tiny_vials / "test" / "good", "--out", tmp_path / "p")
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert rows and all(row["model_id"] == model_id for row in rows)
    assert siblings(tmp_path / "p") == [] and siblings(tmp_path / "r") == []


def test_reports_and_predictions_never_replace_foreign_folders(tiny_vials: Path, run_copy: Path,
                                                               tmp_path: Path):
    run_before = snapshot(run_copy)
    good = tiny_vials / "test" / "good"
    images_before = snapshot(good)
    r = invoke("evaluate", run_copy, "--data", tiny_vials, "--report", run_copy / "m.json")
    assert r.exit_code == 2 and "is a run folder" in r.output
    assert "predicting" not in r.output  # refused before any image is scored
    r = invoke("predict", run_copy, good, "--out", good)
    assert r.exit_code == 2 and str(good) in r.output
    assert snapshot(run_copy) == run_before and snapshot(good) == images_before
    # an earlier predictions folder is replaced whole: no old heatmap stays beside new ones
    out = tmp_path / "p"
    assert invoke("predict", run_copy, good, "--out", out).exit_code == 0
    (out / "zzz_old_heatmap.png").write_bytes(b"old")
    assert invoke("predict", run_copy, good, "--out", out).exit_code == 0
    assert not (out / "zzz_old_heatmap.png").exists() and siblings(out) == []


# ------------------------------------------------------------------------ out of disk
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], None]]:
    """A real tmpfs at tmp_path/disk; the fixture's value resizes it to `used + margin`
    bytes, so the next write that needs more than `margin` runs out of space."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)],
                       capture_output=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")

    def shrink(margin: int) -> None:
        st = os.statvfs(disk)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        size = (used + margin + 4095) // 4096 * 4096
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)

    try:
        yield shrink
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_read_only_disk_is_one_line(small_disk, tiny_vials: Path, tmp_path: Path):
    disk = tmp_path / "disk"
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    r = invoke("fit", "padim", "--data", tiny_vials, "--out", disk / "run", *SMALL)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "read-only file system" in r.output and str(disk / "run") in r.output


def _out_of_disk(r, folder: Path) -> None:
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.output
    line = errors[0]
    assert "no space left" in line and str(folder) in line and "Traceback" not in r.output


def test_fit_out_of_disk_leaves_the_old_run(small_disk, tiny_vials: Path, tiny_run: Path,
                                            tmp_path: Path):
    run = tmp_path / "disk" / "run"
    shutil.copytree(tiny_run, run)
    before = snapshot(run)
    small_disk(64 * 1024)  # far less than a second copy of the weights
    r = invoke("fit", "padim", "--data", tiny_vials, "--out", run, *SMALL, "--overwrite")
    _out_of_disk(r, run)
    assert snapshot(run) == before and siblings(run) == []
    load_detector(run)


def test_report_out_of_disk_leaves_the_old_report(small_disk, tiny_vials: Path, run_copy: Path,
                                                  tmp_path: Path):
    report = tmp_path / "disk" / "rep"
    assert invoke("evaluate", run_copy, "--data", tiny_vials,
                  "--report", report / "metrics.json").exit_code == 0
    before = snapshot(report)
    small_disk(8 * 1024)
    r = invoke("evaluate", run_copy, "--data", tiny_vials, "--report", report / "metrics.json")
    _out_of_disk(r, report)
    assert snapshot(report) == before and siblings(report) == []


def test_predict_out_of_disk_leaves_the_old_predictions(small_disk, tiny_vials: Path,
                                                        run_copy: Path, tmp_path: Path):
    out = tmp_path / "disk" / "pred"
    good = tiny_vials / "test" / "good"
    assert invoke("predict", run_copy, good, "--out", out).exit_code == 0
    before = snapshot(out)
    small_disk(4 * 1024)
    r = invoke("predict", run_copy, good, "--out", out)
    _out_of_disk(r, out)
    assert snapshot(out) == before and siblings(out) == []


# --------------------------------------------------------------- kill -9 and concurrency
# CLI processes forked from a server that has imported anomalyqc once: each is a real
# process running the real command line, killed with SIGKILL, without paying for a fresh
# interpreter and torch import each time.
_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["anomalyqc.cli", "anomalyqc.workflow", "anomalyqc.evaluation.report",
                             "kornia.filters", "cv2", "matplotlib.pyplot", __name__])


def _cli_main(args: list[str], log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)
    from anomalyqc.cli import app

    app([str(a) for a in args], prog_name="anomalyqc")


def start_cli(log: Path, *args: object) -> mp.process.BaseProcess:
    p = _CTX.Process(target=_cli_main, args=([str(a) for a in args], str(log)))
    p.start()
    return p


def _temporaries(folder: Path) -> set[Path]:
    return set(folder.parent.glob(f".{folder.name}.tmp-*"))


def _has(name: str | None) -> Callable[[Path | None], bool]:
    """A kill point: the temporary folder exists (and holds `name`, or anything for '*')."""
    def ready(tmp: Path | None) -> bool:
        if tmp is None:
            return False
        if name is None:
            return True
        try:
            return any(tmp.iterdir()) if name == "*" else (tmp / name).exists()
        except FileNotFoundError:
            return False
    return ready


def kill_at(folder: Path, point: Callable[[Path | None], bool], log: Path, *args: object) -> int:
    """Run a command and kill -9 it as soon as `point` holds for its temporary folder (or
    let it finish when the point is passed unseen); its exit code (-9 when killed)."""
    earlier = _temporaries(folder)  # left by processes killed before: not this one's
    p = start_cli(log, *args)
    deadline = time.monotonic() + 120
    while p.is_alive() and time.monotonic() < deadline:
        mine = sorted(_temporaries(folder) - earlier)
        if point(mine[0] if mine else None):
            p.kill()
            break
        time.sleep(0.0005)
    p.join(30)
    assert p.exitcode in (0, -9), log.read_text()
    if os.environ.get("KILL_DEBUG"):
        print("KILL", args[0], getattr(point, "__name__", point), p.exitcode,
              round(time.monotonic() - deadline + 120, 2), file=sys.__stderr__)
    return p.exitcode


POINTS = {"started": _has(None), "writing": _has("*")}


def test_fit_killed_at_any_point_leaves_the_old_or_the_new_run(tiny_vials: Path, run_copy: Path,
                                                               tmp_path: Path):
    from anomalyqc.evaluation.threshold_file import write_threshold
    from anomalyqc.evaluation.thresholds import ThresholdChoice

    old_id = read_manifest(run_copy).model_id
    write_threshold(run_copy, ThresholdChoice(1.0, "fixed", 1.0, 4, 4), tiny_vials, "calibrate",
                    old_id)
    old = snapshot(run_copy)
    points = {**POINTS, "sealed": _has("manifest.json"), "done": lambda tmp: False}
    killed = 0
    for label, point in points.items():
        code = kill_at(run_copy, point, tmp_path / f"{label}.log", "fit", "padim", "--data",
                       tiny_vials, "--out", run_copy, *SMALL, "--set", "eps=0.02", "--overwrite")
        killed += code == -9
        det = load_detector(run_copy)  # whatever happened, the folder loads and verifies
        now = snapshot(run_copy)
        if now != old:  # then it is the whole new run, and only that
            assert set(now) == {"config.json", "weights.safetensors", "manifest.json",
                                "fit_info.json"}, label
            assert det.model_id != old_id
    assert killed >= 2  # the kill points were reached: the test is not vacuous
    # the next writer cleans up whatever the killed ones left
    r = invoke("fit", "padim", "--data", tiny_vials, "--out", run_copy, *SMALL, "--overwrite")
    assert r.exit_code == 0 and siblings(run_copy) == []


def test_evaluate_and_predict_killed_leave_the_old_output_or_the_new(
        tiny_vials: Path, run_copy: Path, tmp_path: Path):
    report, pred = tmp_path / "rep", tmp_path / "pred"
    good = tiny_vials / "test" / "good"
    assert invoke("evaluate", run_copy, "--data", tiny_vials,
                  "--report", report / "metrics.json").exit_code == 0
    assert invoke("predict", run_copy, good, "--out", pred).exit_code == 0
    commands = {
        report: (["evaluate", run_copy, "--data", tiny_vials, "--report", report / "metrics.json",
                  "--recalibrate", "--threshold-method", "youden", "--no-masks"],
                 {"report.html", "metrics.json", "roc.png"}, ["examples", "report.html"]),
        pred: (["predict", run_copy, good, tiny_vials / "test" / "scratch", "--out", pred],
               {"predictions.json"}, ["*", "predictions.json"]),
    }
    for folder, (args, complete, files) in commands.items():
        old = snapshot(folder)
        killed = 0
        for label, point in {f: _has(f) for f in files}.items():
            code = kill_at(folder, point, tmp_path / f"{folder.name}-{label}.log", *args)
            killed += code == -9
            now = snapshot(folder)
            if now != old:
                assert complete <= set(now), label
                listed = json.loads((folder / ("metrics.json" if folder == report
                                               else "predictions.json")).read_text())
                if folder == pred:  # every heatmap listed is there, and only those
                    heatmaps = {Path(row["heatmap"]).name for row in listed}
                    assert heatmaps | {"predictions.json"} == set(now)
        assert killed >= 1, folder  # the kill points were reached: the test is not vacuous
        r = invoke(*args)
        assert r.exit_code == 0 and siblings(folder) == []


def test_a_second_fit_while_the_first_is_writing_is_refused(tiny_vials: Path, tmp_path: Path):
    """Deterministic overlap: the first fit is paused (SIGSTOP) once it has started building
    the run, the second is started then. Without the lock the second would take the first's
    temporary folder for a stale one and delete it."""
    run = tmp_path / "run"
    fit = ["fit", "padim", "--data", tiny_vials, "--out", run, *SMALL, "--overwrite"]
    first = start_cli(tmp_path / "first.log", *fit)
    while first.is_alive() and not _temporaries(run):
        time.sleep(0.0005)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = start_cli(tmp_path / "second.log", *fit)
        second.join(120)
        assert second.exitcode == 2, (tmp_path / "second.log").read_text()
        assert "being written by another anomalyqc process" in (tmp_path / "second.log").read_text()
    finally:
        os.kill(first.pid, signal.SIGCONT)
    first.join(120)
    assert first.exitcode == 0, (tmp_path / "first.log").read_text()
    load_detector(run)
    assert siblings(run) == []


def test_two_concurrent_fits_into_one_folder(tiny_vials: Path, tmp_path: Path):
    run = tmp_path / "run"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [start_cli(log, "fit", "padim", "--data", tiny_vials, "--out", run, *SMALL,
                       "--set", f"eps={eps}", "--overwrite")
             for log, eps in zip(logs, (0.01, 0.02), strict=True)]
    for p in procs:
        p.join(120)
    codes = [p.exitcode for p in procs]
    if os.environ.get("KILL_DEBUG"):
        print("CONCURRENT", codes, file=sys.__stderr__)
    assert 0 in codes, [log.read_text() for log in logs]
    for code, log in zip(codes, logs, strict=True):
        if code != 0:  # refused at once, in one line: never a mix of the two fits
            assert code == 2 and "being written by another anomalyqc process" in log.read_text()
    det = load_detector(run)
    assert det.model_id == read_manifest(run).model_id and siblings(run) == []


def test_a_grid_one_cell_off_is_refused_on_the_first_image(tmp_path: Path):
    """Load checks the grid to within a cell of size/8 (no network run); the exact grid is
    checked when the backbone first runs: resnet18 gives ceil(33/8) = 5, the weights hold 4."""
    run = fitted("padim", 32, backbone="resnet18").save(tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    cfg["params"]["image_size"] = 33
    (run / "config.json").write_text(json.dumps(cfg))
    _reseal_manifest(run, cfg)
    det = load_detector(run)
    with pytest.raises(ModelFileError, match="4x4 grid.*gives 5x5"):
        det.predict(torch.rand(1, 3, 33, 33))
