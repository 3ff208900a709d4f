"""The export's faster graph pieces compute what the torch model computes: PatchCore's
one-GEMM bank search, the separable map blur, the small images' filters as matrix products,
and the session's optimisation level chosen
at export and used by the runtime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from anomalyqc.export.graphs import BankDistance, MapHead, gaussian_kernel
from anomalyqc.export.onnx import CHUNKS, EXPORT_DIR, INFO_FILE, LEVELS, OnnxDetector, export_run
from anomalyqc.models import Patchcore, Resganad
from anomalyqc.models import reconstruction as rec
from anomalyqc.types import Batch

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bank_search_gives_the_distance_to_the_exact_nearest_entry() -> None:
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(300, 24, generator=g) * 3
    e = torch.randn(2, 50, 24, generator=g) * 3
    # patches near one bank entry (the min must find that one) and patches far from all
    e[0, :5] = bank[:5] + 0.1 * torch.randn(5, 24, generator=g)
    got = BankDistance(bank)(e)
    want = torch.cdist(e.reshape(-1, 24).double(), bank.double()).amin(dim=1).reshape(2, 50)
    assert got.shape == (2, 50)
    # the expanded form loses about sqrt(eps * |x|^2) next to zero, as float32 does
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=2e-3)
    assert float(want[0, :5].max()) < 1.0 < float(want[1].min())


@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_separable_map_blur_equals_the_two_dimensional_kernel(sigma: float) -> None:
    import kornia

    patch = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    got = MapHead((64, 48), sigma)(patch)
    m = F.interpolate(patch.unsqueeze(1), size=(64, 48), mode="bilinear", align_corners=False)
    k = gaussian_kernel(sigma)
    pad = k.shape[-1] // 2
    want = F.conv2d(F.pad(m, (pad, pad, pad, pad), mode="reflect"), k)
    assert got.shape == want.shape == (3, 1, 64, 48)
    assert torch.allclose(got, want, atol=1e-6)
    k1 = k.shape[-1]
    ref = kornia.filters.gaussian_blur2d(m, (k1, k1), (sigma, sigma), border_type="reflect")
    assert torch.allclose(got, ref, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 3, 64, 64), (2, 1, 40, 72), (2, 3, 7, 9)])
def test_filters_as_matrices_equal_kornias_convolutions(shape, monkeypatch) -> None:
    """What an exported graph of small images computes for SSIM and the map blur (window
    shrunk to fit 7 px, non-square, reflected borders) is kornia's result."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(shape, generator=g)
    y = (x + 0.2 * torch.randn(shape, generator=g)).clamp(0, 1)
    ssim, blur = rec.ssim_map(x, y), rec.smooth_map(x[:, :1], 4.0)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert rec.exported_small(x)
    assert torch.allclose(rec.ssim_map(x, y), ssim, atol=1e-5)
    assert torch.allclose(rec.smooth_map(x[:, :1], 4.0), blur, atol=1e-6)
    assert float((ssim - rec.ssim_map(x, x)).abs().max()) > 0.05  # the inputs differ


def test_large_exported_images_keep_the_convolutions(monkeypatch) -> None:
    side = rec.MATRIX_FILTER_MAX_SIDE + 2
    x = torch.rand(1, 1, side, side)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert rec.exported_small(x[..., :-2, :-2]) and not rec.exported_small(x)

    def refuse(*_: object) -> None:
        raise AssertionError("matrix filter above the size limit")

    monkeypatch.setattr(rec, "filter_by_matrices", refuse)
    assert rec.ssim_map(x, x).shape == x.shape
    assert rec.smooth_map(x, 4.0).shape == x.shape


def test_the_export_records_its_fastest_level_and_the_runtime_uses_it(tmp_path: Path) -> None:
    import onnxruntime as ort

    det = Resganad(image_size=64, preset="small", max_steps=2, batch_size=4, width=8)
    det.fit([Batch.from_images(torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(s)))
             for s in (1, 2)])
    run = det.save(tmp_path / det.name)
    info = export_run(run)
    import onnx

    ops = [n.op_type for n in onnx.load(str(run / EXPORT_DIR / info["file"])).graph.node]
    assert "MatMul" in ops and "Pad" not in ops  # SSIM and blur as matrices, no reflect pads
    session = info["session"]
    assert set(session["timed_ms"]) == set(LEVELS)
    assert session["graph_optimization_level"] == min(session["timed_ms"],
                                                      key=session["timed_ms"].__getitem__)
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
    for level in LEVELS:  # whatever export.json names is what the session runs under
        path = run / EXPORT_DIR / INFO_FILE
        recorded = json.loads(path.read_text())
        recorded["session"]["graph_optimization_level"] = level
        path.write_text(json.dumps(recorded))
        onnx = OnnxDetector(run)
        assert onnx._session.get_session_options().graph_optimization_level == levels[level]
        x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(5))
        ref = det.predict(x).score
        assert torch.allclose(onnx.predict(x).score, ref, rtol=0,
                              atol=1e-4 + 1e-4 * float(ref.abs().max()))


