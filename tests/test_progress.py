"""Progress goes through a plain callback: models report to it, only the CLI draws bars."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from conftest import SMALL, invoke, stdout_json

from anomalyqc.models import Mhbc, Padim, Patchcore
from anomalyqc.progress import tracked
from anomalyqc.types import Batch

S, N_IMAGES, BATCH = 64, 8, 3  # 3 batches (3 + 3 + 2), an 8 x 8 grid: 512 patches
BASE = {"image_size": S, "allow_download": False}


class Recorder:
    """A progress callback that keeps every report, by description."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int | None]] = []

    def __call__(self, description: str, completed: int, total: int | None) -> None:
        self.calls.append((description, completed, total))

    def by_task(self) -> dict[str, list[tuple[int, int | None]]]:
        out: dict[str, list[tuple[int, int | None]]] = defaultdict(list)
        for description, completed, total in self.calls:
            out[description].append((completed, total))
        return dict(out)


def _batches() -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(N_IMAGES, 3, S, S, generator=g)
    return [Batch.from_images(c) for c in images.split(BATCH)]


def _assert_monotone_to(reports: list[tuple[int, int | None]], total: int) -> None:
    done = [c for c, _ in reports]
    assert done[0] == 0 and done[-1] == total, reports
    assert all(a <= b for a, b in zip(done, done[1:], strict=False)), reports
    assert {t for _, t in reports} == {total}, reports


@pytest.mark.parametrize("cls, params, tasks", [
    (Padim, {}, ["padim: fitting"]),
    (Mhbc, {"n_clusters": 2, "init_images": 4}, ["mhbc: fitting"]),
    (Mhbc, {"n_clusters": 2, "init_images": 4, "passes": 2},
     ["mhbc: pass 1 of 2 (moments)", "mhbc: pass 2 of 2 (K-Means)"]),
])
def test_fit_reports_every_batch(cls, params, tasks):
    rec = Recorder()
    cls(**BASE, **params).fit(_batches(), progress=rec)
    got = rec.by_task()
    assert list(got) == tasks
    for task in tasks:
        _assert_monotone_to(got[task], 3)


def test_patchcore_reports_batches_then_the_coreset_up_to_its_size():
    rec = Recorder()
    det = Patchcore(**BASE, coreset_ratio=0.1).fit(_batches(), progress=rec)
    n = det.bank.shape[0]
    assert n == round(0.1 * N_IMAGES * 64)
    got = rec.by_task()
    assert list(got) == ["patchcore: fitting", f"patchcore: coreset {n} of {N_IMAGES * 64}"]
    _assert_monotone_to(got["patchcore: fitting"], 3)
    _assert_monotone_to(got[f"patchcore: coreset {n} of {N_IMAGES * 64}"], n)
    # the reports are progress, not a different fit: same bank without a callback
    quiet = Patchcore(**BASE, coreset_ratio=0.1).fit(_batches())
    assert torch.equal(quiet.bank, det.bank)


def test_tracked_counts_unsized_iterables_without_a_total():
    rec = Recorder()
    assert list(tracked(iter("abc"), rec, "letters")) == ["a", "b", "c"]
    assert rec.calls == [("letters", 0, None), ("letters", 1, None), ("letters", 2, None),
                         ("letters", 3, None)]
    assert list(tracked([1, 2], None, "quiet")) == [1, 2]


def test_a_non_callable_progress_is_refused_up_front():
    with pytest.raises(TypeError, match="progress must be None or a callable"):
        Padim(**BASE).fit(_batches(), progress=True)  # type: ignore[arg-type]


def test_models_and_workflow_never_import_the_progress_bar_library():
    """Import every library module a fit touches, fit all three detectors with a callback,
    predict: rich is never loaded (only anomalyqc.cli may load it)."""
    code = f"""
import sys, torch
import anomalyqc.models, anomalyqc.workflow, anomalyqc.distributed, anomalyqc.synth.vials
from anomalyqc.models import Mhbc, Padim, Patchcore
from anomalyqc.types import Batch
x = torch.rand(4, 3, {S}, {S})
batches = [Batch.from_images(c) for c in x.split(2)]
calls = []
report = lambda *a: calls.append(a)
for det in (Padim(**{BASE!r}), Patchcore(**{BASE!r}, coreset_ratio=0.1),
            Mhbc(**{BASE!r}, n_clusters=2, init_images=2)):
    det.fit(batches, progress=report).predict(x)
assert calls, "no progress reported"
loaded = sorted(m for m in sys.modules if m == "rich" or m.startswith("rich."))
assert not loaded, loaded
print("ok")
"""
    src = str(Path(__file__).resolve().parents[1] / "src")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"},
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_cli_draws_the_bars_on_stderr_and_keeps_stdout_json(tiny_vials, tmp_path):
    r = invoke("fit", "patchcore", "--data", tiny_vials, "--out", tmp_path / "run", *SMALL,
               "--set", "allow_download=false")
    assert r.exit_code == 0, r.output
    assert stdout_json(r.stdout)["detector"] == "patchcore"
    assert r.stdout.lstrip().startswith("{") and "patchcore: fitting" not in r.stdout
    assert "patchcore: fitting" in r.stderr and "patchcore: coreset" in r.stderr
