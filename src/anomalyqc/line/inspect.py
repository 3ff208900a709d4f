"""Inspect one strip acquisition: cut, one batched forward pass per model, decisions, heatmap.

`inspect_acquisition` is the call the line makes between two acquisitions (500 ms budget):
key frames (and, with `use_rank`, the two rank images) are cut into region patches, the
patches of each model go through it as ONE batch (60 patches for 3 key frames x 5 vials x 4
regions with a shared model), and the scores are turned into region, vial and strip
decisions against the per-region thresholds (see line.decisions). Timings are kept per stage,
and the forward pass per model.

ROIs. A layout region may name an ROI mask (line.layout). A detector that uses ROIs
(`Detector.uses_roi`: GRD-Net, and DRAEM / ResGANAD, which only use them to train) gets, in
the same batch, each patch's ROI: its region's mask stretched to the detector's input exactly
as the patch is (nearest neighbour, then the centre crop), repeated over frames and vials.
Which ROI a patch gets:

- a region with a mask: that mask;
- a region without one, when another region of the same detector has one: a full mask (the
  whole patch is inspected; a batch carries ROIs for all its patches or none);
- no region of the detector has a mask: no ROIs at all. A detector that needs them
  (`Detector.needs_roi`, a GRD-Net trained on ROIs) is then refused with an error naming the
  layout and the fix, before anything is scored.

Detectors that do not use ROIs never get them, so a layout with ROIs works with them as
before. For a detector whose output is restricted to the ROI (`needs_roi`) the strip heatmap
is zero outside the ROIs of its regions, at strip resolution (`ProductLayout.strip_roi`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from anomalyqc.data.transforms import as_hw
from anomalyqc.errors import ConfigError, DataError
from anomalyqc.line.decisions import acquisition_decisions
from anomalyqc.line.layout import ProductLayout
from anomalyqc.line.patches import cut, paste
from anomalyqc.line.rank import KEY_FRAMES, LineBatch, line_batch
from anomalyqc.line.thresholds import RegionThresholds
from anomalyqc.models.base import Detector
from anomalyqc.types import Batch

_GRAY = torch.tensor([0.299, 0.587, 0.114])  # ITU-R BT.601 luma


@dataclass
class LineModels:
    """The detector of every region: one per region, or the same one shared by all."""

    detectors: dict[str, Detector]  # region name -> detector, in layout order
    runs: dict[str, str | None] = field(default_factory=dict)  # region -> run folder

    @classmethod
    def shared(cls, detector: Detector, regions: list[str], run: str | None = None) -> LineModels:
        return cls({r: detector for r in regions}, {r: run for r in regions})

    @classmethod
    def from_runs(
        cls,
        regions: list[str],
        default: str | Path | None = None,
        per_region: Mapping[str, str | Path] | None = None,
        runtime: str = "torch",
    ) -> LineModels:
        """Load run folders (workflow.load_for_inference: torch, or the runs' ONNX exports in
        ONNX Runtime); a run used by several regions is loaded once and shared. Every region
        needs a model: `default` or its own."""
        from anomalyqc.workflow import load_for_inference

        per_region = dict(per_region or {})
        if unknown := sorted(set(per_region) - set(regions)):
            raise ConfigError(
                f"--model {unknown[0]}=...: no region {unknown[0]!r} in the layout "
                f"(regions: {', '.join(regions)})"
            )
        loaded: dict[str, Detector] = {}
        dets: dict[str, Detector] = {}
        runs: dict[str, str | None] = {}
        for r in regions:
            run = per_region.get(r, default)
            if run is None:
                raise ConfigError(
                    f"region {r} has no model; give --model RUN for all regions or --model {r}=RUN"
                )
            key = str(Path(run).resolve())
            if key not in loaded:
                loaded[key] = load_for_inference(run, runtime)
            dets[r], runs[r] = loaded[key], str(run)
        return cls(dets, runs)

    @property
    def regions(self) -> list[str]:
        return list(self.detectors)

    def model_ids(self) -> dict[str, str | None]:
        return {r: d.model_id for r, d in self.detectors.items()}

    def groups(self) -> list[tuple[Detector, list[int]]]:
        """Each distinct detector with the indices of the regions it scores."""
        out: dict[int, tuple[Detector, list[int]]] = {}
        for i, d in enumerate(self.detectors.values()):
            out.setdefault(id(d), (d, []))[1].append(i)
        return list(out.values())

    def model_keys(self) -> list[str]:
        """A name per distinct model (groups() order) for timings: its model id, else the
        detector's name; a repeated one gets #2, #3, ..."""
        out: list[str] = []
        for d, _ in self.groups():
            base = d.model_id or d.name
            key, n = base, 1
            while key in out:
                n += 1
                key = f"{base}#{n}"
            out.append(key)
        return out

    def describe(self) -> list[dict[str, Any]]:
        """One entry per distinct model: timing key, regions, run folder, detector, model id,
        input, and whether it uses / needs ROIs."""
        names = self.regions
        return [
            {
                "key": key,
                "regions": [names[i] for i in idx],
                "run": self.runs.get(names[idx[0]]),
                "detector": d.name,
                "model_id": d.model_id,
                "runtime": getattr(d, "runtime", "torch"),
                "input_size": list(d.input_size),
                "channels": d.config.channels,
                "uses_roi": d.uses_roi,
                "needs_roi": d.needs_roi,
            }
            for key, (d, idx) in zip(self.model_keys(), self.groups())
        ]

    def check_layout(self, layout: ProductLayout) -> None:
        """The models cover the layout's regions, and a model that needs ROIs has them."""
        if self.regions != layout.region_names:
            raise ConfigError(
                f"models cover regions {self.regions}, layout {layout.name!r} has "
                f"{layout.region_names}; give a model for each region of the layout"
            )
        with_roi = set(layout.roi_regions)
        for d, idx in self.groups():
            names = [self.regions[i] for i in idx]
            if d.needs_roi and not with_roi & set(names):
                run = self.runs.get(names[0])
                which = f"model {run}" if run else f"this {d.name} model"
                raise ConfigError(
                    f"{layout.describe_source()}: regions {', '.join(names)} have no ROI mask, but "
                    f"{which} ({d.name}, trained with ROIs) needs one per patch; add "
                    f"`roi: <mask>.png` to these regions of the layout (a PNG beside it, nonzero = "
                    "inspect; an all-white one inspects the whole patch), or use a model trained "
                    "without ROIs (roi_mode=whole_image)"
                )


