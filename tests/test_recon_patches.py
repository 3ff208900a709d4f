"""benchmarks/recon_patches.py end to end on tiny generated data: a trained detector under a
budget of seconds and an embedding detector, both through the CLI, and the skip note."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "recon_patches.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("recon_patches", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sets_go_to_their_detector_and_dedicated_keys_to_their_option(bench, tmp_path):
    sets = bench.parse_sets(["resganad.lr=1e-3", "resganad.width=4", "ganomaly.stages=2"])
    args = bench.fit_args("resganad", tmp_path, tmp_path / "r", 2.5, sets)
    assert args[args.index("--width") + 1] == "4" and "width=4" not in args
    assert "lr=1e-3" in args and "stages=2" not in args
    assert "max_minutes=2.5" in args and "preset=small" in args
    assert "max_minutes=2.5" not in " ".join(bench.fit_args("padim", tmp_path, tmp_path, 2.5, {}))
    with pytest.raises(SystemExit, match="DETECTOR.KEY=VALUE"):
        bench.parse_sets(["lr=1e-3"])
    assert bench.known("resganad") and bench.known("padim") and not bench.known("nosuch")


@pytest.mark.slow
def test_budgeted_table_on_tiny_data(bench, tiny_vials, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "known", lambda d: d != "draem")  # as before its merge
    bench.main(["--data", str(tiny_vials), "--work", str(tmp_path / "work"), "--results",
                str(tmp_path), "--name", "t", "--minutes", "0.01", "--only", "ganomaly",
                "draem", "padim", "--set", "ganomaly.stages=2"])
    out = json.loads((tmp_path / "t.json").read_text())
    assert out["skipped"] == {"draem": "the CLI does not know this detector (its branch is "
                                       "not merged)"}
    gan, padim = out["results"]["ganomaly"], out["results"]["padim"]
    assert gan["fit"]["stopped_by"] == "max_minutes" and gan["budget_minutes"] == 0.01
    assert gan["fit"]["train_seconds"] >= 0.6 and gan["fit"]["steps"] >= 1
    assert "epochs_reached" not in padim["fit"] and padim["budget_minutes"] is None
    for r in (gan, padim):
        assert 0 <= r["metrics"]["image_auroc"] <= 1
        assert {"wall_s", "cpu_s", "load_1m_before", "load_1m_after"} <= set(r["fit_job"])
        assert r["fit_job"]["cpu_s"] > 0
    assert out["provenance"]["command"] and out["threads"] == 1
    table = capsys.readouterr().out
    assert "| ganomaly |" in table and "| padim |" in table and "draem: skipped" in table
