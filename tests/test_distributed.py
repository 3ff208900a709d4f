"""Sharded fits (2 CPU processes over loopback, gloo) and merges of run folders.

A tiny generated dataset (12 structured 64x64 PNGs) is fitted once in this process and once
by `anomalyqc fit --nproc 2` (torchrun), and its two halves (the exact shards: even and odd
files) are fitted separately and merged with `anomalyqc merge`.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from anomalyqc.cli import app
from anomalyqc.errors import ConfigError, DataError
from anomalyqc.models.storage import load_detector
from anomalyqc.stats.kmeans import OnlineKMeans
from anomalyqc.stats.moments import OnlineMoments
from anomalyqc.workflow import dataset_for, fit_run, merge_runs

runner = CliRunner()
N, S = 12, 64
COMMON = ["--image-size", str(S), "--batch-size", "4", "--set", "allow_download=false"]
PARAMS = {"image_size": S, "allow_download": False}
EXTRA = {"padim": {}, "mhbc": {"n_clusters": 4, "init_images": 4},
         "patchcore": {"coreset_ratio": 0.1}}


pytestmark = pytest.mark.usefixtures("one_thread")


def _write_images(folder: Path, names: list[str], seed: int = 0) -> None:
    """Gradient, a bright disc that moves a little, sensor noise: structured, not random."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:S, 0:S] / (S - 1)
    for name in names:
        a, b = 0.3 + 0.1 * rng.random(2)
        img = 0.25 + a * xx + b * yy
        cy, cx = 22 + 3 * rng.random(2)
        img[((yy * S - cy) ** 2 + (xx * S - cx) ** 2) < 64] = 0.9
        img = np.clip(img + 0.02 * rng.standard_normal(img.shape), 0, 1)
        rgb = np.stack([0.8 * img, 0.9 * img, img], -1)  # BGR for cv2
        cv2.imwrite(str(folder / name), (rgb * 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """whole/, and its two shards half_0/ (even files) and half_1/ (odd files), linked."""
    root = tmp_path_factory.mktemp("dist")
    names = [f"{i:03d}.png" for i in range(N)]
    _write_images(root / "whole" / "train" / "good", names)
    out = {"whole": root / "whole", "root": root}
    for r in (0, 1):
        half = root / f"half_{r}" / "train" / "good"
        half.mkdir(parents=True)
        for name in names[r::2]:
            (half / name).symlink_to(root / "whole" / "train" / "good" / name)
        out[f"half_{r}"] = root / f"half_{r}"
    return out


def _cli(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def _sets(name: str) -> list[str]:
    return [x for k, v in EXTRA[name].items() for x in ("--set", f"{k}={v}")]


_FITS: dict[tuple[str, str], Path] = {}
_STDERR: dict[str, str] = {}  # what the 2-process CLI fit of each detector wrote to stderr


def one_process(name: str, data: dict[str, Path], part: str = "whole") -> Path:
    key = (name, part)
    if key not in _FITS:
        out = data["root"] / f"{name}_{part}_1p"
        fit_run(name, data[part], out, {**PARAMS, **EXTRA[name]}, batch_size=4)
        _FITS[key] = out
    return _FITS[key]


def two_processes(name: str, data: dict[str, Path]) -> Path:
    key = (name, "2p")
    if key not in _FITS:
        out = data["root"] / f"{name}_2p"
        r = _cli("fit", name, "--data", data["whole"], "--out", out, *COMMON, *_sets(name),
                 "--nproc", 2)
        assert r.exit_code == 0, r.output
        _FITS[key] = out
        _STDERR[name] = r.stderr
    return _FITS[key]


def moments_of(run: Path) -> OnlineMoments:
    from safetensors.torch import load_file

    return OnlineMoments.from_state(load_file(run / "weights.safetensors"))


def assert_same_moments(a: OnlineMoments, b: OnlineMoments) -> None:
    """Same statistics: count, mean, covariance. The shifts they are stored about differ, and
    each batch's sums are formed in float32 about its shift: equal to float32 rounding."""
    assert a.count == b.count
    torch.testing.assert_close(a.mean(), b.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.covariance(), b.covariance(), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ 2 processes vs 1


def test_two_process_padim_equals_one_process(data):
    run2, run1 = two_processes("padim", data), one_process("padim", data)
    info = json.loads((run2 / "fit_info.json").read_text())
    assert info["processes"] == 2 and info["n_images"] == N
    assert len(info["peak_rss_mb_per_process"]) == 2
    a, b = load_detector(run2), load_detector(run1)
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.chol, b.chol, rtol=1e-4, atol=1e-4)
    assert_same_moments(moments_of(run2), moments_of(run1))


def test_two_process_fit_draws_progress_from_rank_0_only(data):
    two_processes("padim", data)
    assert _STDERR["padim"].count("padim: fitting") == 1, _STDERR["padim"]


def test_two_process_mhbc_moments_equal_and_centroids_are_the_merge_of_the_shards(data):
    run2 = two_processes("mhbc", data)
    assert_same_moments(moments_of(run2), moments_of(one_process("mhbc", data)))
    two = load_detector(run2, merge_state=True)
    assert two.config.n_clusters == 4  # the --set options reached the workers
    # the shards are the two halves: the documented merge of their runs is the 2-process fit
    merged = merge_runs([one_process("mhbc", data, "half_0"), one_process("mhbc", data, "half_1")],
                        data["root"] / "mhbc_merged")
    torch.testing.assert_close(two.centroids, merged.centroids, rtol=1e-4, atol=1e-4)
    assert float(two.kmeans.counts.sum(1).min()) == float(two.kmeans.counts.sum(1).max()) == N


def test_two_process_patchcore_bank_is_a_coreset_of_the_right_size(data):
    two = load_detector(two_processes("patchcore", data))
    one = load_detector(one_process("patchcore", data))
    assert two.bank.shape == one.bank.shape == (round(0.1 * N * 64), 152)
    # every kept row is a real training embedding of some shard: it is in the full set
    train = dataset_for(one, data["whole"], "train")
    emb = one.embed(torch.stack([train[i].image for i in range(len(train))])).reshape(-1, 152)
    d = torch.cdist(two.bank, emb, compute_mode="donot_use_mm_for_euclid_dist").amin(1)
    assert float(d.max()) < 1e-3


def test_fit_nproc_reports_a_worker_error_in_one_line(data, tmp_path):
    few = tmp_path / "few"
    _write_images(few / "train" / "good", ["a.png", "b.png", "c.png"])
    r = _cli("fit", "padim", "--data", few, "--out", tmp_path / "run", *COMMON, "--nproc", 2)
    assert r.exit_code == 2
    assert "too few for 2 processes" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "run").exists()


def test_fit_run_refuses_more_processes_than_image_pairs(data, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(DataError, match="too few for 8 processes"):
        fit_run("padim", data["whole"], data["root"] / "never", PARAMS)


# ------------------------------------------------------------------------ merge runs


def test_cli_merge_of_halves_equals_fit_on_the_whole(data, tmp_path):
    halves = [one_process("padim", data, f"half_{r}") for r in (0, 1)]
    r = _cli("merge", *halves, "--out", tmp_path / "merged")
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "merged" / "fit_info.json").read_text())
    assert info["n_images"] == N and len(info["merged_from"]) == 2
    merged, whole = load_detector(tmp_path / "merged"), load_detector(one_process("padim", data))
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.chol, whole.chol, rtol=1e-4, atol=1e-4)
    # and the merged run merges again (three-way): its moments were saved too
    assert moments_of(tmp_path / "merged").count == N


