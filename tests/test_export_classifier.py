"""ONNX export of the supervised classifier: Grad-CAM's gradient traced into forward ops
(export.gradients), parity of score, map and class probabilities with torch at export, the
classifier's extras through OnnxDetector and `predict --runtime onnx`, and the refusal of a
network whose gradient has no ONNX form."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import invoke, stdout_json
from torch import nn

from anomalyqc.errors import ConfigError
from anomalyqc.export.classifier import MAP_RTOL
from anomalyqc.export.gradients import _convolution_backward
from anomalyqc.export.graphs import export_graph
from anomalyqc.export.onnx import EXPORT_DIR, OnnxDetector, _session, export_run
from anomalyqc.models.classifier import Classifier
from anomalyqc.models.storage import load_detector
from anomalyqc.nets.gradcam import grad_cam
from anomalyqc.synth.library import LibraryConfig, generate_library
from anomalyqc.types import Batch
from anomalyqc.workflow import dataset_for, fit_run, predict_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["good", "cake", "glass"]


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Images that differ from one another: smooth blobs of random contrast over noise of
    random strength (noise alone looks the same to a globally pooled network)."""
    g = torch.Generator().manual_seed(seed)
    blobs = F.interpolate(torch.rand(n, 1, 4, 4, generator=g), size=(size, size), mode="bilinear")
    noise = torch.rand(n, 1, size, size, generator=g)
    a, b = torch.rand(2, n, 1, 1, 1, generator=g)
    return (a * blobs + 0.5 * b * noise).clamp(0, 1)


def _random_classifier(backbone: str, cam_layer: str = "stride16", size: int = 32) -> Classifier:
    """A classifier with random weights whose outputs vary with the image: parity of the
    export does not depend on training, but a net whose activations collapse (a deep random
    trunk with BatchNorm at its initial statistics) gives every image the same output, and
    a map that is zero everywhere, which would check nothing. So the BatchNorm statistics
    are set from a forward pass over random images, as training would set them."""
    det = Classifier(image_size=size, backbone=backbone, cam_layer=cam_layer, pretrained=False,
                     class_names=CLASSES, max_steps=1, batch_size=4, loss_curves=False)
    x = _images(6, size, seed=1)
    det.fit([Batch(image=x, label=torch.tensor([0, 0, 1, 1, 1, 1]),
                   defect_type=["good", "good", "cake", "cake", "glass", "glass"])])
    net = det.nets["net"]
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: the statistics of this one pass
    net.train()
    # like export's seeded check images too (noise and smooth): an image far outside the
    # statistics gives activations whose Grad-CAM cancels to a map that float32 rounding
    # alone changes by 1e-3 (measured against float64), in torch as in ONNX Runtime
    calibration = torch.cat([_images(12, size, seed=2),
                             torch.rand(4, 1, size, size, generator=torch.Generator().manual_seed(3))])
    with torch.no_grad():
        net(calibration)
        net.eval()
        # class scores centred with a spread of about 2 over these images, whatever the
        # trunk's feature scale: probabilities away from 0 and 1, different per image
        z = net.rest(net.features(_images(64, size, seed=4))).mean(dim=(2, 3))
        net.fc.weight.div_(0.5 * (z @ net.fc.weight.T).std(dim=0).view(-1, 1))
        net.fc.bias.copy_(-(z @ net.fc.weight.T).mean(dim=0))
    return det


