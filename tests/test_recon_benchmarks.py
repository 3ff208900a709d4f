"""benchmarks/nets_latency.py, recon_ablations.py and resganad_cost.py: the helpers that decide
their figures, on tiny networks and data."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from anomalyqc.models import Ganomaly
from anomalyqc.models.reconstruction import ssim_per_image
from anomalyqc.nets.blocks import PreActBlock
from anomalyqc.types import Batch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:  # resganad_cost imports its siblings
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lat():
    return _load("nets_latency")


@pytest.fixture(scope="module")
def abl():
    return _load("recon_ablations")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _row(gflop: float, ms: float, extrapolated: bool = False, option: str = "fp32") -> dict:
    return {"gflop_per_patch": gflop, "batch60_ms": ms, "extrapolated": extrapolated,
            "option": option}


def test_pick_takes_the_most_compute_that_fits_timed_on_whole_batches(lat):
    rows = [_row(0.3, 120), _row(1.3, 480, option="bf16_cl"), _row(1.3, 700),
            _row(5.3, 1900), _row(0.5, 300, extrapolated=True), _row(1.25, 450, option="x")]
    assert lat.pick(rows) is rows[5]  # about 1.3 GFLOP fits twice: the faster one
    assert lat.pick(rows, budget_ms=100) is None
    assert lat.pick([_row(0.1, 10, extrapolated=True)]) is None  # never an extrapolation
    by_cpu = [{**_row(0.3, 900), "batch60_cpu_ms": 200}, {**_row(1.3, 400), "batch60_cpu_ms": 600}]
    assert lat.pick(by_cpu, key="batch60_cpu_ms") is by_cpu[0]
    assert lat.pick(by_cpu) is by_cpu[1]


def test_resganad_rows_time_predict_and_mark_extrapolated_batches(lat):
    rows = lat.resganad_rows(2, 16, ["fp32", "bf16_cl_fold"], max_gflop=1e9, repeats=1)
    assert [r["option"] for r in rows] == ["fp32", "bf16_cl_fold"]
    r = rows[1]
    assert r["patches_timed"] == 60 and not r["extrapolated"]
    assert r["inference_dtype"] == "bfloat16" and r["channels_last"] and r["fold_batchnorm"]
    assert r["batch60_ms"] > 0 and r["gflop_per_patch"] > 0 and r["feature_shape"] == [32, 1, 1]
    few = lat.resganad_rows(2, 16, ["fp32"], max_gflop=10.5 * lat.gflop_per_patch(2, 16), repeats=1)[0]
    assert few["patches_timed"] == 10 and few["extrapolated"]
    assert "*" in lat.table(rows + [few], rows[0]).splitlines()[-1]


def test_variants_are_residual_or_vanilla_crae_or_drae(abl):
    p = abl.variant_params("vanilla_crae", 32, 4, 1)
    assert p["stages"] == 2 and p["bottleneck"] == "conv" and p["residual"] is False
    det = Ganomaly(**p, channels=1)
    det._build()
    blocks = [m for m in det.nets["generator"].modules() if isinstance(m, PreActBlock)]
    assert blocks and not any(b.residual for b in blocks)
    drae = Ganomaly(**abl.variant_params("residual_drae", 32, 4, 1), channels=1)
    crae = Ganomaly(**abl.variant_params("residual_crae", 32, 4, 1), channels=1)
    # the same code size, 32 x 8 x 8 = 2048, in the two bottlenecks
    assert drae.net_config().latent_shape == (2048,)
    assert crae.net_config().latent_shape == (32, 8, 8)
    with pytest.raises(SystemExit):
        abl.variant_params("residual_crae", 48, 4, 1)


def test_generator_losses_are_table_9_1s(abl):
    g = torch.Generator().manual_seed(0)
    x = 0.3 + 0.4 * torch.rand(6, 1, 32, 32, generator=g)
    det = Ganomaly(**abl.variant_params("residual_crae", 32, 4, 1), batch_size=3,
                   val_fraction=0)
    det.fit([Batch(image=x, label=torch.zeros(6, dtype=torch.long))])
    losses = abl.generator_losses(det, x, batch_size=4)  # two uneven batches
    with torch.no_grad():
        x_hat, z, z_hat = det.nets["generator"](x)
    ssim = float((1 - ssim_per_image(x, x_hat)).mean())
    l1 = float((x - x_hat).abs().mean())
    assert losses["ssim"] == pytest.approx(ssim, rel=1e-5)
    assert losses["contextual"] == pytest.approx(ssim + l1, rel=1e-5)
    assert losses["encoder"] == pytest.approx(float((z - z_hat).pow(2).mean()), rel=1e-5)
    assert losses["adversarial"] > 0


def test_last_epoch_log_averages_the_last_epochs_train_rows(abl, tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("epoch,step,phase,loss,con,enc,adv\n1,1,train,9,9,9,9\n2,2,train,2,0.2,1,3\n"
                   "2,3,train,4,0.4,3,5\n2,3,val,1,0.1,0.5,\n")
    got = abl.last_epoch_log(log)
    assert got["train"] == {"loss": 3.0, "con": pytest.approx(0.3), "enc": 2.0, "adv": 4.0}
    assert got["val"] == {"loss": 1.0, "con": 0.1, "enc": 0.5}


def test_cost_configs_parse_and_refuse_nonsense():
    cost = _load("resganad_cost")
    assert cost.parse_configs("8x64, 16X128") == [(8, 64), (16, 128)]
    with pytest.raises(SystemExit, match="WIDTHxSIZE"):
        cost.parse_configs("8by64")
