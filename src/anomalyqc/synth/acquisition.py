"""Line acquisitions of synthetic BFS strips: a physical strip, imaged run after run, 16 frames each.

Thesis 10.2: every product is acquired 10 times; each acquisition is 16 frames taken while
the carrier swings the strip along a half circle. Here the frames are registered (the strip
keeps its pose within an acquisition, as behind the line's telecentric lens), and the motion
shows where it does on the real line: the liquid surface rises, falls and tilts, bubbles and
free or floating particles drift with it, foam rides on it. Stuck particles, scratches,
black spots, bumps, burns and the mould engraving stay put. Between runs the strip gets a new
pose, lighting, meniscus and set of bubbles; its defects (type, vial, place, size, contrast)
are the same, which is what makes a strip a physical object rather than an image.

Sizes: particles are given in micrometres (thesis ch. 1: defects of 100 to 1000 um) and drawn
at `AcquisitionConfig.pixel_size_um`, set by the vial body diameter (`body_diameter_mm`, an
assumption: 16 mm for the 10 ml vial) over its width in pixels. Particles under
`min_visible_px` (1 px) cannot be drawn: their sizes are then drawn from [1 px, upper bound].

The default strip is 512 px tall with a 128 px vial pitch (body 102.4 px wide, 156.25 um/px):
particles of 100 to 1000 um are 1 to 6.4 px, and a region box is about 128 px on a side, so a
patch cut at 128 px is at the strip's own resolution, as the thesis's 256 x 256 patches cut
from high-resolution strips are. The still generator's 256 px strip (312.5 um/px) draws most
particles at 1 to 3 px, and a detector on 64 px patches barely sees them (benchmarks/README.md,
"The inspection line end to end"). A 1024 px strip (78 um/px) reaches the whole size range at
four times the drawing cost. Lengths given in px here (scratches, travel, slosh) and in the
strip config (bubbles, droplets) do not scale with the strip: a taller strip makes those
relatively smaller.

Everything is a pure function of the strip seed and the run index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from anomalyqc.errors import ConfigError
from anomalyqc.synth import _render
from anomalyqc.synth.vials import VialStripConfig, _geometry
from anomalyqc.types import DEFECT, GOOD

Range = tuple[float, float]

LINE_DEFECT_TYPES: tuple[str, ...] = (
    "scratch", "engraving_scratch", "black_spot", "particle", "floating_particle",
    "stuck_particle", "foam",
)  # fmt: skip
EXTRA_DEFECT_TYPES: tuple[str, ...] = ("bump", "burn")
ALL_DEFECT_TYPES = LINE_DEFECT_TYPES + EXTRA_DEFECT_TYPES
MOVING_TYPES = frozenset({"particle", "floating_particle", "foam"})


@dataclass
class AcquisitionConfig:
    """Parameters of a line acquisition. Lengths in px unless named _um; levels in gray values."""

    # 512 x 640 px strips at 156 um/px: see the module docstring for why not the still default
    strip: VialStripConfig = field(default_factory=lambda: VialStripConfig(height=512, vial_pitch=128))
    n_frames: int = 16
    body_diameter_mm: float = 16.0  # outer width of the vial body: sets the pixel size
    # motion over one acquisition
    slosh_px: float = 3.0  # the surface rises and falls by up to this
    tilt: float = 0.12  # largest slope of the surface while the strip swings
    bubble_travel: Range = (4.0, 10.0)  # px a bubble drifts over the acquisition
    particle_travel: Range = (5.0, 14.0)  # px a free particle drifts (sinking, swirling)
    # defects (sizes and contrasts make a kit harder or easier)
    defect_types: tuple[str, ...] = LINE_DEFECT_TYPES
    second_defect_prob: float = 0.1
    particle_size_um: Range = (100.0, 1000.0)  # diameter
    min_visible_px: float = 1.0  # smallest particle diameter drawn
    particle_level: Range = (25.0, 80.0)  # gray level of an opaque particle
    stuck_opacity: Range = (0.45, 0.8)  # stuck particles are seen through the plastic
    scratch_length: Range = (8.0, 26.0)
    scratch_contrast: Range = (22.0, 45.0)
    foam_bubbles: tuple[int, int] = (8, 20)
    foam_radius: Range = (0.7, 1.8)
    foam_strength: Range = (0.3, 0.6)

    def __post_init__(self) -> None:
        bad = set(self.defect_types) - set(ALL_DEFECT_TYPES)
        checks = [
            (self.n_frames >= 1, "n_frames must be >= 1"),
            (self.body_diameter_mm > 0, "body_diameter_mm must be > 0"),
            (bool(self.defect_types) and not bad,
             f"defect_types must be a non-empty subset of {ALL_DEFECT_TYPES}"),
            (0.0 <= self.second_defect_prob <= 1.0, "second_defect_prob must be in [0, 1]"),
            (0 < self.particle_size_um[0] <= self.particle_size_um[1],
             "particle_size_um must be 0 < lo <= hi"),
            (self.particle_size_um[1] >= self.min_visible_px * self.pixel_size_um,
             f"particle_size_um {self.particle_size_um} is all under {self.min_visible_px} px at "
             f"{self.pixel_size_um:.1f} um/px; raise it or draw a taller strip"),
            (1 <= self.foam_bubbles[0] <= self.foam_bubbles[1], "foam_bubbles must be 1 <= lo <= hi"),
        ]  # fmt: skip
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"AcquisitionConfig: {msg}")

    @property
    def pixel_size_um(self) -> float:
        """Simulated pixel size: the vial body diameter over its width in pixels."""
        body_px = 2.0 * self.strip.body_half_width * self.strip.vial_pitch
        return self.body_diameter_mm * 1000.0 / body_px

    @property
    def particle_size_px(self) -> Range:
        """Diameter range actually drawn (the um range clipped below at min_visible_px)."""
        lo, hi = (s / self.pixel_size_um for s in self.particle_size_um)
        return max(lo, self.min_visible_px), hi


@dataclass
class LineDefect:
    """A defect of a physical strip. Static ones keep their drawing params (strip frame);
    moving ones keep what makes them the same object (size, level, shape), not a place."""

    type: str
    vial: int
    moving: bool
    params: dict[str, Any]
    size_um: float | None = None

    def describe(self) -> dict[str, Any]:
        """Ground-truth summary (JSON-ready)."""
        out: dict[str, Any] = {"type": self.type, "vial": self.vial, "moving": self.moving}
        if self.size_um is not None:
            out["size_um"] = round(self.size_um, 1)
        if "region" in self.params:
            out["region"] = self.params["region"]
        return out


@dataclass
class PhysicalStrip:
    """One strip of the kit: its identity across runs."""

    seed: int
    defects: list[LineDefect]
    texture_seed: int

    @property
    def label(self) -> int:
        return DEFECT if self.defects else GOOD

    @property
    def defect_types(self) -> list[str]:
        return sorted({d.type for d in self.defects})


@dataclass
class Acquisition:
    """One run of a strip: frames (F, H, W) uint8 and exact per-frame defect masks (F, H, W) 0/1."""

    frames: np.ndarray
    masks: np.ndarray
    shift: tuple[float, float]
    angle_deg: float


# --------------------------------------------------------------------------- strip sampling


def _u(rng: np.random.Generator, r: Range) -> float:
    return float(rng.uniform(r[0], r[1]))


def _diameter_um(rng: np.random.Generator, cfg: AcquisitionConfig) -> float:
    lo, hi = cfg.particle_size_px
    return _u(rng, (lo, hi)) * cfg.pixel_size_um


def _region_of(geo: _render.Geometry, y: float) -> int:
    return int(np.clip(np.searchsorted(geo.region_y, y, side="right") - 1, 0, 3))


def _static_params(
    rng: np.random.Generator, cfg: AcquisitionConfig, geo: _render.Geometry, kind: str, vial: int
) -> tuple[str, dict[str, Any], float | None]:
    """(renderer kind, drawing params, diameter um) of one static defect."""
    scfg = replace(
        cfg.strip, scratch_length=cfg.scratch_length, scratch_contrast=cfg.scratch_contrast,
        particle_level=cfg.particle_level, particle_size=cfg.particle_size_px,
    )  # fmt: skip
    if kind == "black_spot":  # a dark inclusion in the plastic, drawn as the still generator does
        p = _render._spot(rng, scfg, geo, vial)
        size = 2.0 * p["discs"][0][2] * cfg.pixel_size_um
        p["region"] = _region_of(geo, p["discs"][0][1])
        return "black_spot", p, size
    if kind == "scratch":
        p = _render._scratch(rng, scfg, geo, vial)
        p["region"] = _region_of(geo, float(np.mean([q[1] for q in p["points"]])))
        return "scratch", p, None
    if kind == "engraving_scratch":  # across the mould engraving on the flag (fig. 9.6c)
        eh, ew = geo.emboss.shape
        x = _render.vial_cx(geo, vial) + rng.uniform(-0.35, 0.35) * ew
        y = geo.emboss_y0 + rng.uniform(0.0, eh)
        length = _u(rng, cfg.scratch_length)
        a = rng.uniform(-0.35, 0.35)  # along the engraving rows
        pts = [(x + (s - 0.5) * length * math.cos(a), y + (s - 0.5) * length * math.sin(a))
               for s in np.linspace(0.0, 1.0, 5)]  # fmt: skip
        p = {"points": pts, "width": float(rng.uniform(0.45, 0.8)), "sign": -1.0,
             "contrast": _u(rng, cfg.scratch_contrast), "region": _region_of(geo, y)}  # fmt: skip
        return "scratch", p, None
    if kind == "stuck_particle":  # on the inner wall, through the plastic: soft, part-opaque
        region = int(rng.choice(4, p=[0.1, 0.4, 0.35, 0.15]))
        x, y = _render._point_in(rng, geo, vial, region, margin=3.0)
        d_um = _diameter_um(rng, cfg)
        r = d_um / cfg.pixel_size_um / 2.0
        p = {"discs": [(x, y, r)], "level": _u(rng, cfg.particle_level),
             "opacity": _u(rng, cfg.stuck_opacity), "region": region}  # fmt: skip
        return "soft_particle", p, d_um
    p = _render._SAMPLERS[kind](rng, cfg.strip, geo, vial)  # bump, burn: as the still generator
    p["region"] = _region_of(geo, p["y"] if kind == "bump" else p["center"][1])
    return kind, p, None


def _moving_params(
    rng: np.random.Generator, cfg: AcquisitionConfig, kind: str
) -> tuple[dict[str, Any], float | None]:
    """What stays the same of a moving defect from run to run: its size, level and shape."""
    if kind == "foam":
        n = int(rng.integers(cfg.foam_bubbles[0], cfg.foam_bubbles[1] + 1))
        spread = 2.0 + 0.6 * n
        blobs = [(float(rng.normal(0.0, spread / 2.0)), float(rng.exponential(1.2)),
                  _u(rng, cfg.foam_radius), _u(rng, cfg.foam_strength)) for _ in range(n)]  # fmt: skip
        return {"blobs": blobs}, None
    d_um = _diameter_um(rng, cfg)
    return {"r": d_um / cfg.pixel_size_um / 2.0, "level": _u(rng, cfg.particle_level)}, d_um


def make_strip(rng: np.random.Generator, cfg: AcquisitionConfig, defect: str | None = None) -> PhysicalStrip:
    """A physical strip: good (`defect` None) or with 1, sometimes 2, defects of one type on one vial.

    Static defects are drawn until visible (a noiseless change above the mask threshold on a
    reference pose), as the still generator does.
    """
    if defect is not None and defect not in ALL_DEFECT_TYPES:
        raise ConfigError(f"unknown line defect type {defect!r}; expected one of {ALL_DEFECT_TYPES}")
    seed, texture_seed, defect_seed = (int(s) for s in rng.integers(0, 2**63 - 1, 3))
    strip = PhysicalStrip(seed=seed, defects=[], texture_seed=texture_seed % (2**31 - 1))
    if defect is None:
        return strip
    geo = _geometry(cfg.strip)
    drng = np.random.default_rng(defect_seed)
    vial = int(drng.integers(0, cfg.strip.n_vials))
    n = 2 if drng.random() < cfg.second_defect_prob else 1
    if defect in MOVING_TYPES:
        for _ in range(n):
            params, size = _moving_params(drng, cfg, defect)
            strip.defects.append(LineDefect(defect, vial, True, params, size))
        return strip
    ref = _render.sample_scene(np.random.default_rng(seed), cfg.strip, geo)
    ref.bubbles, ref.droplets = [], []
    before, _ = _render.render_noiseless(cfg.strip, geo, ref, [])
    for _ in range(n):
        for _ in range(30):
            kind, params, size = _static_params(drng, cfg, geo, defect, vial)
            specs = [_spec(d) for d in strip.defects] + [_render.DefectSpec(kind, vial, params)]
            img, _ = _render.render_noiseless(cfg.strip, geo, ref, specs)
            if int((np.abs(img - before) > cfg.strip.mask_threshold).sum()) >= cfg.strip.min_defect_area:
                params["kind"] = kind
                strip.defects.append(LineDefect(defect, vial, False, params, size))
                before = img
                break
        else:
            raise RuntimeError(
                f"could not place a visible {defect}; check the defect size and contrast ranges"
            )
    return strip


def _spec(d: LineDefect) -> _render.DefectSpec:
    return _render.DefectSpec(d.params.get("kind", d.type), d.vial, d.params)


# --------------------------------------------------------------------------- one run


@dataclass
class _Motion:
    """Where the moving things of one run go; frame phase s runs from 0 to 1."""

    level_amp: np.ndarray  # (n_vials,)
    tilt_amp: np.ndarray
    tilt_phase: np.ndarray
    bubble_dx: list[float]
    bubble_rise: list[float]
    defect_start: list[tuple[float, float]]  # (x fraction of the half width, depth fraction)
    defect_dir: list[tuple[float, float]]  # px over the run


def _sample_motion(
    rng: np.random.Generator, cfg: AcquisitionConfig, scene: _render.Scene, strip: PhysicalStrip
) -> _Motion:
    n = cfg.strip.n_vials
    bub = scene.bubbles
    travel = [_u(rng, cfg.bubble_travel) for _ in bub]
    ang = [float(rng.uniform(-0.6, 0.6)) for _ in bub]  # mostly sideways, some rising
    moving = [d for d in strip.defects if d.moving]
    starts = [(float(rng.uniform(-0.7, 0.7)), float(rng.uniform(0.15, 0.85))) for _ in moving]
    dirs = []
    for _ in moving:
        t, a = _u(rng, cfg.particle_travel), float(rng.uniform(0, 2 * math.pi))
        dirs.append((t * math.cos(a), t * abs(math.sin(a))))  # free particles sink, never rise
    return _Motion(
        level_amp=rng.uniform(0.4, 1.0, n) * cfg.slosh_px,
        tilt_amp=rng.uniform(0.5, 1.0, n) * cfg.tilt * rng.choice([-1.0, 1.0], n),
        tilt_phase=rng.uniform(-0.3, 0.3, n),
        bubble_dx=[t * math.cos(a) * (1 if rng.random() < 0.5 else -1) for t, a in zip(travel, ang)],
        bubble_rise=[t * abs(math.sin(a)) for t, a in zip(travel, ang)],
        defect_start=starts,
        defect_dir=dirs,
    )


def _frame_scene(base: _render.Scene, geo: _render.Geometry, mo: _Motion, s: float) -> _render.Scene:
    """The scene at phase s: surface raised and tilted by the swing, bubbles carried along."""
    level = base.meniscus_y - (mo.level_amp * math.sin(math.pi * s)).astype(np.float32)
    tilt = (mo.tilt_amp * np.sin(math.pi * (s + mo.tilt_phase))).astype(np.float32)
    sc = replace(base, meniscus_y=level, meniscus_tilt=tilt, bubbles=[])
    for b, dx, rise in zip(base.bubbles, mo.bubble_dx, mo.bubble_rise):
        v = int(np.clip((b.x + 0.5) // geo.pitch, 0, geo.n_vials - 1))
        lim = geo.body_hw - b.r - 2.5
        cx = _render.vial_cx(geo, v)
        x = float(np.clip(b.x + dx * s, cx - lim, cx + lim))
        depth0 = b.y - _render.meniscus_at(base, geo, v, b.x, float(base.meniscus_y[v]))
        depth = max(depth0 - rise * s, b.r + 0.5)
        y = _render.meniscus_at(sc, geo, v, x, float(level[v])) + depth
        sc.bubbles.append(_render.Blob(x, y, b.r, b.strength))
    return sc


def _moving_spec(
    d: LineDefect, geo: _render.Geometry, sc: _render.Scene, start: tuple[float, float],
    direction: tuple[float, float], s: float,
) -> _render.DefectSpec:  # fmt: skip
    """Where a moving defect is drawn at phase s of this run."""
    v = d.vial
    cx = _render.vial_cx(geo, v)
    surface = float(sc.meniscus_y[v])
    if d.type == "particle":  # free in the liquid: sinks and swirls, stays inside the body
        r = d.params["r"]
        top = surface + r + 2.0
        bottom = geo.body_bottom - r - 1.0
        y = float(np.clip(top + start[1] * (bottom - top) + direction[1] * s, top, bottom))
        lim = max(float(geo.half_width(y)) - r - 2.0, 0.0)
        x = float(np.clip(cx + start[0] * lim + direction[0] * s, cx - lim, cx + lim))
        return _render.DefectSpec("black_spot", v, {"discs": [(x, y, r)], "level": d.params["level"]})
    lim = geo.body_hw - 4.0
    x = float(np.clip(cx + start[0] * lim + direction[0] * s, cx - lim, cx + lim))
    y_surf = _render.meniscus_at(sc, geo, v, x, surface)
    if d.type == "floating_particle":  # rides on the surface, half under it
        r = d.params["r"]
        return _render.DefectSpec(
            "black_spot", v, {"discs": [(x, y_surf + 0.3 * r, r)], "level": d.params["level"]}
        )
    blobs = []
    for dx, depth, r, strength in d.params["blobs"]:  # foam: a crowd of small bubbles on the surface
        bx = float(np.clip(x + dx, cx - lim, cx + lim))
        blobs.append((bx, _render.meniscus_at(sc, geo, v, bx, surface) + depth - 0.3 * r, r, strength))
    return _render.DefectSpec("foam", v, {"blobs": blobs})


def acquire(strip: PhysicalStrip, run: int, cfg: AcquisitionConfig) -> Acquisition:
    """Run `run` of `strip`: cfg.n_frames registered frames and their exact defect masks.

    A defect pixel is one where the noiseless frame changed by more than the strip config's
    mask_threshold because of the defects.
    """
    geo = _geometry(cfg.strip)
    rng = np.random.default_rng(np.random.SeedSequence([strip.seed, int(run)]))
    base = _render.sample_scene(rng, cfg.strip, geo)
    base.texture_seed = strip.texture_seed  # the plastic is the same object in every run
    motion = _sample_motion(rng, cfg, base, strip)
    noise_seeds = rng.integers(0, 2**63 - 1, cfg.n_frames)
    static = [_spec(d) for d in strip.defects if not d.moving]
    moving = [d for d in strip.defects if d.moving]
    h, w = cfg.strip.height, cfg.strip.width
    frames = np.zeros((cfg.n_frames, h, w), np.uint8)
    masks = np.zeros((cfg.n_frames, h, w), np.uint8)
    for f in range(cfg.n_frames):
        s = f / (cfg.n_frames - 1) if cfg.n_frames > 1 else 0.0
        sc = _frame_scene(base, geo, motion, s)
        specs = static + [
            _moving_spec(d, geo, sc, motion.defect_start[i], motion.defect_dir[i], s)
            for i, d in enumerate(moving)
        ]
        img, cov = _render.render_noiseless(cfg.strip, geo, sc, specs)
        if specs:
            clean, _ = _render.render_noiseless(cfg.strip, geo, sc, [])
            masks[f] = np.abs(img - clean) > cfg.strip.mask_threshold
        frames[f] = _render.finish(cfg.strip, sc, img, cov, np.random.default_rng(int(noise_seeds[f])))
    return Acquisition(frames=frames, masks=masks, shift=base.shift, angle_deg=base.angle_deg)
