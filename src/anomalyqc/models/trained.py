"""What every detector trained by gradient descent shares: training through
anomalyqc.training.Trainer, presets, inference options, weights as named tensors and
batch-wise inference (the reconstruction family in models.reconstruction, the supervised
classifier and U-Net).

A subclass builds its networks from its config (`build_networks`), writes its steps
(`training_step`, `validation_step`, the Trainable contract) and turns an image batch into
scores and maps (`infer`). The trainer needs an indexable dataset (data order, splits and
resume are functions of the index), so `fit_dataset` is the real entry point; `fit(batches)`
gathers in-memory batches into a list for it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import Dataset

from anomalyqc.data.transforms import as_hw
from anomalyqc.errors import ConfigError
from anomalyqc.models.base import Detector, DetectorConfig, images_of
from anomalyqc.nets.inference import InferenceDtype, inference_copy
from anomalyqc.progress import Progress

# Submodules, not the package: anomalyqc.training imports the models (through
# distributed), so its __init__ may be half-run when this module loads.
from anomalyqc.training.config import TrainConfig
from anomalyqc.training.devices import resolve_device
from anomalyqc.training.interface import OptimGroup, Trainable
from anomalyqc.types import GOOD, Batch, Prediction, Sample

if TYPE_CHECKING:
    from anomalyqc.training.trainer import TrainResult


class TrainedConfig(DetectorConfig, TrainConfig):
    """Input, optimisation, inference and training parameters (every TrainConfig field is
    a --set key) of any detector trained by gradient descent.

    `preset` names a set of defaults from the detector's PRESETS (e.g. "small", for small
    inputs trained on a CPU budget); every key given explicitly wins over the preset's."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    preset: str | None = None

    # optimisation (Adam, one optimizer per network)
    lr: float = Field(2e-4, gt=0)
    beta1: float = Field(0.5, ge=0, lt=1)  # GANomaly's Adam betas (0.5, 0.999)
    predict_batch_size: int = Field(32, ge=1)  # images per forward at inference
    # inference only (nets.inference; the trained and saved weights are untouched):
    # NHWC memory, BatchNorm folded into the conv before it, bf16 autocast of the networks
    channels_last: bool = False
    fold_batchnorm: bool = False
    inference_dtype: InferenceDtype = "float32"

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            name = data["preset"]
            if name not in cls.PRESETS:
                raise ValueError(f"preset={name!r} is not one of {sorted(cls.PRESETS)}")
            data = {**cls.PRESETS[name], **data}
        return data

    def require_halvings(self, n: int, name: str, fix: str) -> None:
        """The input must halve n times (a network with n stride-2 levels)."""
        h, w = as_hw(self.crop_size or self.image_size)
        f = 2**n
        if h % f or w % f:
            raise ValueError(f"the input {h}x{w} is not divisible by 2**{name} = {f}: use a "
                             f"multiple of {f} for image_size/crop_size, or {fix}")