def prepare_patches(patches: torch.Tensor, detector: Detector) -> torch.Tensor:
    """Patches (N, C, P, P) in [0, 1] at the detector's input: channels, resize, centre crop."""
    want = detector.config.channels
    c = patches.shape[1]
    if want is not None and c != want:
        if c == 1 and want == 3:
            patches = patches.expand(-1, 3, -1, -1)
        elif c == 3 and want == 1:
            patches = (patches * _GRAY.to(patches)[None, :, None, None]).sum(1, keepdim=True)
        else:
            raise DataError(
                f"the layout's patches have {c} channels and detector {detector.name} "
                f"takes {want}; only gray <-> RGB is converted: use a layout with "
                f"1 or 3 channels or a model trained on {c}-channel patches"
            )
    size = as_hw(detector.config.image_size)
    if tuple(patches.shape[-2:]) != size:
        patches = F.interpolate(
            patches, size=size, mode="bilinear", align_corners=False, antialias=patches.shape[-1] > size[1]
        )
    if detector.config.crop_size is not None:
        (ch, cw), (h, w) = as_hw(detector.config.crop_size), size
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        patches = patches[..., y0 : y0 + ch, x0 : x0 + cw]
    return patches.contiguous()


def detector_rois(layout: ProductLayout, detector: Detector, region_idx: list[int]) -> torch.Tensor | None:
    """The ROI of every region at `detector`'s input, (n_regions, 1, h, w) float32 in {0, 1},
    or None when the detector gets no ROIs (see the module doc for the rules)."""
    if not detector.uses_roi:
        return None
    if not {layout.region_names[i] for i in region_idx} & set(layout.roi_regions):
        return None  # check_layout refused this for a detector that needs ROIs
    masks = torch.from_numpy(layout.roi_masks(as_hw(detector.config.image_size)))[:, None]
    if detector.config.crop_size is not None:
        (ch, cw), (h, w) = as_hw(detector.config.crop_size), masks.shape[-2:]
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        masks = masks[..., y0 : y0 + ch, x0 : x0 + cw]
    return masks.contiguous()


@dataclass
class InspectionResult:
    """What one acquisition gave: scores, decisions (with thresholds), heatmap, timings."""

    sources: list[str]  # "frame_<k>" / "rank_min" / "rank_max"
    scores: np.ndarray  # (S, V, R) float64 patch scores
    decisions: dict[str, np.ndarray] | None  # see line.decisions.acquisition_decisions
    heatmap: np.ndarray  # (H, W) float32: max over sources; in threshold units with thresholds
    timings_ms: dict[str, float]  # cut, forward, aggregate, total
    # forward pass (input preparation included) of each model, by LineModels.model_keys()
    model_timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def n_patches(self) -> int:
        return int(self.scores.size)

    @property
    def rejected(self) -> bool | None:
        return None if self.decisions is None else bool(self.decisions["strip"])


