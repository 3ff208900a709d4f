"""Product layout: where the vials and their inspection regions sit in a strip image.

A layout file (YAML) describes one product for the line: the strip image size, one box per
vial, the named regions (boxes relative to the top-left corner of each vial box, shared by
all vials: the vials of a strip come from one mould), optional ROI masks per region, and the
square patch size every region is resized to before it reaches a detector (the thesis used
256 x 256 x 1). Boxes are `[x0, y0, x1, y1]` in pixels, half-open.

    name: bfs-5-vial-strip
    image_height: 256
    image_width: 320
    patch_size: 256
    vials:
      - {box: [0, 0, 64, 256]}
      - ...
    regions:
      - {name: flag, box: [0, 0, 64, 69]}
      - {name: shoulder, box: [0, 69, 64, 154], roi: masks/shoulder.png}
      - ...

A ROI mask is a grayscale PNG (nonzero = inspect), at any size: it is stretched to the
region's box in the strip and to each patch, like the region's pixels. Its path is relative
to the layout file; `load_layout` remembers that folder, so the line reads the masks from a
loaded layout (see line.inspect for what each kind of detector gets).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from anomalyqc.errors import ConfigError, DataError
from anomalyqc.fileio import atomic_write_bytes

if TYPE_CHECKING:
    from anomalyqc.synth.vials import VialStripConfig

LAYOUT_VERSION = 1
DEFAULT_REGION_NAMES: tuple[str, ...] = ("flag", "shoulder", "liquid", "bottom")  # R0..R3
DEFAULT_PATCH_SIZE = 256

Box = tuple[int, int, int, int]


def _check_box(box: Box) -> Box:
    x0, y0, x1, y1 = box
    if x0 < 0 or y0 < 0 or x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {list(box)} must be [x0, y0, x1, y1] with 0 <= x0 < x1 and 0 <= y0 < y1")
    return box


def _overlap(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


class VialSpec(BaseModel):
    """One vial of the strip: its box in the strip image."""

    model_config = ConfigDict(extra="forbid")
    box: Box

    @field_validator("box")
    @classmethod
    def _valid_box(cls, v: Box) -> Box:
        return _check_box(v)


class RegionSpec(BaseModel):
    """One inspection region, as a box relative to the vial box's top-left corner."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    box: Box
    roi: str | None = None  # grayscale PNG, relative to the layout file; nonzero = inspect

    @field_validator("box")
    @classmethod
    def _valid_box(cls, v: Box) -> Box:
        return _check_box(v)


