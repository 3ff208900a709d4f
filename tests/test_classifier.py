"""The supervised classifier (models.classifier), Grad-CAM (nets.gradcam) and the class
metrics (evaluation.classification) on tiny generated libraries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import invoke, stdout_json
from torch import nn

from anomalyqc.errors import ConfigError, DataError
from anomalyqc.evaluation.classification import classification_metrics
from anomalyqc.models.classifier import Classifier
from anomalyqc.models.classifier.model import _Balanced
from anomalyqc.models.storage import load_detector
from anomalyqc.nets.gradcam import grad_cam
from anomalyqc.synth.library import LibraryConfig, generate_library
from anomalyqc.training.sampling import split_indices
from anomalyqc.types import Sample
from anomalyqc.workflow import dataset_for, fit_run, make_loader

pytestmark = pytest.mark.usefixtures("one_thread")

# Large dark particles and bright, long scratches: a tiny classifier learns them in seconds.
CLEAR = {"particle_size_um": (3000.0, 4500.0), "particle_level": (10.0, 30.0),
         "scratch_contrast": (70.0, 90.0), "scratch_length": (20.0, 30.0)}
FAST = {"epochs": 2, "batch_size": 8, "lr": 1e-3, "loss_curves": False}


@pytest.fixture(scope="module")
def small_lib(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lib") / "lib"
    cfg = LibraryConfig(counts={"good": 8, "glass": 3, "particle_cake": 5, "foam": 2},
                        classes={"glass": ("scratch",), "particle_cake": ("particle",),
                                 "foam": ("foam",)},
                        holdout=("foam",), patch_size=32, strip_height=128, defect=CLEAR)
    generate_library(out, 0, cfg)
    return out


@pytest.fixture(scope="module")
def small_run(small_lib: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run") / "clf"
    fit_run("classifier", small_lib, run, {"image_size": 32, **FAST}, batch_size=8)
    return run


def test_fit_save_load_predict_round_trip(small_lib: Path, small_run: Path) -> None:
    det = load_detector(small_run)
    assert isinstance(det, Classifier)
    assert det.class_names == ["good", "glass", "particle_cake"]  # from the training folders
    info = json.loads((small_run / "fit_info.json").read_text())
    assert info["images_per_class"] == {"good": 8, "glass": 3, "particle_cake": 5}
    batch = next(iter(make_loader(dataset_for(det, small_lib, "test"), 64)))
    a, b = det.predict(batch), load_detector(small_run).predict(batch)
    assert torch.equal(a.score, b.score) and torch.equal(a.anomaly_map, b.anomaly_map)
    probs = a.extras["class_probabilities"]
    assert probs.shape == (len(batch), 3) and torch.allclose(probs.sum(1), torch.ones(len(batch)))
    assert torch.allclose(a.score, 1 - probs[:, 0])  # score = 1 - P(good)
    assert torch.equal(a.extras["class_index"], probs.argmax(1).float())
    # the map peaks at the score (Grad-CAM scaled per image), never below zero
    assert (a.anomaly_map >= 0).all()
    peaks = a.anomaly_map.flatten(1).amax(1)
    assert torch.allclose(peaks[peaks > 0], a.score[peaks > 0], atol=1e-6)


def test_predict_works_under_inference_mode_and_gradcam_of_any_class(small_lib: Path,
                                                                       small_run: Path) -> None:
    det = load_detector(small_run)
    assert isinstance(det, Classifier)
    x = next(iter(make_loader(dataset_for(det, small_lib, "test"), 6))).image
    free = det.predict(x)
    with torch.inference_mode():
        inside = det.predict(x)
        cams = det.gradcam(x, "glass")
    assert torch.equal(free.anomaly_map, inside.anomaly_map)
    assert cams.shape == (6, 1, 32, 32) and (cams >= 0).all()
    assert not torch.equal(cams, det.gradcam(x, "particle_cake"))
    with pytest.raises(ConfigError, match="unknown class 'dust'.*good, glass, particle_cake"):
        det.gradcam(x, "dust")


def test_grad_cam_follows_equations_a1_a3() -> None:
    """For pooled features and a linear head, y^c = sum_k w_ck mean(A^k): alpha^c_k =
    w_ck / (h w) and L^c = ReLU(sum_k alpha^c_k A^k)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, 4, 6, generator=g)
    fc = nn.Linear(5, 4)

    def head(t: torch.Tensor) -> torch.Tensor:
        return fc(t.mean(dim=(2, 3)))

    classes = torch.tensor([0, 3, 1])
    cam, logits = grad_cam(a, head, classes)
    alpha = fc.weight[classes].detach() / (4 * 6)
    want = F.relu((alpha[:, :, None, None] * a).sum(1, keepdim=True))
    assert torch.allclose(cam, want, atol=1e-6) and torch.allclose(logits, head(a).detach())
    up, _ = grad_cam(a, head, classes, size=(8, 12))
    assert up.shape == (3, 1, 8, 12)
    with torch.inference_mode():
        inside, _ = grad_cam(a.clone(), head, classes)
    assert torch.allclose(inside, cam)