def _as_float_frames(frames: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    if t.is_floating_point():
        return t.float()
    raise DataError(f"frames must be uint8 (0..255) or float (0..1), got {t.dtype}")


def _batch_from_sources(images: Mapping[str, Any], layout: ProductLayout, patch: int) -> LineBatch:
    """A LineBatch from named source images (e.g. rank images computed by the camera)."""
    if not images:
        raise DataError("no source images given; pass frames or named images such as rank_min")
    t = torch.stack([_as_float_frames(v) for v in images.values()])
    if t.ndim == 3:
        t = t[:, None]
    p = cut(t, layout, patch)
    s, v, r = p.shape[:3]
    g = torch.stack(torch.meshgrid(torch.arange(s), torch.arange(v), torch.arange(r), indexing="ij"))
    g = g.reshape(3, -1)
    return LineBatch(p.reshape(s * v * r, *p.shape[3:]), list(images), g[0], g[1], g[2])


def _cut_size(models: LineModels, layout: ProductLayout) -> int:
    """Cut straight at the models' input size when they share a square one (one resize, not two)."""
    sizes = {as_hw(d.config.image_size) for d, _ in models.groups()}
    if len(sizes) == 1 and (hw := sizes.pop())[0] == hw[1]:
        return hw[0]
    return layout.patch_size


def inspect_acquisition(
    frames_or_rank: Any,
    layout: ProductLayout,
    models: LineModels,
    thresholds: RegionThresholds | None = None,
    key_frames: tuple[int, ...] = KEY_FRAMES,
    use_rank: bool = False,
) -> InspectionResult:
    """Score and decide one acquisition.

    `frames_or_rank`: the acquisition's frames, (F, H, W) or (F, C, H, W), uint8 or float in
    [0, 1]; or a mapping of named images (e.g. {"rank_min": ..., "rank_max": ...}) used as
    they are. From frames the key frames (1-based) are used, plus the two rank images with
    `use_rank`. Without `thresholds` only scores and the raw heatmap are returned. ROIs of
    the layout's regions go to the detectors that use them (module doc).
    """
    models.check_layout(layout)
    if thresholds is not None and thresholds.regions != layout.region_names:
        raise ConfigError(
            f"thresholds are for regions {thresholds.regions}, layout {layout.name!r} "
            f"has {layout.region_names}"
        )
    t0 = time.perf_counter()
    size = _cut_size(models, layout)
    if isinstance(frames_or_rank, Mapping):
        batch = _batch_from_sources(frames_or_rank, layout, size)
    else:
        if not key_frames and not use_rank:
            raise ConfigError("no key frames and no rank images: nothing to inspect")
        batch = line_batch(_as_float_frames(frames_or_rank), layout, key_frames, use_rank, size)
    t1 = time.perf_counter()
    n = len(batch)
    scores = torch.full((n,), float("nan"))
    maps: list[tuple[torch.Tensor, torch.Tensor]] = []
    model_ms: dict[str, float] = {}
    restricted = [False] * layout.n_regions  # regions whose heatmap is cut to the ROI
    with torch.inference_mode():
        for key, (det, region_idx) in zip(models.model_keys(), models.groups()):
            tm = time.perf_counter()
            sel = torch.isin(batch.region, torch.tensor(region_idx))
            x = prepare_patches(batch.patches[sel], det)
            rois = detector_rois(layout, det, region_idx)
            if rois is None:
                pred = det.predict(x)  # one batch per model
            else:
                roi = rois[batch.region[sel]]
                pred = det.predict(Batch(x, torch.zeros(len(x), dtype=torch.int64), roi=roi))
                if det.needs_roi:
                    for i in region_idx:
                        restricted[i] = True
            scores[sel] = pred.score.detach().float().cpu()
            maps.append((sel, pred.anomaly_map.detach().float().cpu()))
            model_ms[key] = (time.perf_counter() - tm) * 1e3
    t2 = time.perf_counter()
    s, v, r = len(batch.sources), layout.n_vials, layout.n_regions
    score_grid = scores.numpy().astype(np.float64).reshape(s, v, r)
    decisions = None if thresholds is None else acquisition_decisions(score_grid, thresholds.values)
    q = max(max(m.shape[-2:]) for _, m in maps)
    full = torch.zeros(n, q, q)
    for sel, m in maps:
        if tuple(m.shape[-2:]) != (q, q):
            m = F.interpolate(m, size=(q, q), mode="bilinear", align_corners=False)
        full[sel] = m[:, 0]
    full = full.reshape(s, v, r, q, q)
    if thresholds is not None:  # 1.0 = at the region's threshold, so regions compare
        tv = torch.as_tensor(thresholds.values, dtype=torch.float32)
        full = full / torch.where(tv.abs() > 0, tv, torch.ones_like(tv))[None, None, :, None, None]
    heat = paste(full, layout).amax(dim=0)[0]
    if any(restricted):
        heat = torch.where(torch.from_numpy(layout.strip_roi(tuple(restricted))), heat, 0.0)
    t3 = time.perf_counter()
    timings = {
        "cut": (t1 - t0) * 1e3,
        "forward": (t2 - t1) * 1e3,
        "aggregate": (t3 - t2) * 1e3,
        "total": (t3 - t0) * 1e3,
    }
    return InspectionResult(batch.sources, score_grid, decisions, heat.numpy(), timings, model_ms)
