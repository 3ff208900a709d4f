"""The trained detectors under `anomalyqc fit --nproc 2`: two CPU processes over loopback
(torchrun, gloo), the launcher the embedding fits use. The trainer compares the replicas'
weight digests after every epoch and stops a run whose processes diverged
(training/replicas.py; tests/test_trainer.py makes one diverge); here each detector's run
must finish, report two equal digests that are those of the saved weights, load and predict.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from anomalyqc.models.storage import load_detector
from anomalyqc.training.replicas import weights_digest

TINY = ["--image-size", "32", "--width", "4", "--batch-size", "4", "--epochs", "2",
        "--set", "stages=2", "--set", "loss_curves=false",
        "--set", "val_fraction=0.2"]  # 12 images: 2 for validation, one per process
EXTRA = {"ganomaly": [], "draem": ["--set", "unet_width=4", "--set", "unet_depth=2"]}


@pytest.mark.slow
@pytest.mark.parametrize("detector", ["ganomaly", "draem"])
def test_two_process_fit_keeps_identical_replicas_and_the_run_predicts(detector, tiny_vials,
                                                                       tmp_path, one_thread):
    from conftest import invoke

    run = tmp_path / detector
    r = invoke("fit", detector, "--data", tiny_vials, "--out", run, *TINY, *EXTRA[detector],
               "--nproc", 2)
    assert r.exit_code == 0, r.output
    info = json.loads((run / "fit_info.json").read_text())  # the workers print to the real stdout
    assert info["processes"] == 2 and info["epochs_run"] == 2
    # 10 training images, 5 per process in batches of 4: 2 steps an epoch
    assert info["steps"] == 4 and math.isfinite(info["best_validation_loss"])
    det = load_detector(run)
    digests = info["weights_sha256_per_process"]
    assert digests == [weights_digest(det.nets)] * 2  # both ranks ended with the saved weights
    assert r.output.count(f"{detector}: epoch 1/2") == 1  # rank 0 alone draws progress
    test = sorted((tiny_vials / "test").glob("*/*.png"))[:4]
    r = invoke("predict", run, *test, "--out", tmp_path / "pred")
    assert r.exit_code == 0, r.output
    pred = det.predict(torch.rand(2, det.config.channels, 32, 32))
    assert torch.isfinite(pred.score).all()


@pytest.mark.parametrize("ranks_done,want", [(2, 0), (1, 1)])
def test_launcher_accepts_a_teardown_crash_only_after_every_rank_finished(monkeypatch, capsys,
                                                                          ranks_done, want):
    """torchrun failing after both workers marked their fit done is a completed run (with a
    warning); a worker that never got there is a failed fit."""
    import sys

    from rich.console import Console

    from anomalyqc import launch

    script = ("import os, pathlib, sys\n"
              f"for r in range({ranks_done}):\n"
              f"    (pathlib.Path(os.environ['{launch.DONE_DIR_ENV}']) / f'rank-{{r}}').touch()\n"
              "sys.exit(1)\n")
    monkeypatch.setattr(launch, "TORCHRUN", [sys.executable, "-c", script])
    monkeypatch.setattr(launch, "command_args", lambda ctx, skip: [])
    console = Console(width=200)
    assert launch.relaunch_with_torchrun(None, 2, console) == want
    out = capsys.readouterr().out
    assert ("the run is complete" in out) == (want == 0)
    assert ("fit processes failed" in out) == (want == 1)
