"""The export's faster graph pieces compute what the torch model computes: PatchCore's
one-GEMM bank search, the separable map blur, and the session's optimisation level chosen
at export and used by the runtime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from anomalyqc.export.graphs import BankDistance, MapHead, gaussian_kernel
from anomalyqc.export.onnx import EXPORT_DIR, INFO_FILE, LEVELS, OnnxDetector, export_run
from anomalyqc.models import Patchcore, Resganad
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


def test_the_export_records_its_fastest_level_and_the_runtime_uses_it(tmp_path: Path) -> None:
    import onnxruntime as ort

    det = Resganad(image_size=64, preset="small", max_steps=2, batch_size=4, width=8)
    det.fit([Batch.from_images(torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(s)))
             for s in (1, 2)])
    run = det.save(tmp_path / det.name)
    info = export_run(run)
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