def test_layercam_and_guided_backprop() -> None:
    """LayerCAM weighs each position by its own positive gradient; guided backpropagation
    clamps the gradient leaving each activation of the guided module at zero, and leaves
    the module as it was (in-place flags included)."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 5, 4, 6, generator=g)
    conv = nn.Conv2d(5, 5, 3, padding=1)
    act = nn.ReLU(inplace=True)
    fc = nn.Linear(5, 3)
    body = nn.Sequential(conv, act)

    def head(t: torch.Tensor) -> torch.Tensor:
        return fc(body(t).mean(dim=(2, 3)))

    classes = torch.tensor([2, 0])
    x = a.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(head(x).gather(1, classes.view(-1, 1)).sum(), x)
    cam, _ = grad_cam(a, head, classes, method="layercam")
    assert torch.allclose(cam, F.relu((grad.clamp_min(0) * a).sum(1, keepdim=True)), atol=1e-6)

    # guided: the gradient reaching the ReLU's input is the clamped one of its output
    z = conv(a).detach()
    dy_dr = (fc.weight[classes] / (4 * 6))[:, :, None, None].expand_as(z)  # d y / d ReLU out
    dz = dy_dr.clamp_min(0) * (z > 0)
    x = a.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(conv(x), x, dz)
    guided, _ = grad_cam(a, head, classes, method="layercam", guided=body)
    assert torch.allclose(guided, F.relu((want.clamp_min(0) * a).sum(1, keepdim=True)), atol=1e-5)
    assert not torch.allclose(guided, cam)
    assert act.inplace and not act._backward_hooks  # restored
    with pytest.raises(ValueError, match="method must be"):
        grad_cam(a, head, classes, method="gradcam++")  # type: ignore[arg-type]


def test_class_weighting_changes_the_loss() -> None:
    det = Classifier(image_size=32)
    det.config.class_names = ["good", "glass", "particle_cake"]
    logits = torch.tensor([[2.0, 0.1, 0.3], [0.2, 1.5, 0.1], [0.3, 0.2, 0.4], [1.0, 0.9, 0.8]])
    target = torch.tensor([0, 1, 2, 2])
    det.class_weights = None
    plain = det.loss(logits, target)
    assert torch.allclose(plain, F.cross_entropy(logits, target))
    det.class_weights = torch.tensor([0.5, 2.0, 1.0])
    weighted = det.loss(logits, target)
    assert not torch.allclose(weighted, plain)
    assert torch.allclose(weighted, F.cross_entropy(logits, target, weight=det.class_weights))


def test_fit_sets_balanced_class_weights(small_lib: Path, small_run: Path) -> None:
    info = json.loads((small_run / "fit_info.json").read_text())
    n, k = 16, 3  # 8 good, 3 glass, 5 particle_cake: N / (K N_c)
    assert info["class_weights"] == [round(n / (k * c), 4) for c in (8, 3, 5)]
    assert info["balance"] == "weights"


def test_balanced_sampling_repeats_minorities_and_keeps_validation_apart() -> None:
    classes = [0] * 10 + [1] * 3 + [2] * 5
    base = [Sample(image=torch.full((1, 2, 2), float(i)), defect_type=str(c))
            for i, c in enumerate(classes)]
    bal = _Balanced(base, classes, 0.2, seed=4)
    _, val = split_indices(len(classes), 0.2, 4)
    t_pos, v_pos = split_indices(len(bal), bal.val_fraction, 4)  # what the trainer will do
    assert sorted(bal.index[p] for p in v_pos) == sorted(val)  # same images, once each
    train = [bal.index[p] for p in t_pos]
    assert not set(train) & set(val)
    per_class = np.bincount([classes[i] for i in train])
    assert len(set(per_class.tolist())) == 1  # every class equally often
    assert set(train) == set(range(len(classes))) - set(val)  # every training image used


@pytest.mark.slow  # about 25 s: 48 images trained for 8 epochs at 128 px
def test_gradcam_peak_lands_on_the_defect(tmp_path: Path) -> None:
    """Dark particles against good vials at 128 px: for most correctly classified defect
    images the peak of the anomaly map (the default explanation) lies inside the defect
    mask, which covers about 3% of the image."""
    lib = tmp_path / "lib"
    n = 24
    generate_library(lib, 0, LibraryConfig(
        counts={"good": n, "particle_cake": n}, classes={"particle_cake": ("particle",)},
        patch_size=128, strip_height=512, defect=CLEAR))
    det = Classifier(image_size=128, epochs=8, lr=1e-3, batch_size=16, val_fraction=0.0,
                     vflip=True, rotation=0.4, loss_curves=False)
    train = dataset_for(det, lib, "train")
    det.config.channels = train.channels
    det.fit_dataset(train, work_dir=tmp_path / "training")
    hits = strict = correct = 0
    chance = []
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (17, 17))
    for b in make_loader(dataset_for(det, lib, "test"), 32):
        p = det.predict(b)
        for i in range(len(b)):
            if b.defect_type[i] == "good" or int(p.extras["class_index"][i]) != 1:
                continue
            correct += 1
            y, x = divmod(int(p.anomaly_map[i, 0].flatten().argmax()), 128)
            mask = b.mask[i, 0].numpy().astype(np.uint8)
            near = cv2.dilate(mask, kernel)
            strict += int(mask[y, x])
            hits += int(near[y, x])
            chance.append(near.mean())
    assert correct >= 0.8 * n
    assert strict / correct >= 0.7, (strict, hits, correct)
    assert hits / correct >= 0.9, (strict, hits, correct)
    assert float(np.mean(chance)) < 0.25  # a peak at random lands within 8 px far less often


def test_one_class_only_is_refused(tmp_path: Path) -> None:
    det = Classifier(image_size=8, **FAST)
    samples = [Sample(image=torch.rand(1, 8, 8), defect_type="good") for _ in range(4)]
    with pytest.raises(DataError, match="only the class.*good.*at least one defect class"):
        det.fit_dataset(samples, work_dir=tmp_path / "t")
    det = Classifier(image_size=8, **FAST)
    samples = [Sample(image=torch.rand(1, 8, 8), label=1, defect_type="glass") for _ in range(4)]
    with pytest.raises(DataError, match="needs good images"):
        det.fit_dataset(samples, work_dir=tmp_path / "u")


def test_saved_head_must_match_the_classes(small_run: Path) -> None:
    """A run whose class list and head disagree (a config written by hand, or weights from
    another run) is refused when its tensors are checked, before they are loaded."""
    from safetensors.torch import load_file

    tensors = load_file(str(small_run / "weights.safetensors"))
    det = Classifier(image_size=32, class_names=["good", "glass", "particle_cake", "dust"])
    with pytest.raises(ValueError, match="head scores 3 classes but the config lists 4"):
        det.check_state_tensors(tensors)
    with pytest.raises(ValueError, match="lists no class_names"):
        Classifier(image_size=32).check_state_tensors(tensors)
    with pytest.raises(ConfigError, match="class_names.*'good' first"):
        Classifier(image_size=32, class_names=["glass", "good"])


def test_absent_torchvision_weights_are_refused_clearly(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_cache"))
    det = Classifier(image_size=32, backbone="resnet18")
    det.config.class_names = ["good", "glass"]
    with pytest.raises(ConfigError, match="not in the torch cache.*efficientnet_lite0"):
        det.build_networks()
    with pytest.raises(ConfigError, match="unknown backbone 'vgg'"):
        Classifier(image_size=32, backbone="vgg", class_names=["good", "a"]).build_networks()


def test_classification_metrics_per_class_confusion_and_binary_view() -> None:
    true = ["good", "good", "good", "glass", "glass", "foam", "foam"]
    pred = ["good", "glass", "good", "glass", "good", "good", "glass"]
    scores = [0.1, 0.7, 0.2, 0.9, 0.4, 0.3, 0.8]
    m = classification_metrics(true, pred, ["good", "glass"], scores)
    assert m["unseen_classes"] == ["foam"]
    assert m["confusion_matrix"]["rows_true"] == ["good", "glass", "foam"]
    assert m["confusion_matrix"]["counts"] == [[2, 1, 0], [1, 1, 0], [1, 1, 0]]
    assert m["per_class"]["good"]["recall"] == pytest.approx(2 / 3)
    assert m["per_class"]["glass"]["precision"] == pytest.approx(1 / 3)
    assert m["per_class"]["foam"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2,
                                      "learnt": False}
    assert m["macro"]["recall"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    b = m["good_vs_defect"]  # defect = any class but good; 2 of 4 defects caught, 2 of 3 good
    assert b["tpr"] == pytest.approx(2 / 4) and b["tnr"] == pytest.approx(2 / 3)
    assert b["accuracy"] == pytest.approx(4 / 7) and b["auroc"] == pytest.approx(10 / 12)


def test_cli_fit_evaluate_predict(small_lib: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = invoke("fit", "classifier", "--data", small_lib, "--out", run, "--image-size", 32,
               "--batch-size", 8, "--epochs", 2, "--set", "loss_curves=false")
    assert r.exit_code == 0, r.output
    assert stdout_json(r.output)["class_names"] == ["good", "glass", "particle_cake"]
    r = invoke("evaluate", run, "--data", small_lib)
    assert r.exit_code == 0, r.output
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    c = metrics["classification"]
    assert c["unseen_classes"] == ["foam"]
    assert sum(map(sum, c["confusion_matrix"]["counts"])) == 8 + 3 + 5 + 2
    assert set(c["per_class"]) == {"good", "glass", "particle_cake", "foam"}
    html = (run / "report" / "report.html").read_text()
    assert "Confusion matrix" in html and "foam (not learnt)" in html
    preds = tmp_path / "preds"
    r = invoke("predict", run, small_lib / "test" / "glass", "--out", preds)
    assert r.exit_code == 0, r.output
    rows = json.loads((preds / "predictions.json").read_text())
    assert len(rows) == 3
    for row in rows:
        assert row["predicted_class"] in ("good", "glass", "particle_cake")
        assert set(row["class_probabilities"]) == {"good", "glass", "particle_cake"}
        assert row["score"] == pytest.approx(1 - row["class_probabilities"]["good"], abs=1e-5)
        assert (preds / Path(row["heatmap"]).name).is_file()


def test_resume_after_a_budget_stop_reaches_the_uninterrupted_weights(small_lib: Path,
                                                                       tmp_path: Path) -> None:
    """Balanced sampling changes the dataset the trainer sees: a resumed run must rebuild
    the same one (and the same validation fraction) to continue to the same weights."""
    params = {"image_size": 32, "epochs": 2, "batch_size": 8, "lr": 1e-3, "loss_curves": False,
              "balance": "sampling"}
    whole = fit_run("classifier", small_lib, tmp_path / "whole", params, batch_size=8)
    work = tmp_path / "work"
    fit_run("classifier", small_lib, tmp_path / "part", {**params, "max_steps": 2}, batch_size=8,
            work_dir=work)
    shutil.copytree(tmp_path / "part" / "training", work)
    resumed = fit_run("classifier", small_lib, tmp_path / "resumed", params, batch_size=8,
                      work_dir=work, resume=True)
    a, b = whole.state_tensors(), resumed.state_tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.fit_report["steps"] == whole.fit_report["steps"]


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet18", "resnet50",
                                      "mobilenet_v3_large"])
def test_every_trunk_builds_a_classifier_with_a_stride8_cam_layer(backbone: str) -> None:
    """The architectures alone (no ImageNet weights: the torchvision ones are not in this
    machine's cache): a gray batch gives class scores, the map's layer is at stride 8, and
    guided LayerCAM runs through each trunk's activations (in-place ReLUs, Hardswish)."""
    det = Classifier(image_size=64, backbone=backbone, pretrained=False,
                     class_names=["good", "glass", "particle_cake"])
    net = det.build_networks()["net"].eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        a = net.features(x)
        assert a.shape[-2:] == (8, 8)
        assert net.head(a).shape == (2, 3) and torch.allclose(net(x), net.head(a))
    cam, _ = grad_cam(a, net.head, torch.tensor([1, 2]), (64, 64), method="layercam", guided=net.rest)
    assert cam.shape == (2, 1, 64, 64) and bool(torch.isfinite(cam).all())