def test_the_runtime_runs_large_batches_in_the_chunk_timed_at_export(tmp_path: Path) -> None:
    det = Resganad(image_size=64, preset="small", max_steps=2, batch_size=4, width=8)
    det.fit([Batch.from_images(torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(s)))
             for s in (1, 2)])
    run = det.save(tmp_path / det.name)
    session = export_run(run)["session"]
    assert set(session["chunk_timed_ms"]) == {str(c) for c in CHUNKS}
    assert session["chunk"] == min(CHUNKS, key=lambda c: session["chunk_timed_ms"][str(c)])
    x = torch.rand(5, 1, 64, 64, generator=torch.Generator().manual_seed(6))
    path = run / EXPORT_DIR / INFO_FILE
    recorded = json.loads(path.read_text())
    recorded["session"]["chunk"] = 2
    path.write_text(json.dumps(recorded))
    onnx = OnnxDetector(run)
    calls = []
    real = onnx._session

    class Counting:  # the real session, counting the batch sizes it is given
        def run(self, names, feed):
            calls.append(len(feed["image"]))
            return real.run(names, feed)

    onnx._session = Counting()
    chunked = onnx.predict(x)
    assert calls == [2, 2, 1]
    onnx.chunk = None
    whole = onnx.predict(x)
    assert calls[3:] == [5]
    assert torch.allclose(chunked.score, whole.score, atol=1e-6)
    assert torch.allclose(chunked.anomaly_map, whole.anomaly_map, atol=1e-6)
    assert chunked.anomaly_map.shape == (5, 1, 64, 64)


def test_patchcore_export_stores_the_bank_transposed_for_one_gemm(tmp_path: Path) -> None:
    import onnx

    det = Patchcore(image_size=64)
    det.fit([Batch.from_images(torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(s)))
             for s in (1, 2)])
    run = det.save(tmp_path / det.name)
    info = export_run(run)
    assert info["parity"]["within_tolerance"]
    graph = onnx.load(str(run / EXPORT_DIR / info["file"])).graph
    bank = det.bank
    shapes = {tuple(t.dims) for t in graph.initializer}
    assert (bank.shape[1], bank.shape[0]) in shapes  # (D, N): no Transpose of the bank at run time
    assert "TopK" not in {n.op_type for n in graph.node}


def _clustered_bank(n: int = 600, dim: int = 16, clusters: int = 12):
    from anomalyqc.stats.knn import ClusteredBank

    g = torch.Generator().manual_seed(3)
    modes = torch.randn(6, dim, generator=g) * 6
    bank = modes[torch.randint(0, 6, (n,), generator=g)] + torch.randn(n, dim, generator=g)
    return bank, ClusteredBank(bank.numpy(), clusters)


def test_clustered_graph_search_is_exact_and_prunes_as_predict_does() -> None:
    from anomalyqc.export.graphs import ClusteredBankDistance

    bank, clusters = _clustered_bank()
    g = torch.Generator().manual_seed(4)
    e = torch.cat([bank[:40] + 0.05 * torch.randn(40, 16, generator=g),  # near one entry
                   torch.randn(40, 16, generator=g) * 10]).reshape(2, 40, 16)  # far from all
    got = ClusteredBankDistance(clusters)(e)
    want = torch.cdist(e.reshape(-1, 16).double(), bank.double()).amin(dim=1).reshape(2, 40)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=2e-3)
    assert torch.allclose(got.reshape(-1), clusters.sqdist(e.reshape(-1, 16)).sqrt(), atol=2e-3)


def test_clustered_graph_search_survives_an_empty_nearest_cluster() -> None:
    from anomalyqc.export.graphs import ClusteredBankDistance

    bank, clusters = _clustered_bank()
    # a far-off centre with no members: queries next to it must still find their true nearest
    clusters.centres = torch.cat([clusters.centres, torch.full((1, 16), 40.0)])
    clusters.centres_sq = (clusters.centres**2).sum(1)
    clusters.radius = torch.cat([clusters.radius, torch.tensor([-float("inf")])])
    clusters.bounds = [*clusters.bounds, clusters.bounds[-1]]
    e = (torch.full((1, 3, 16), 40.0) + clusters.mean)
    got = ClusteredBankDistance(clusters)(e)
    want = torch.cdist(e[0].double(), bank.double()).amin(dim=1)
    assert torch.isfinite(got).all()
    assert torch.allclose(got[0].double(), want, rtol=1e-5)


def test_patchcore_export_runs_predicts_clustered_search_in_the_graph(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx

    from anomalyqc.stats import knn

    monkeypatch.setattr(knn, "MIN_CLUSTERED_BANK", 64)  # cluster this test's small bank too
    det = Patchcore(image_size=64, coreset_ratio=0.5)
    det.fit([Batch.from_images(torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(s)))
             for s in (1, 2)])
    assert det.nn.kind == "clustered"
    run = det.save(tmp_path / det.name)
    info = export_run(run)
    assert info["parity"]["within_tolerance"]
    ops = [n.op_type for n in onnx.load(str(run / EXPORT_DIR / info["file"])).graph.node]
    assert ops.count("NonZero") >= 2 * (len(det.nn.clusters.bounds) - 1) - 2  # unrolled per cluster
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(7))
    ref = det.predict(x)
    got = OnnxDetector(run).predict(x)
    assert torch.allclose(got.score, ref.score, rtol=0, atol=1e-4 + 1e-4 * float(ref.score.abs().max()))


def test_patchcore_reweighted_score_exports_and_agrees(tmp_path: Path) -> None:
    det = Patchcore(image_size=64, image_score="reweighted", n_neighbors=3)
    det.fit([Batch.from_images(torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(s)))
             for s in (1, 2)])
    run = det.save(tmp_path / det.name)
    info = export_run(run)
    assert info["parity"]["within_tolerance"]
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(8))
    x[0, :, 20:30, 20:30] = 1.0  # one image with a bright square: not every score alike
    ref = det.predict(x)
    got = OnnxDetector(run).predict(x)
    # the reweighted score is not the map's max: the export must carry the rule, not fall back
    assert not torch.allclose(ref.score, ref.anomaly_map.flatten(1).amax(1), atol=1e-3)
    assert torch.allclose(got.score, ref.score, rtol=0, atol=1e-4 + 1e-4 * float(ref.score.abs().max()))
