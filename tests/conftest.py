"""Fixtures shared by the tests: one torch thread per module, and for the CLI tests one tiny
generated vial set and one PaDiM run on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from anomalyqc.cli import app


@pytest.fixture(scope="module")
def one_thread():
    """Two cores are shared: keep torch to one thread while a module's tests run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SMALL = ["--image-size", "64", "--batch-size", "4"]
_runner = CliRunner()


def invoke(*args: object):
    return _runner.invoke(app, [str(a) for a in args])


def stdout_json(output: str) -> dict:
    return json.loads(output[output.index("{"): output.rindex("}") + 1])


@pytest.fixture(scope="session")
def tiny_vials(tmp_path_factory) -> Path:
    """12 train strips, 4 good and 4 defective test strips (one per defect type), masks."""
    out = tmp_path_factory.mktemp("tiny") / "vials"
    r = invoke("synth", "vials", "--out", out, "--n-train", 12, "--n-test-good", 4,
               "--n-test-defect", 4, "--seed", 3)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_vials: Path, tmp_path_factory) -> Path:
    """A PaDiM run fitted on tiny_vials at 64x64. Copy it (run_copy) before changing it."""
    run = tmp_path_factory.mktemp("tiny_run") / "padim"
    r = invoke("fit", "padim", "--data", tiny_vials, "--out", run, *SMALL)
    assert r.exit_code == 0, r.output
    return run


@pytest.fixture
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    return out


def reseal(run: Path) -> None:
    """Re-write a run's manifest over its edited files: a consistent forgery, so that the
    checks behind the manifest (weights, params, shapes) are what a test exercises."""
    from anomalyqc.models.storage import read_manifest, write_manifest

    old = read_manifest(run, verify=False)
    write_manifest(run, old.input_size, old.channels)


def run_commands_work(run: Path, data: Path, tmp_path: Path) -> None:
    """evaluate, predict, calibrate and benchmark all succeed on a fitted run folder."""
    import math

    r = invoke("evaluate", run, "--data", data)
    assert r.exit_code == 0, r.output
    m = stdout_json(r.output)
    assert math.isfinite(m["image_auroc"]) and math.isfinite(m["pixel_auroc"])
    good = sorted((data / "test" / "good").iterdir())[0]
    r = invoke("predict", run, good, "--out", tmp_path / "pred")
    assert r.exit_code == 0, r.output
    r = invoke("calibrate", run, "--data", data)
    assert r.exit_code == 0, r.output
    r = invoke("benchmark", run, "--data", data, "--repeats", 2, "--batch-size", 4)
    assert r.exit_code == 0, r.output