class ProductLayout(BaseModel):
    """A product for the line: strip size, vial boxes, shared regions and the patch size."""

    model_config = ConfigDict(extra="forbid")
    version: int = LAYOUT_VERSION
    name: str = "product"
    image_height: int = Field(ge=1)
    image_width: int = Field(ge=1)
    channels: int = Field(1, ge=1)
    patch_size: int = Field(DEFAULT_PATCH_SIZE, ge=8)
    vials: list[VialSpec] = Field(min_length=1)
    regions: list[RegionSpec] = Field(min_length=1)
    # Regions of one vial, and vials, must not overlap unless allowed: with overlaps a pixel of
    # the strip heatmap would come from two patches (pasting then keeps the larger score).
    allow_overlap: bool = False
    # The file the layout was read from (load_layout): ROI paths are relative to its folder.
    _source: Path | None = PrivateAttr(default=None)
    _roi_cache: dict[Any, np.ndarray] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> ProductLayout:
        if self.version != LAYOUT_VERSION:
            raise ValueError(f"version: {self.version} is not supported (expected {LAYOUT_VERSION})")
        names = [r.name for r in self.regions]
        if len(set(names)) != len(names):
            raise ValueError(f"regions: names must be unique, got {names}")
        for i, v in enumerate(self.vials):
            x0, y0, x1, y1 = v.box
            if x1 > self.image_width or y1 > self.image_height:
                raise ValueError(
                    f"vials[{i}].box {list(v.box)} leaves the {self.image_width}x{self.image_height} "
                    "image (width x height)"
                )
            for r in self.regions:
                if r.box[2] > x1 - x0 or r.box[3] > y1 - y0:
                    raise ValueError(
                        f"regions[{r.name}].box {list(r.box)} leaves vials[{i}].box {list(v.box)} "
                        f"(region boxes are relative to the vial box, size {x1 - x0}x{y1 - y0})"
                    )
        if not self.allow_overlap:
            for i, a in enumerate(self.vials):
                for j in range(i + 1, len(self.vials)):
                    if _overlap(a.box, self.vials[j].box):
                        raise ValueError(
                            f"vials[{i}] and vials[{j}] overlap; move them or set allow_overlap: true"
                        )
            for i, ra in enumerate(self.regions):
                for rb in self.regions[i + 1 :]:
                    if _overlap(ra.box, rb.box):
                        raise ValueError(
                            f"regions {ra.name} and {rb.name} overlap; move them or set allow_overlap: true"
                        )
        return self

    @property
    def n_vials(self) -> int:
        return len(self.vials)

    @property
    def n_regions(self) -> int:
        return len(self.regions)

    @property
    def region_names(self) -> list[str]:
        return [r.name for r in self.regions]

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of a strip image."""
        return self.image_height, self.image_width

    def __eq__(self, other: object) -> bool:
        """Equal descriptions; the file a layout was read from (and its caches) do not count."""
        if not isinstance(other, ProductLayout):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]  # mutable, like every pydantic model

    @property
    def source(self) -> Path | None:
        """The layout file this layout was read from (None when built in memory)."""
        return self._source

    @property
    def roi_regions(self) -> list[str]:
        """Names of the regions that have an ROI mask."""
        return [r.name for r in self.regions if r.roi is not None]

    def describe_source(self) -> str:
        """How errors name this layout: its file, else its name."""
        return str(self._source) if self._source is not None else f"layout {self.name!r}"

    def roi_masks(self, size: int | tuple[int, int] | None = None) -> np.ndarray:
        """Every region's ROI at `size` (default: the patch size): (n_regions, h, w) float32 in
        {0, 1}, all ones for a region without a mask. Read from beside the layout file once."""
        from anomalyqc.data.transforms import as_hw

        hw = as_hw(size or self.patch_size)
        key = ("patch", hw, tuple((r.name, r.roi) for r in self.regions))
        if key not in self._roi_cache:
            self._roi_cache[key] = region_roi_masks(self, self._roi_folder(), hw)
        return self._roi_cache[key]

    def strip_roi(self, regions: tuple[bool, ...]) -> np.ndarray:
        """(H, W) bool: inside every box, the region's ROI stretched to the box where
        `regions[j]` is true and the region has a mask, the whole box otherwise; False
        outside all boxes."""
        if len(regions) != self.n_regions:
            raise ValueError(f"strip_roi: {len(regions)} flags for {self.n_regions} regions")
        key = ("strip", tuple(bool(f) for f in regions), tuple((r.name, r.roi) for r in self.regions))
        if key not in self._roi_cache:
            import cv2

            native = self._native_masks()
            out = np.zeros(self.image_size, bool)
            for v_boxes in self.boxes():
                for j, (x0, y0, x1, y1) in enumerate(v_boxes):
                    m = native.get(self.regions[j].name) if regions[j] else None
                    if m is None:
                        out[y0:y1, x0:x1] = True
                    else:
                        size = (int(x1 - x0), int(y1 - y0))
                        fit = cv2.resize(m, size, interpolation=cv2.INTER_NEAREST_EXACT)
                        out[y0:y1, x0:x1] |= fit > 0
            self._roi_cache[key] = out
        return self._roi_cache[key]

    def _roi_folder(self) -> Path | None:
        if self.roi_regions and self._source is None:
            raise ConfigError(
                f"layout {self.name!r} names ROI masks for regions {self.roi_regions} but was not read "
                "from a file, so their paths have no folder; read it with load_layout(PATH)"
            )
        return None if self._source is None else self._source.parent

    def _native_masks(self) -> dict[str, np.ndarray]:
        folder = self._roi_folder()
        return {r.name: _read_roi(Path(folder or "."), r) for r in self.regions if r.roi is not None}

    def boxes(self) -> np.ndarray:
        """Absolute region boxes, (n_vials, n_regions, 4) int64 as x0, y0, x1, y1."""
        v = np.array([s.box for s in self.vials], np.int64)[:, None, :]
        r = np.array([s.box for s in self.regions], np.int64)[None, :, :]
        off = np.concatenate([v[..., :2], v[..., :2]], axis=-1)
        return r + off


def layout_error(source: str | Path, err: ValidationError) -> ConfigError:
    """One line naming the file and the first offending field."""
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"]) or "layout"
    msg = str(e["msg"]).removeprefix("Value error, ")
    return ConfigError(f"{source}: {loc}: {msg}")


def layout_from_dict(data: Any, source: str | Path = "<layout>") -> ProductLayout:
    """Validate a parsed layout; errors name `source` and the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a layout must be a mapping (name, image_height, vials, ...)")
    try:
        return ProductLayout.model_validate(data)
    except ValidationError as err:
        raise layout_error(source, err) from None