class TrainedDetector(Detector, Trainable):
    """Base of the detectors trained by gradient descent (see the module docstring)."""

    config_cls: ClassVar[type[DetectorConfig]] = TrainedConfig
    config: TrainedConfig

    def __init__(self, config: DetectorConfig | dict[str, Any] | None = None, **params: Any) -> None:
        super().__init__(config, **params)
        self.nets: dict[str, nn.Module] = {}
        self.train_result: TrainResult | None = None
        self.fit_report: dict[str, Any] = {}
        # (options, the nets they were made from, the copies): see _inference_nets
        self._inference: tuple[tuple[Any, ...], dict[str, nn.Module], dict[str, nn.Module]] | None = None

    # ------------------------------------------------------------------- to be provided
    def build_networks(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def infer(self, x: torch.Tensor) -> Prediction:
        """Scores and maps of one chunk of images already on the networks' device."""
        raise NotImplementedError

    # ----------------------------------------------------------------------- Trainable
    def networks(self) -> dict[str, nn.Module]:
        return self.nets

    def optimizer_groups(self) -> dict[str, OptimGroup]:
        betas = (self.config.beta1, 0.999)
        return {name: OptimGroup((name,), self.config.lr, betas) for name in self.nets}

    # ---------------------------------------------------------------------------- fit
    def train_config(self) -> TrainConfig:
        return TrainConfig(**{k: getattr(self.config, k) for k in TrainConfig.model_fields})

    def _build(self) -> None:
        # Seeded without touching the global random state: the same seed, the same start.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.nets = self.build_networks()

    def fit(self, batches: Iterable[Batch], progress: Progress | None = None,
            ) -> TrainedDetector:
        """Train on in-memory batches (a temporary training folder, no resume); labels, masks
        and defect types travel with the images for the supervised detectors."""
        samples = [Sample(image=b.image[i], label=int(b.label[i]),
                          mask=None if b.mask is None else b.mask[i],
                          roi=None if b.roi is None else b.roi[i],
                          defect_type=b.defect_type[i] if b.defect_type else
                          ("good" if int(b.label[i]) == GOOD else "defect"))
                   for b in batches for i in range(len(b))]
        if not samples:
            raise ConfigError(f"{self.name}: no images to fit on")
        with tempfile.TemporaryDirectory(prefix="anomalyqc-train-") as tmp:
            return self.fit_dataset(samples, progress, work_dir=tmp)

    def fit_dataset(self, dataset: Dataset[Sample] | Sequence[Sample],
                    progress: Progress | None = None, work_dir: str | Path = "training",
                    resume: bool = False) -> TrainedDetector:
        """Train with the Trainer; `work_dir` gets log.csv, checkpoint/ and loss_curves.png,
        and resume=True continues the run checkpointed there."""
        if self.config.channels is None:
            self.config.channels = int(dataset[0].image.shape[0])
        want = (self.config.channels, *self.input_size)
        got = tuple(dataset[0].image.shape)
        if got != want:
            raise ConfigError(f"{self.name} expects images of shape {want}, the data gives "
                              f"{got}; set image_size/crop_size/channels to match")
        from anomalyqc.training.trainer import Trainer

        self._build()
        trainer = Trainer(self.train_config(), work_dir, progress, label=self.name)
        result = trainer.fit(self, dataset, resume=resume)
        self.train_result = result
        self.fit_report = {
            "training_folder": str(Path(work_dir)),
            "epochs_run": result.epochs,
            "steps": result.steps,
            "stopped_early": result.stopped_early,
            # what ended training: a budget (max_steps, max_minutes), early stopping, or
            # None when every epoch ran; epochs_reached counts a budget's partial epoch
            "stopped_by": result.stopped_by,
            "epochs_reached": round(result.steps / max(result.steps_per_epoch, 1), 3),
            "train_seconds": round(result.seconds, 3),
            "seconds_per_epoch": round(result.seconds * result.steps_per_epoch
                                       / max(result.steps, 1), 3),
            "steps_per_epoch": result.steps_per_epoch,
            "best_epoch": result.best_epoch,
            "best_validation_loss": result.best_metric,
            "monitor": self.monitor,
        }
        if len(result.weights_sha256) > 1:  # checked equal after every epoch (training.replicas)
            self.fit_report["weights_sha256_per_process"] = result.weights_sha256
        self.fitted = True
        return self

    # ------------------------------------------------------------------------ predict
    @property
    def device(self) -> torch.device:
        """Where the networks are (the training device, or config.device after a load)."""
        return next(next(iter(self.nets.values())).parameters()).device

    def _inference_nets(self) -> dict[str, nn.Module]:
        """The networks predict runs: self.nets, or copies rewritten by the inference
        options, made once per set of weights (fit and load build new nets)."""
        c = self.config
        options = (c.channels_last, c.fold_batchnorm, c.inference_dtype)
        if options == (False, False, "float32"):
            return self.nets
        if self._inference is None or self._inference[0] != options or self._inference[1] is not self.nets:
            self._inference = (options, self.nets, inference_copy(
                self.nets, channels_last=c.channels_last, fold=c.fold_batchnorm,
                dtype=c.inference_dtype))
        return self._inference[2]

    def predict(self, images: torch.Tensor | Batch) -> Prediction:
        if not self.fitted or not self.nets:
            raise ConfigError(f"{self.name} is not fitted: call fit or load a run folder")
        x = images_of(images)
        want = (self.config.channels, *self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ConfigError(f"{self.name} expects images (B, {', '.join(map(str, want))}), "
                              f"got {tuple(x.shape)}")
        roi = self.check_roi(images, x)
        for net in self.nets.values():
            net.eval()
        parts = []
        step = self.config.predict_batch_size
        trained, self.nets = self.nets, self._inference_nets()
        memory = torch.channels_last if self.config.channels_last else torch.contiguous_format
        # infer() reads self.nets: it runs the inference copies, and the trained networks
        # come back even when it raises.
        try:
            with torch.inference_mode():
                for i, chunk in enumerate(x.split(step)):
                    chunk = chunk.to(self.device, torch.float32, memory_format=memory)
                    if roi is None:
                        parts.append(self.infer(chunk))
                    else:
                        r = roi[i * step:(i + 1) * step].to(self.device, torch.float32)
                        parts.append(self.infer_roi(chunk, r))
        finally:
            self.nets = trained
        return Prediction(
            score=torch.cat([p.score for p in parts]).float().cpu(),
            anomaly_map=torch.cat([p.anomaly_map for p in parts]).float().cpu(),
            reconstruction=torch.cat([p.reconstruction for p in parts]).cpu()  # type: ignore[misc]
            if all(p.reconstruction is not None for p in parts) else None,
            extras={k: torch.cat([p.extras[k] for p in parts]).cpu() for k in parts[0].extras},
        )

    def check_roi(self, images: torch.Tensor | Batch, x: torch.Tensor) -> torch.Tensor | None:
        """The batch's ROIs (B, 1, H, W) when this detector uses them, else None; refuses
        a missing ROI when the model needs one and a misshapen one always."""
        roi = images.roi if isinstance(images, Batch) and self.uses_roi else None
        if roi is None:
            if self.needs_roi:
                raise ConfigError(f"this {self.name} model was trained with ROIs and needs one "
                                  f"per image: give a Batch with roi (B, 1, H, W) (from the "
                                  f"command line: the data's roi/ folder or --roi-dir)")
            return None
        if roi.ndim != 4 or roi.shape[0] != x.shape[0] or roi.shape[1] != 1 \
                or roi.shape[2:] != x.shape[2:]:
            raise ConfigError(f"{self.name}: ROIs must be (B, 1, H, W) like the images "
                              f"{tuple(x.shape)}, got {tuple(roi.shape)}")
        return roi

    def infer_roi(self, x: torch.Tensor, roi: torch.Tensor) -> Prediction:
        """infer with the chunk's ROIs (B, 1, H, W); detectors that only use ROIs to
        train (the anomaly synthesis) ignore them here."""
        return self.infer(x)

    # ------------------------------------------------------------------------ weights
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v for name, net in self.nets.items()
                for k, v in net.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._build()
        for name, net in self.nets.items():
            head = f"{name}."
            own = {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}
            if not own:
                raise KeyError(f"no tensors for network {name!r}")
            net.load_state_dict(own)  # strict: a missing or misshapen tensor is a RuntimeError
            net.to(resolve_device(self.config.device)).eval()
        self.fitted = True