def test_merge_mhbc_halves_moments_equal_whole(data):
    merged = merge_runs([one_process("mhbc", data, "half_0"), one_process("mhbc", data, "half_1")],
                        data["root"] / "mhbc_merged_again")
    assert_same_moments(merged.moments, moments_of(one_process("mhbc", data)))


def test_merge_patchcore_keeps_the_union_of_the_banks(data, tmp_path):
    halves = [one_process("patchcore", data, f"half_{r}") for r in (0, 1)]
    merged = merge_runs(halves, tmp_path / "pc")
    sizes = [load_detector(h).bank.shape[0] for h in halves]
    assert merged.bank.shape[0] == sum(sizes)


@pytest.mark.parametrize("change,message", [
    ({"eps": 0.1}, "eps (1.0 vs 0.1)"),
    ({"image_size": 32}, "image_size (64 vs 32)"),
])
def test_merge_refuses_runs_fitted_differently(data, tmp_path, change, message):
    other = tmp_path / "other"
    fit_run("padim", data["half_1"], other, {**PARAMS, **change}, batch_size=4)
    r = _cli("merge", one_process("padim", data, "half_0"), other, "--out", tmp_path / "m")
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "m").exists()


def test_merge_refuses_other_detector_and_runs_without_moments(data, tmp_path):
    a = one_process("padim", data, "half_0")
    with pytest.raises(ConfigError, match="mhbc"):
        merge_runs([a, one_process("mhbc", data, "half_1")], tmp_path / "m")
    lean = tmp_path / "lean"
    fit_run("padim", data["half_1"], lean, {**PARAMS, "keep_moments": False}, batch_size=4)
    r = _cli("merge", a, lean, "--out", tmp_path / "m")
    assert r.exit_code == 2 and "saved without its moments" in r.output
    # keep_moments only decides what is saved: the lean run still loads and predicts
    with_m = (a / "weights.safetensors").stat().st_size
    assert (lean / "weights.safetensors").stat().st_size < 0.7 * with_m
    assert load_detector(lean).predict(torch.rand(1, 3, S, S)).score.shape == (1,)