def _reference(det: Classifier, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """predict's outputs computed here from nets.gradcam.grad_cam with the run's
    explanation (guided LayerCAM by default, or eqs. A.1-A.3), independently of the code
    path the export traces."""
    net = det.nets["net"].eval()
    with torch.no_grad():
        a = net.features(x)
        logits = net.head(a)
    probs = torch.softmax(logits, dim=1)
    defect = probs[:, 1:].argmax(dim=1) + 1
    c = det.config
    cam, _ = grad_cam(a, net.head, defect, tuple(x.shape[-2:]), method=c.explanation,
                      guided=net.rest if c.guided else None)
    score = 1 - probs[:, 0]
    peak = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return {"score": score, "anomaly_map": cam / peak * score.view(-1, 1, 1, 1),
            "class_index": probs.argmax(1).float(), "class_probabilities": probs}


@pytest.mark.parametrize("stride,size,padding,dilation,groups", [
    (2, 7, 1, 1, 1), (2, 8, 1, 1, 4), (1, 9, 2, 2, 1), (2, 9, 2, 1, 2), (3, 10, 0, 1, 1)])
def test_the_convolution_input_gradient_is_a_transposed_convolution(
        stride: int, size: int, padding: int, dilation: int, groups: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size, size + 1, generator=g, requires_grad=True)
    w = torch.randn(8, 4 // groups, 3, 3, generator=g)
    y = F.conv2d(x, w, None, stride, padding, dilation, groups)
    up = torch.randn(y.shape, generator=g)
    (want,) = torch.autograd.grad(y, x, up)
    got, _, _ = _convolution_backward(up, x.detach(), w, None, [stride] * 2, [padding] * 2,
                                      [dilation] * 2, False, [0, 0], groups, [True, False, False])
    assert got.shape == x.shape  # the output padding restored the rows a strided conv dropped
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("backbone,cam_layer,size", [
    ("efficientnet_lite0", "stride16", 32),
    pytest.param("efficientnet_lite0", "stride8", 64, marks=pytest.mark.slow),
    pytest.param("resnet18", "stride16", 32, marks=pytest.mark.slow),
    pytest.param("mobilenet_v3_large", "stride16", 32, marks=pytest.mark.slow),
])
def test_export_matches_torch_and_grad_cam(backbone: str, cam_layer: str, size: int,
                                           tmp_path: Path) -> None:
    det = _random_classifier(backbone, cam_layer, size)
    run = det.save(tmp_path / "clf")
    info = export_run(run)
    check = info["parity"]
    assert check["within_tolerance"] and check["class_index"]["mismatches"] == 0
    assert check["class_probabilities"]["max_abs_diff"] <= check["class_probabilities"]["tolerance"]
    assert check["max_abs_score_diff"] <= 1e-4 + 1e-4 * 1.0  # scores: the strict tolerance
    # most maps meet the strict tolerance; the others moved at a ReLU kink (MAP_RTOL)
    assert check["map_rtol"] == MAP_RTOL
    assert check["images_map_within_rtol"] >= check["n_images"] // 2
    assert info["outputs"]["class_probabilities"] == ["batch", 3]
    # new images, a batch size the export never saw, against grad_cam computed apart
    x = _images(5, size, seed=9)
    got = OnnxDetector(run).predict(x)
    want = _reference(load_detector(run), x)  # type: ignore[arg-type]
    assert len(set(want["score"].round(decimals=3).tolist())) > 1, "the images must differ"
    peaks = want["anomaly_map"].flatten(1).amax(1)
    assert int((peaks > 0.05).sum()) >= 3, "zero maps would check nothing"
    strict = 1e-4 + 1e-4 * float(want["anomaly_map"].abs().max())
    assert torch.allclose(got.score, want["score"], rtol=0, atol=strict)
    assert torch.equal(got.extras["class_index"], want["class_index"])
    assert torch.allclose(got.extras["class_probabilities"], want["class_probabilities"], atol=1e-4)
    # maps: within the export's map tolerance, and most within the strict one
    diff = (got.anomaly_map - want["anomaly_map"]).flatten(1).abs().amax(1)
    assert float(diff.max()) <= 1e-4 + MAP_RTOL * float(want["anomaly_map"].abs().max())
    assert int((diff > strict).sum()) <= 2
    one = OnnxDetector(run).predict(x[:1])  # batch of one: the batch size stayed symbolic
    assert torch.allclose(one.score, want["score"][:1], rtol=0, atol=strict)


def test_the_graph_carries_the_gradient(tmp_path: Path) -> None:
    """Without the traced backward the map would not follow the class: the exported map of
    each defect class differs, as grad_cam's does."""
    det = _random_classifier("efficientnet_lite0")
    graph = export_graph(det)
    assert not any("backward" in str(n.target) for n in graph.graph.nodes)  # forward ops only
    # d conv / d input: convolutions with transposed=True
    assert any(n.target == torch.ops.aten.convolution.default and n.args[6]
               for n in graph.graph.nodes)
    x = _images(4, seed=5)
    score, amap, index, probs = graph(x)
    ref = _reference(det, x)
    assert torch.allclose(amap, ref["anomaly_map"], atol=1e-5)
    assert torch.allclose(probs, ref["class_probabilities"], atol=1e-6)


def test_a_trunk_whose_gradient_has_no_onnx_form_is_refused_by_name(monkeypatch,
                                                                   tmp_path: Path) -> None:
    """A trunk ending in adaptive max pooling (whose backward torch cannot decompose) is
    refused at export, naming the op and the module, and nothing is written."""
    from anomalyqc.models.classifier import model

    built = model.build_trunk

    def with_max_pool(*args, **kwargs):  # type: ignore[no-untyped-def]
        stages, channels = built(*args, **kwargs)
        return nn.Sequential(*stages, nn.AdaptiveMaxPool2d(1)), channels

    monkeypatch.setattr(model, "build_trunk", with_max_pool)
    det = _random_classifier("efficientnet_lite0")
    assert isinstance(det.nets["net"].rest[-1], nn.AdaptiveMaxPool2d)
    with pytest.raises(ConfigError, match=r"adaptive_max_pool2d_backward.default \(the gradient "
                                          r"of AdaptiveMaxPool2d\).*torch runtime"):
        export_graph(det)
    run = det.save(tmp_path / "clf")
    with pytest.raises(ConfigError, match="adaptive_max_pool2d_backward"):
        export_run(run)
    assert not (run / EXPORT_DIR).exists()


def test_tracing_leaves_the_model_as_it_was() -> None:
    det = _random_classifier("efficientnet_lite0")
    net = det.nets["net"]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = _images(3, seed=4)
    want = det.predict(x)
    export_graph(det)  # traces a frozen copy
    assert all(p.requires_grad for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert torch.equal(det.predict(x).anomaly_map, want.anomaly_map)


# ------------------------------------------------------------- a trained classifier, CLI
CLEAR = {"particle_size_um": (3000.0, 4500.0), "particle_level": (10.0, 30.0),
         "scratch_contrast": (70.0, 90.0), "scratch_length": (20.0, 30.0)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(library, run): a pretrained EfficientNet-Lite0 fine-tuned 2 epochs at 32 px."""
    lib = tmp_path_factory.mktemp("lib") / "lib"
    generate_library(lib, 0, LibraryConfig(
        counts={"good": 8, "glass": 4, "particle_cake": 4},
        classes={"glass": ("scratch",), "particle_cake": ("particle",)},
        patch_size=32, strip_height=128, defect=CLEAR))
    run = tmp_path_factory.mktemp("run") / "clf"
    fit_run("classifier", lib, run, {"image_size": 32, "epochs": 2, "batch_size": 8, "lr": 1e-3,
                                     "loss_curves": False}, batch_size=8)
    return lib, run


def test_predict_runtime_onnx_gives_the_same_rows_as_torch(trained: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    lib, run = trained
    r = invoke("export", run, "--data", lib)
    assert r.exit_code == 0, r.output
    info = stdout_json(r.output)
    assert info["parity"]["within_tolerance"] and info["detector"] == "classifier"
    rows = {}
    folders = [lib / "test" / c for c in ("good", "glass", "particle_cake")]
    for runtime in ("torch", "onnx"):
        r = invoke("predict", run, *folders, "--out", tmp_path / runtime, "--runtime", runtime)
        assert r.exit_code == 0, r.output
        rows[runtime] = json.loads((tmp_path / runtime / "predictions.json").read_text())
    assert len(rows["onnx"]) == len(rows["torch"]) > 0
    classes = set()
    for a, b in zip(rows["torch"], rows["onnx"], strict=True):
        assert a["path"] == b["path"] and a["predicted_class"] == b["predicted_class"]
        assert b["score"] == pytest.approx(a["score"], abs=2e-4)
        assert a["class_probabilities"].keys() == b["class_probabilities"].keys()
        for k, p in a["class_probabilities"].items():
            assert b["class_probabilities"][k] == pytest.approx(p, abs=2e-4)
        classes.add(a["predicted_class"])
    assert len(classes) > 1, "a classifier predicting one class checks little"


def test_evaluate_class_metrics_from_the_onnx_runtime_match_torch(trained: tuple[Path, Path]
                                                                  ) -> None:
    lib, run = trained
    if not (run / EXPORT_DIR).exists():
        export_run(run)
    torch_det, onnx_det = load_detector(run), OnnxDetector(run)
    assert onnx_det.supervised and hasattr(onnx_det, "classification_metrics")
    ds = dataset_for(torch_det, lib, "test", masks=False)
    metrics = []
    for det in (torch_det, onnx_det):
        res = predict_dataset(det, ds, keep_images=False)  # type: ignore[arg-type]
        metrics.append(det.classification_metrics(res.defect_types, res.extras, res.scores))
    a, b = metrics
    assert a["confusion_matrix"] == b["confusion_matrix"]
    assert a["per_class"] == b["per_class"] and a["macro"] == b["macro"]
    assert np.isclose(a["good_vs_defect"]["auroc"], b["good_vs_defect"]["auroc"], atol=1e-3)


def test_the_int8_classifier_is_kept_only_with_the_same_classes(trained: tuple[Path, Path],
                                                                tmp_path: Path) -> None:
    import shutil

    _, run = trained
    copy = tmp_path / "clf"
    shutil.copytree(run, copy)
    info = export_run(copy, int8=True, overwrite=True)
    q = info["int8"]
    if q["kept"]:
        assert q["parity"]["class_index"]["mismatches"] == 0
        sess = _session(copy / EXPORT_DIR / q["file"])
        assert [o.name for o in sess.get_outputs()][2:] == ["class_index", "class_probabilities"]
    else:
        assert not q["parity"]["within_tolerance"]