def load_layout(path: str | Path) -> ProductLayout:
    """Read and validate a layout file; ROI mask files must exist beside it."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(f"{path}: cannot read the layout file ({err.strerror}); check the path") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}; fix the syntax") from None
    layout = layout_from_dict(data, path)
    for r in layout.regions:
        if r.roi is not None and not (path.parent / r.roi).is_file():
            raise DataError(
                f"{path}: regions[{r.name}].roi: mask file {path.parent / r.roi} does not exist; "
                "fix the path (relative to the layout file) or remove the roi entry"
            )
    layout._source = path
    return layout


def write_layout(layout: ProductLayout, path: str | Path) -> None:
    """Write a layout as YAML, atomically (boxes as flow lists, one per line)."""
    import yaml

    data = layout.model_dump(mode="json")
    lines = [yaml.safe_dump({k: data[k]}, sort_keys=False, width=1000).rstrip() for k in (
        "version", "name", "image_height", "image_width", "channels", "patch_size", "allow_overlap"
    )]  # fmt: skip
    lines.append("vials:")
    lines += [f"  - {{box: {v['box']}}}" for v in data["vials"]]
    lines.append("regions:")
    for r in data["regions"]:
        # JSON strings are valid YAML flow scalars: any name or path survives the round trip.
        roi = f", roi: {json.dumps(r['roi'])}" if r["roi"] is not None else ""
        lines.append(f"  - {{name: {json.dumps(r['name'])}, box: {r['box']}{roi}}}")
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))


def _read_roi(layout_dir: Path, region: RegionSpec) -> np.ndarray:
    """A region's ROI mask as read (uint8, nonzero = inspect); refuses an unreadable or empty one."""
    import cv2

    assert region.roi is not None
    p = layout_dir / region.roi
    m = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise DataError(f"{p}: cannot read the ROI mask of region {region.name}; write it as a grayscale PNG")
    if not m.any():
        raise DataError(
            f"{p}: the ROI mask of region {region.name} is all zero, so nothing would be inspected; "
            "paint the pixels to inspect (nonzero) or remove the roi entry"
        )
    return m


def region_roi_masks(
    layout: ProductLayout, layout_dir: str | Path | None = None, size: int | tuple[int, int] | None = None
) -> np.ndarray:
    """ROI of every region at `size` (an int is a square; default the patch size):
    (n_regions, h, w) float32 in {0, 1}, nearest-neighbour resized like the data's ROIs.

    A region without a mask file is inspected whole (all ones). `layout_dir` defaults to the
    folder of the file the layout was read from.
    """
    import cv2

    from anomalyqc.data.transforms import as_hw

    h, w = as_hw(size or layout.patch_size)
    folder = Path(layout_dir) if layout_dir is not None else layout._roi_folder()
    out = np.ones((layout.n_regions, h, w), np.float32)
    for i, r in enumerate(layout.regions):
        if r.roi is None:
            continue
        assert folder is not None
        m = _read_roi(folder, r)
        out[i] = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST_EXACT) > 0
    return out


def default_layout(cfg: VialStripConfig | None = None, patch_size: int = DEFAULT_PATCH_SIZE) -> ProductLayout:
    """The layout of the synthetic strip generator: full-height vial columns, rows at region_splits.

    Matches `vial_region_boxes(cfg)` of an unshifted strip; the pose jitter (a few px) stays
    inside the region bands.
    """
    from anomalyqc.synth.vials import VialStripConfig

    cfg = cfg or VialStripConfig()
    rows = [0, *(round(f * cfg.height) for f in cfg.region_splits), cfg.height]
    vials = [
        {"box": (v * cfg.vial_pitch, 0, (v + 1) * cfg.vial_pitch, cfg.height)} for v in range(cfg.n_vials)
    ]
    regions = [
        {"name": n, "box": (0, rows[i], cfg.vial_pitch, rows[i + 1])}
        for i, n in enumerate(DEFAULT_REGION_NAMES)
    ]
    return layout_from_dict(
        {"name": "synthetic-bfs-strip", "image_height": cfg.height, "image_width": cfg.width,
         "patch_size": patch_size, "vials": vials, "regions": regions},
        "default_layout",
    )  # fmt: skip