# ---------------------------------------------------------------------------- algebra


def test_recentre_then_sum_is_the_merge():
    g = torch.Generator().manual_seed(0)
    xa = torch.randn(7, 3, 5, generator=g) + 4
    xb = 0.5 * torch.randn(9, 3, 5, generator=g) - 2
    a, b, joint = OnlineMoments(3, 5), OnlineMoments(3, 5), OnlineMoments(3, 5)
    a.update(xa)
    b.update(xb)
    joint.update(torch.cat([xa, xb]))
    b.recentre(a.shift)  # what the all-reduce does on rank 1
    torch.testing.assert_close(b.shift, a.shift)
    summed = OnlineMoments(3, 5)
    summed.count, summed.shift = a.count + b.count, a.shift
    summed.sum, summed.packed = a.sum + b.sum, a.packed + b.packed
    torch.testing.assert_close(summed.mean(), joint.mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(summed.covariance(), joint.covariance(), rtol=1e-5, atol=1e-6)


def test_merge_all_of_one_is_merge_and_counts_add_up():
    g = torch.Generator().manual_seed(1)
    states = []
    for _ in range(3):
        km = OnlineKMeans(2, 3, 2)
        km.update(torch.randn(10, 2, 3, generator=g))
        km.finish_init()
        states.append(km)

    def clone(km):
        return OnlineKMeans.from_state(km.state())

    pair = clone(states[0]).merge(clone(states[1]))
    same = clone(states[0]).merge_all([clone(states[1])])
    torch.testing.assert_close(pair.sums, same.sums)
    three = clone(states[0]).merge_all([clone(states[1]), clone(states[2])])
    assert torch.equal(three.counts.sum(1), torch.full((2,), 30.0, dtype=torch.float64))


def test_two_process_reduction_is_rank_0s_on_every_shard(data, tmp_path):
    """pca fitted on rank 0's warm-up (its first 4 images: files 0, 2, 4, 6) and broadcast:
    the saved mean is then the mean of every image's embedding in those coordinates."""
    out = tmp_path / "pca"
    r = _cli("fit", "padim", "--data", data["whole"], "--out", out, *COMMON, "--set",
             "reduction=pca", "--set", "reduced_dim=16", "--set", "pca_images=4", "--nproc", 2)
    assert r.exit_code == 0, r.output
    det = load_detector(out)
    train = dataset_for(det, data["whole"], "train")
    images = torch.stack([train[i].image for i in range(len(train))])
    raw = det.extractor(images)
    raw = raw.permute(0, 2, 3, 1).reshape(len(train), -1, raw.shape[1])
    warm = raw[[0, 2, 4, 6]].reshape(-1, raw.shape[-1]).double()
    torch.testing.assert_close(det.reduction_mean.double(), warm.mean(0), rtol=1e-4, atol=1e-4)
    reduced = (raw - det.reduction_mean) @ det.reduction_matrix
    torch.testing.assert_close(det.mean, reduced.mean(0), rtol=1e-4, atol=1e-4)
