"""What PaDiM, PatchCore and MhBC-PatchCore share: backbone embeddings, optional reduction,
input checks, and turning a grid of patch scores into a smoothed map at input size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from anomalyqc.backbones import FeatureExtractor
from anomalyqc.backbones.zoo import BACKBONES
from anomalyqc.data.transforms import as_hw
from anomalyqc.errors import ConfigError, DataError, ModelFileError
from anomalyqc.models.base import Detector, DetectorConfig, images_of
from anomalyqc.progress import Progress, tracked
from anomalyqc.stats.moments import OnlineMoments
from anomalyqc.stats.projection import pca_matrix, sparse_random_matrix
from anomalyqc.types import Batch, Prediction

T = TypeVar("T")


class EmbeddingConfig(DetectorConfig):
    backbone: str = "efficientnet_lite0"
    # Neighbourhood p of eq. 8.21 (1 = none). PatchCore's locally aware features use 3; the
    # Gaussian detectors default to 1 (see their configs and benchmarks/README.md).
    patch_size: int = Field(3, ge=1)
    # Final adaptive average pooling of the concatenated embedding over channels (thesis
    # 8.3.5.2): None = the backbone's default (1024 for wide_resnet50_2, off otherwise), 0 = off.
    channel_pool: int | None = Field(None, ge=0)
    # "random" keeps a fixed, seeded subset of reduced_dim channels (PaDiM, thesis 8.3.2).
    reduction: Literal["none", "pca", "srp", "random"] = "none"
    reduced_dim: int = Field(100, ge=1)
    pca_images: int = Field(32, ge=1)  # images that fit the PCA (streaming: a bounded warm-up)
    blur_sigma: float = Field(4.0, ge=0)  # Gaussian smoothing of the upsampled map
    # Image score: "map_max" = max of the smoothed map (default), "patch_max" = max of the raw
    # patch scores (the PatchCore paper's s*); PatchCore adds "reweighted".
    image_score: Literal["map_max", "patch_max"] = "map_max"
    seed: int = Field(0, ge=0)  # numpy's generators refuse negative seeds
    allow_download: bool = True  # torchvision weights not in the torch cache
    # False builds the backbone with random weights: for tests of the plumbing only.
    pretrained: bool = True

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        if v not in BACKBONES:
            raise ValueError(f"unknown backbone; choose one of: {', '.join(sorted(BACKBONES))}")
        return v

    @field_validator("patch_size")
    @classmethod
    def _odd_patch(cls, v: int) -> int:
        if v % 2 == 0:  # an even window shifts the grid by half a cell
            raise ValueError("must be odd (1, 3, 5, ...)")
        return v

    @model_validator(mode="after")
    def _size_the_backbone_takes(self) -> EmbeddingConfig:
        least = BACKBONES[self.backbone].min_size
        for name, size in (("image_size", self.image_size), ("crop_size", self.crop_size)):
            if size is not None and min(as_hw(size)) < least:
                h, w = as_hw(size)
                raise ValueError(f"{name}={h}x{w} is too small for {self.backbone}: each side "
                                 f"must be at least {least} pixels")
        return self


class EmbeddingDetector(Detector):
    """Base for detectors over the (B, D, h, w) patch-embedding grid."""

    config_cls = EmbeddingConfig
    config: EmbeddingConfig

    def __init__(self, config: DetectorConfig | dict[str, Any] | None = None,
                 **params: Any) -> None:
        super().__init__(config, **params)
        self._extractor: FeatureExtractor | None = None
        self.reduction_mean: torch.Tensor | None = None  # (D,)
        self.reduction_matrix: torch.Tensor | None = None  # (D, D')
        self.grid: tuple[int, int] | None = None
        self.fit_timings: dict[str, float] = {}
        # Channels the user fixed in the constructor stay; ones learnt from data are re-learnt.
        self._channels_given = self.config.channels is not None
        # Called right after the reduction is fitted: a sharded fit replaces it with rank 0's,
        # so that every shard's embeddings live in the same coordinates.
        self.reduction_sync: Callable[[EmbeddingDetector], None] | None = None

    def reset(self) -> None:
        """Forget everything learnt: a second fit starts from scratch (estimator contract)."""
        self.fitted = False
        self.model_id = None
        self.reduction_mean = None
        self.reduction_matrix = None
        self.grid = None
        if not self._channels_given:
            self.config.channels = None

    def check_same_reduction(self, other: EmbeddingDetector) -> None:
        """Shards can only merge when their embeddings live in the same coordinates."""
        a, b = self.reduction(), other.reduction()
        same = (a is None and b is None) or (
            a is not None and b is not None and torch.equal(a[1], b[1])
            and torch.equal(a[0], b[0]))
        if not same:
            raise ConfigError("cannot merge shards fitted with different reductions; fit the "
                              "reduction once and share it (or use reduction='none'/'srp' "
                              "with the same seed and warm-up data)")

    def reduction(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, matrix) of the fitted reduction, or None without one (set together)."""
        if self.reduction_matrix is None:
            return None
        assert self.reduction_mean is not None
        return self.reduction_mean, self.reduction_matrix

    # ---------------------------------------------------------------- features
    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            self._extractor = FeatureExtractor(self.config.backbone, self.config.patch_size,
                                               allow_download=self.config.allow_download,
                                               channel_pool=self.config.channel_pool,
                                               pretrained=self.config.pretrained)
        return self._extractor

    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """Refuse input the model was not built for, with a message that says what it expects."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
            raise DataError(f"expected images as a (B, C, H, W) tensor, got {shape}")
        if images.shape[1] not in (1, 3):
            raise DataError(f"expected 1 or 3 channels, got {images.shape[1]}")
        if self.config.channels is not None and images.shape[1] != self.config.channels:
            raise DataError(f"this model was trained on {self.config.channels}-channel images, "
                            f"got {images.shape[1]} channels")
        if tuple(images.shape[-2:]) != self.input_size:
            raise DataError(f"this model takes {self.input_size[0]}x{self.input_size[1]} images, "
                            f"got {images.shape[-2]}x{images.shape[-1]}; resize them (the data "
                            f"readers do this from the run config)")
        return images.float()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, P, D') embeddings, reduced if the model has a reduction."""
        grid = self.extractor(images)
        b, d, h, w = grid.shape
        if self.fitted and self.grid is not None and self.grid != (h, w):
            # a loaded model whose config was changed by a cell (load checks to within one)
            raise ModelFileError(
                f"model {self.model_id}: its weights hold a {self.grid[0]}x{self.grid[1]} grid "
                f"but its config's {self.config.backbone} at {self.input_size[0]}x"
                f"{self.input_size[1]} gives {h}x{w}; the run's config was edited: retrain or "
                f"restore the run")
        self.grid = (h, w)
        x = grid.permute(0, 2, 3, 1).reshape(b, h * w, d).contiguous()
        reduction = self.reduction()
        if reduction is not None:
            mean, matrix = reduction
            x = (x - mean) @ matrix
        return x

    def stream_embeddings(self, batches: Iterable[Batch], progress: Progress | None = None,
                          what: str = "fitting") -> Iterator[torch.Tensor]:
        """Embeddings of each training batch, fitting the reduction on a bounded warm-up first."""
        it = tracked(batches, progress, f"{self.name}: {what}")
        self.fit_timings = {"backbone_seconds": 0.0}
        if self.config.reduction == "none":
            self.reduction_matrix = None
            for batch in it:
                yield self._timed_embed(batch)
            return
        if self.config.reduction == "random":
            for batch in it:
                x = self._timed_embed(batch)
                if self.reduction_matrix is None:
                    x = x @ self._random_subset(x.shape[-1])
                yield x
            return
        warm: list[torch.Tensor] = []
        seen = 0
        for batch in it:
            x = self._timed_embed(batch)
            if self.reduction_matrix is not None:
                yield x
                continue
            warm.append(x)
            seen += x.shape[0]
            if seen >= self.config.pca_images:
                yield from self._fit_reduction(warm)
                warm = []
        if warm:
            yield from self._fit_reduction(warm)

    def _timed_embed(self, batch: Batch | torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        x = self.embed(self._train_images(batch))
        self.fit_timings["backbone_seconds"] += time.perf_counter() - t
        return x

    def _check_reduced_dim(self, d: int) -> int:
        out = self.config.reduced_dim
        if out >= d:
            raise ConfigError(f"reduced_dim {out} must be smaller than the embedding dim {d}")
        return out

    def _random_subset(self, d: int) -> torch.Tensor:
        """A fixed, seeded subset of channels as a 0/1 selection matrix: exact, and stored
        and merged like the other reductions."""
        out = self._check_reduced_dim(d)
        g = torch.Generator().manual_seed(self.config.seed)
        keep = torch.randperm(d, generator=g)[:out].sort().values
        matrix = torch.zeros(d, out)
        matrix[keep, torch.arange(out)] = 1.0
        self.reduction_mean = torch.zeros(d)
        self.reduction_matrix = matrix
        return matrix

    def _fit_reduction(self, warm: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        d = warm[0].shape[-1]
        out = self._check_reduced_dim(d)
        moments = OnlineMoments(1, d)
        for x in warm:
            moments.update(x.reshape(1, -1, d).transpose(0, 1))
        self.reduction_mean = moments.mean()[0].float()
        if self.config.reduction == "pca":
            self.reduction_matrix = pca_matrix(moments.covariance()[0], out)
        else:
            self.reduction_matrix = sparse_random_matrix(d, out, self.config.seed)
        if self.reduction_sync is not None:
            self.reduction_sync(self)
        for x in warm:
            yield (x - self.reduction_mean) @ self.reduction_matrix

    def _train_images(self, batch: Batch | torch.Tensor) -> torch.Tensor:
        images = images_of(batch)
        if self.config.channels is None:
            self.config.channels = int(images.shape[1])
        return self.check_images(images)

    # ---------------------------------------------------------------- maps
    def to_prediction(self, patch_scores: torch.Tensor, started: float,
                      timings: dict[str, float], image_score: torch.Tensor | None = None
                      ) -> Prediction:
        """(B, h, w) patch distances -> map at input size, smoothed; the image score is the
        max of the map unless the caller gives one (config.image_score)."""
        m = F.interpolate(patch_scores.unsqueeze(1).float(), size=self.input_size,
                          mode="bilinear", align_corners=False)
        if self.config.blur_sigma > 0:
            from kornia.filters import gaussian_blur2d  # imported lazily: fits never need it

            s = self.config.blur_sigma
            k = 2 * int(4.0 * s + 0.5) + 1
            m = gaussian_blur2d(m, (k, k), (s, s), border_type="reflect")
        score = m.flatten(1).amax(dim=1) if image_score is None else image_score.float()
        timings["total_ms"] = (time.perf_counter() - started) * 1000
        return Prediction(score=score, anomaly_map=m, timings=timings)

    def predict(self, images: torch.Tensor | Batch) -> Prediction:
        if not self.fitted:
            raise self._not_fitted()
        started = time.perf_counter()
        x = self.check_images(images_of(images))
        with torch.inference_mode():
            emb = self.embed(x)
            t_backbone = time.perf_counter()
            scores = self.patch_scores(emb)
            image = self.image_scores(emb, scores)
            b = x.shape[0]
            h, w = self.learnt(self.grid)
            timings = {"backbone_ms": (t_backbone - started) * 1000,
                       "scoring_ms": (time.perf_counter() - t_backbone) * 1000}
            return self.to_prediction(scores.reshape(b, h, w), started, timings, image)

    def patch_scores(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, P, D') embeddings -> (B, P) anomaly score per location."""
        raise NotImplementedError

    def learnt(self, value: T | None) -> T:
        """Something fit sets (a tensor, the grid): unset means the model was never fitted."""
        if value is None:
            raise self._not_fitted()
        return value

    def _not_fitted(self) -> ConfigError:
        return ConfigError(f"{self.name} is not fitted: call fit or load a run folder")

    def image_scores(self, emb: torch.Tensor, scores: torch.Tensor) -> torch.Tensor | None:
        """(B,) image scores from the raw patch scores, or None for the max of the map."""
        if self.config.image_score == "patch_max":
            return scores.amax(dim=1)
        return None

    # ---------------------------------------------------------------- state
    def base_state(self) -> dict[str, torch.Tensor]:
        out = {"grid": torch.tensor(self.grid or (0, 0), dtype=torch.int64)}
        reduction = self.reduction()
        if reduction is not None:
            out["reduction.mean"], out["reduction.matrix"] = reduction
        return out

    # ------------------------------------------------------------- loaded state
    def embedding_dims(self) -> tuple[int, int]:
        """(D, D'): the embedding size of this config's backbone and the dimension after the
        reduction: what the saved tensors must fit."""
        from anomalyqc.backbones.extractor import embedding_dim

        d = embedding_dim(self.config.backbone, self.config.channel_pool)
        return d, (d if self.config.reduction == "none" else self.config.reduced_dim)

    def state_shapes(self, p: int, d: int) -> dict[str, tuple[int | None, ...]]:
        """Every tensor this config's model may save (merge state included) and its shape for
        p grid locations and embedding dimension d (None: any size)."""
        raise NotImplementedError

    def check_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Refuse saved tensors that do not fit the config (ValueError saying which and why):
        a config edited or swapped after the fit, a grid from another image size or backbone,
        a reduction of another size. Such a model would crash on the first image, or worse,
        score with tensors that broadcast into a wrong but plausible map."""
        from anomalyqc.backbones.extractor import grid_fits

        d, dr = self.embedding_dims()
        what = (f"the config's {self.config.backbone} at {self.input_size[0]}x{self.input_size[1]}"
                + (f" with {self.config.reduction} reduction to {dr}"
                   if self.config.reduction != "none" else ""))
        g = tensors.get("grid")
        if g is None or g.dtype.is_floating_point or tuple(g.shape) != (2,):
            raise ValueError("tensor 'grid' is missing or not two integers")
        h, w = int(g[0]), int(g[1])
        if not grid_fits((h, w), self.input_size):
            raise ValueError(f"the weights were fitted on a {h}x{w} grid, but {what} gives "
                             f"about {self.input_size[0] / 8:g}x{self.input_size[1] / 8:g}")
        shapes: dict[str, tuple[int | None, ...]] = {"grid": (2,)}
        if self.config.reduction != "none":
            shapes.update({"reduction.mean": (d,), "reduction.matrix": (d, dr)})
        shapes.update(self.state_shapes(h * w, dr))
        for key, t in tensors.items():
            want = shapes.get(key)
            if want is None:
                raise ValueError(f"unexpected tensor {key!r}: {what} has none")
            integer = key in ("grid", "moments.count")
            if t.dtype.is_floating_point == integer or t.dtype.is_complex:
                raise ValueError(f"tensor {key!r} has dtype {t.dtype}, expected "
                                 f"{'integers' if integer else 'floating point'}")
            if t.ndim != len(want) or any(e is not None and e != a for e, a in zip(want, t.shape)):
                shown = "x".join("N" if e is None else str(e) for e in want)
                raise ValueError(f"tensor {key!r} has shape {'x'.join(map(str, t.shape))}, but "
                                 f"{what} needs {shown}")

    def load_base_state(self, tensors: dict[str, torch.Tensor]) -> None:
        g = tensors.get("grid")
        self.grid = (int(g[0]), int(g[1])) if g is not None else None
        if "reduction.matrix" in tensors:
            self.reduction_matrix = tensors["reduction.matrix"].float()
            self.reduction_mean = tensors["reduction.mean"].float()
        elif self.config.reduction != "none":
            raise KeyError("missing tensor 'reduction.matrix'")



def moment_shapes(p: int, d: int) -> dict[str, tuple[int | None, ...]]:
    """Shapes of OnlineMoments.state() for p locations of dimension d."""
    return {"moments.count": (1,), "moments.shift": (p, d), "moments.sum": (p, d),
            "moments.outer": (p, d * (d + 1) // 2)}
