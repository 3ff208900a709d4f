"""Rendering internals of the synthetic BFS vial strip; the public API is in `vials.py`.

Every shape is drawn analytically in the strip's own frame (unshifted, unrotated) on a grid
`supersample` times finer than the output, then area-downsampled. That gives anti-aliased
edges for free, and the pose of the strip (shift, rotation) costs only a coordinate transform,
so the image, its defect mask and its ROI always agree to the pixel.

Intensities model a back-lit line: bright background, translucent plastic, liquid acting as a
cylindrical lens (bright centre stripe), dark refraction rims at the walls and at the meniscus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:
    from anomalyqc.synth.vials import VialStripConfig

F32 = np.float32
_PROFILE_STEP = 0.05
_LUT_N = 1024  # samples of the wall shading, indexed by t = |x| / half width


@dataclass
class Geometry:
    """Outline of one vial and the strip layout, in output pixels."""

    height: int
    width: int
    pitch: float
    n_vials: int
    supersample: int
    flag_top: float
    flag_bottom: float
    neck_bottom: float
    shoulder_bottom: float
    body_bottom: float
    vial_bottom: float
    flag_hw: float
    neck_hw: float
    body_hw: float
    web_top: float
    web_bottom: float
    region_y: tuple[int, int, int, int, int]  # row boundaries of R0..R3 (5 edges)
    prof_y: np.ndarray = field(repr=False)
    prof_hw: np.ndarray = field(repr=False)
    prof_norm: np.ndarray = field(repr=False)
    emboss: np.ndarray = field(repr=False)  # (h, w) 0/1 mould engraving on the flag
    lut_air: np.ndarray = field(repr=False)
    lut_liquid: np.ndarray = field(repr=False)
    emboss_y0: float = 0.0

    def _index(self, y: np.ndarray | float) -> np.ndarray:
        i = (np.asarray(y, F32) - self.prof_y[0]) * (1.0 / _PROFILE_STEP) + 0.5
        return np.clip(i, 0, len(self.prof_hw) - 1).astype(np.int32)

    def half_width(self, y: np.ndarray | float) -> np.ndarray:
        """Half width of the vial at row(s) y (0 outside the vial); table look-up."""
        return self.prof_hw[self._index(y)]

    def outline(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(half width, 1/sqrt(1 + slope^2)) at rows y: the second turns a horizontal distance
        to the wall into a distance normal to it, for anti-aliasing sloped walls."""
        i = self._index(y)
        return self.prof_hw[i], self.prof_norm[i]


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _profile(g: dict[str, float], height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half width as a function of y: rounded flag, neck, shoulder, straight body, round bottom.

    The flag is extended 1 px above its top edge, which the renderer trims with a vertical
    anti-aliasing term; returns (y, half width, slope normaliser).
    """
    y = np.arange(-8.0, height + 8.0, _PROFILE_STEP)
    hw = np.zeros_like(y)
    ft, fb, nb = g["flag_top"], g["flag_bottom"], g["neck_bottom"]
    sb, bb, vb = g["shoulder_bottom"], g["body_bottom"], g["vial_bottom"]
    fhw, nhw, bhw = g["flag_hw"], g["neck_hw"], g["body_hw"]
    corner = 4.0
    flag = (y >= ft - 1.0) & (y < fb)
    dy = np.clip(ft + corner - y, 0.0, corner)
    hw[flag] = (fhw - corner + np.sqrt(corner**2 - dy**2))[flag]
    fillet = 3.0  # flag bottom curving into the neck
    neck = (y >= fb) & (y < nb)
    s = _smoothstep((y - fb) / fillet)
    hw[neck] = (fhw + (nhw - fhw) * s)[neck]
    shoulder = (y >= nb) & (y < sb)
    s = np.clip((y - nb) / (sb - nb), 0.0, 1.0)
    hw[shoulder] = (nhw + (bhw - nhw) * (1.0 - (1.0 - s) ** 2.2))[shoulder]
    body = (y >= sb) & (y < bb)
    hw[body] = (bhw - 0.8 * (y - sb) / (bb - sb))[body]
    bottom = (y >= bb) & (y < vb)
    s = np.clip((y - bb) / (vb - bb), 0.0, 1.0)
    hw[bottom] = ((bhw - 0.8) * (1.0 - s**2.4) ** (1.0 / 2.4))[bottom]
    slope = np.clip(np.gradient(hw, _PROFILE_STEP), -4.0, 4.0)  # steeper: the top/bottom terms
    slope[(y < ft + 0.5)] = 0.0  # the flag top is a horizontal edge, handled vertically
    return y.astype(F32), hw.astype(F32), (1.0 / np.sqrt(1.0 + slope**2)).astype(F32)


def _emboss_pattern(width: int) -> np.ndarray:
    """Two rows of 3x5 'characters', fixed for the mould (same on every vial and image)."""
    rng = np.random.default_rng(20240610)
    n_chars = max(1, width // 4)
    rows = []
    for _ in range(2):
        row = np.zeros((5, n_chars * 4), np.uint8)
        for c in range(n_chars):
            glyph = (rng.random((5, 3)) < 0.55).astype(np.uint8)
            glyph[:, 1] |= rng.random() < 0.4
            row[:, c * 4 : c * 4 + 3] = glyph
        rows.append(row)
    gap = np.zeros((3, n_chars * 4), np.uint8)
    return np.concatenate([rows[0], gap, rows[1]], axis=0)[:, :width]


def _wall_luts(cfg: VialStripConfig) -> tuple[np.ndarray, np.ndarray]:
    """Intensity across a vial (air part, liquid part) as a function of t = |x| / half width.

    Refraction darkens the walls; a thin bright line runs just inside them; the liquid column
    acts as a cylindrical lens and shows a bright centre stripe.
    """
    t = np.linspace(0.0, 1.0, _LUT_N)
    cyl = 0.30 + 0.70 * (1.0 - t * t) ** 0.35
    inner = 16.0 * np.exp(-(((t - 0.82) / 0.07) ** 2))
    air = cfg.plastic_level * cyl + inner
    liquid = cfg.liquid_level * cyl + cfg.lens_gain * np.exp(-((t / 0.35) ** 2)) + 0.6 * inner
    return air.astype(F32), liquid.astype(F32)


def make_geometry(cfg: VialStripConfig) -> Geometry:
    """Turn the relative geometry of the config into pixels."""
    h, p = float(cfg.height), float(cfg.vial_pitch)
    g = {
        "flag_top": cfg.flag_top * h,
        "flag_bottom": cfg.flag_bottom * h,
        "neck_bottom": cfg.neck_bottom * h,
        "shoulder_bottom": cfg.shoulder_bottom * h,
        "body_bottom": cfg.body_bottom * h,
        "vial_bottom": cfg.vial_bottom * h,
        "flag_hw": cfg.flag_half_width * p,
        "neck_hw": cfg.neck_half_width * p,
        "body_hw": cfg.body_half_width * p,
    }
    prof_y, prof_hw, prof_norm = _profile(g, cfg.height)
    s1, s2, s3 = (round(f * h) for f in cfg.region_splits)
    emb_w = int(2 * (g["flag_hw"] - 6))
    emboss = _emboss_pattern(max(emb_w, 4))
    flag_h = g["flag_bottom"] - g["flag_top"]
    lut_air, lut_liquid = _wall_luts(cfg)
    return Geometry(
        height=cfg.height,
        width=cfg.width,
        pitch=p,
        n_vials=cfg.n_vials,
        supersample=cfg.supersample,
        web_top=cfg.web_top * h,
        web_bottom=cfg.web_bottom * h,
        region_y=(0, s1, s2, s3, cfg.height),
        prof_y=prof_y,
        prof_hw=prof_hw,
        prof_norm=prof_norm,
        emboss=emboss,
        emboss_y0=g["flag_top"] + 0.5 * flag_h - emboss.shape[0] / 2.0,
        lut_air=lut_air,
        lut_liquid=lut_liquid,
        **g,
    )


@dataclass
class Blob:
    """A round nuisance (bubble or droplet) in strip coordinates."""

    x: float
    y: float
    r: float
    strength: float


@dataclass
class Scene:
    """Everything random about a good strip except sensor noise."""

    shift: tuple[float, float]
    angle_deg: float
    meniscus_y: np.ndarray  # (n_vials,) level at the vial axis
    meniscus_curv: np.ndarray  # (n_vials,) rise at the walls, px
    meniscus_band: np.ndarray  # (n_vials,) thickness of the dark band, px
    bubbles: list[Blob]
    droplets: list[Blob]
    light: dict[str, float]
    texture_seed: int
    # (n_vials,) slope of the liquid surface (px per px, + = lower on the right) while a moving
    # strip tilts it; None = level (the still images of vials.py).
    meniscus_tilt: np.ndarray | None = None


@dataclass
class DefectSpec:
    """One defect to draw: its kind, vial and drawing parameters (strip coordinates)."""

    kind: str
    vial: int
    params: dict[str, Any]


# --------------------------------------------------------------------------- sampling


def vial_cx(geo: Geometry, v: int) -> float:
    return (v + 0.5) * geo.pitch - 0.5


def meniscus_at(scene: Scene, geo: Geometry, v: int, x: float, y: float) -> float:
    """Meniscus row at column x of vial v (it climbs towards the walls)."""
    hw = float(geo.half_width(y))
    u = x - vial_cx(geo, v)
    t = min(abs(u) / max(hw, 0.5), 1.0)
    tilt = 0.0 if scene.meniscus_tilt is None else float(scene.meniscus_tilt[v]) * u
    return float(scene.meniscus_y[v] - scene.meniscus_curv[v] * t * t + tilt)


def sample_scene(rng: np.random.Generator, cfg: VialStripConfig, geo: Geometry) -> Scene:
    """Draw pose, meniscus shapes, bubbles, droplets and lighting for one strip."""
    n = geo.n_vials
    sx, sy = rng.uniform(-cfg.max_shift, cfg.max_shift, 2)
    shift = (float(sx), float(sy))
    angle = float(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg))
    sd = cfg.meniscus_jitter * geo.height
    base: float | np.ndarray = cfg.meniscus_level
    if cfg.meniscus_levels:
        base = np.asarray(cfg.meniscus_levels)[rng.integers(0, len(cfg.meniscus_levels), n)]
    level = base * geo.height + np.clip(rng.normal(0, 1, n), -2.5, 2.5) * sd
    curv = rng.uniform(*cfg.meniscus_curvature, n)
    band = rng.uniform(1.8, 3.2, n)
    scene = Scene(
        shift=shift,
        angle_deg=angle,
        meniscus_y=level.astype(F32),
        meniscus_curv=curv.astype(F32),
        meniscus_band=band.astype(F32),
        bubbles=[],
        droplets=[],
        light={
            "gain": float(rng.uniform(0.93, 1.05)),
            "gx": float(rng.uniform(-1, 1) * cfg.lighting_gradient),
            "gy": float(rng.uniform(-1, 1) * cfg.lighting_gradient),
            "vig": float(rng.uniform(0.3, 1.0) * cfg.vignetting),
            "vx": float(rng.uniform(-0.2, 0.2)),
            "vy": float(rng.uniform(-0.2, 0.2)),
        },
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )
    for v in range(n):
        scene.bubbles += _sample_bubbles(rng, cfg, geo, scene, v)
        scene.droplets += _sample_droplets(rng, cfg, geo, scene, v)
    return scene


def _radius(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Small radii are more frequent than large ones."""
    return float(lo + (hi - lo) * rng.random() ** 2)


def _sample_bubbles(
    rng: np.random.Generator, cfg: VialStripConfig, geo: Geometry, scene: Scene, v: int
) -> list[Blob]:
    """Bubbles float just under the meniscus, a few deeper."""
    out = []
    cx = vial_cx(geo, v)
    for _ in range(int(rng.poisson(cfg.bubbles_per_vial))):
        r = _radius(rng, *cfg.bubble_radius)
        x = cx + rng.uniform(-1, 1) * (geo.body_hw - r - 2.5)
        depth = r + min(rng.exponential(4.0), 18.0)
        y = meniscus_at(scene, geo, v, x, float(scene.meniscus_y[v])) + depth
        out.append(Blob(float(x), float(y), r, float(rng.uniform(0.3, 0.6))))
    return out


def _sample_droplets(
    rng: np.random.Generator, cfg: VialStripConfig, geo: Geometry, scene: Scene, v: int
) -> list[Blob]:
    """Drops stuck on the inner wall between the neck and the meniscus."""
    out = []
    cx = vial_cx(geo, v)
    for _ in range(int(rng.poisson(cfg.droplets_per_vial))):
        r = _radius(rng, *cfg.droplet_radius)
        top = geo.neck_bottom + 4.0
        bottom = float(scene.meniscus_y[v] - scene.meniscus_curv[v]) - r - 1.5
        if bottom <= top:
            continue
        y = float(rng.uniform(top, bottom))
        hw = float(geo.half_width(y)) - r - 1.5
        if hw <= 0.5:
            continue
        x = float(cx + rng.uniform(-1, 1) * hw)
        out.append(Blob(x, y, r, float(rng.uniform(0.2, 0.45))))
    return out


# --------------------------------------------------------------------------- drawing


@dataclass
class Canvas:
    """Grids shared by the drawing steps of one render (fine grid, `ss` x the output)."""

    ss: int
    X: np.ndarray  # strip-frame x of every fine pixel
    Y: np.ndarray
    V: np.ndarray  # vial index of every fine pixel
    U: np.ndarray  # x relative to that vial's axis
    hw: np.ndarray  # local half width of the vial (bumps included)
    t: np.ndarray  # |U| / half width: 0 on the axis, 1 at the wall
    vial: np.ndarray  # anti-aliased coverage of the vials
    wet: np.ndarray  # fraction of liquid below the meniscus (0 outside the vials)
    product: np.ndarray  # coverage of vials + web (the plastic)
    img: np.ndarray  # float32 intensities
    pose: tuple[float, float, float, float, float, float]  # cos, sin, cx, cy, dx, dy


def _grid(geo: Geometry, scene: Scene) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Strip-frame coordinates of every fine output pixel (inverse pose transform)."""
    ss = geo.supersample
    ys = ((np.arange(geo.height * ss, dtype=F32) + 0.5) / ss - 0.5)[:, None]
    xs = ((np.arange(geo.width * ss, dtype=F32) + 0.5) / ss - 0.5)[None, :]
    cx, cy = (geo.width - 1) / 2.0, (geo.height - 1) / 2.0
    dx, dy = scene.shift
    a = math.radians(scene.angle_deg)
    c, s = math.cos(a), math.sin(a)
    px, py = xs - (cx + dx), ys - (cy + dy)
    X = (c * px + s * py + cx).astype(F32)
    Y = (-s * px + c * py + cy).astype(F32)
    return X, Y, (c, s, cx, cy, dx, dy)


def to_output(pose: tuple, x: float, y: float) -> tuple[float, float]:
    """Strip-frame point -> output pixel coordinates (forward pose transform)."""
    c, s, cx, cy, dx, dy = pose
    return c * (x - cx) - s * (y - cy) + cx + dx, s * (x - cx) + c * (y - cy) + cy + dy


def _window(cv: Canvas, x: float, y: float, radius: float) -> tuple[slice, slice]:
    """Fine-grid slices covering a disc of the strip frame."""
    ox, oy = to_output(cv.pose, x, y)
    r, ss = radius + 2.0, cv.ss
    h, w = cv.img.shape
    y0, y1 = max(int((oy - r + 0.5) * ss), 0), min(int((oy + r + 0.5) * ss) + 1, h)
    x0, x1 = max(int((ox - r + 0.5) * ss), 0), min(int((ox + r + 0.5) * ss) + 1, w)
    return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


def _bump_offset(
    geo: Geometry, Y: np.ndarray, V: np.ndarray, U: np.ndarray, defects: list[DefectSpec]
) -> np.ndarray | None:
    """Outward displacement of the wall by `bump` defects (None when there is none)."""
    bumps = [d for d in defects if d.kind == "bump"]
    if not bumps:
        return None
    off = np.zeros_like(Y)
    for d in bumps:
        p = d.params
        sel = (V == d.vial) & (U * p["side"] > 0) & (np.abs(Y - p["y"]) < 4 * p["sigma"])
        off[sel] += p["amp"] * np.exp(-(((Y[sel] - p["y"]) / p["sigma"]) ** 2))
    return off


def _warp_bumps(AU: np.ndarray, hw: np.ndarray, off: np.ndarray | None) -> np.ndarray:
    """Local warp: pull |x| back by the bump, fully at the wall, not at all near the axis.

    Shading is then evaluated at the warped position, so a bump moves the wall and its rim
    without disturbing the middle of the vial.
    """
    if off is None:
        return AU
    w = _smoothstep((AU / np.maximum(hw, 0.5) - 0.4) / 0.6)
    return AU - off * w


def _shade_vials(
    cfg: VialStripConfig, geo: Geometry, scene: Scene, cv: Canvas, idx: np.ndarray,
    dm: np.ndarray,
) -> np.ndarray:  # fmt: skip
    """Back-lit intensities of flag, neck, shoulder, liquid body and bottom at flat `idx`.

    `dm` is the signed distance below the meniscus of those pixels.
    """
    Y, t, U = cv.Y.ravel()[idx], cv.t.ravel()[idx], cv.U.ravel()[idx]
    V, wet = cv.V.ravel()[idx], cv.wet.ravel()[idx]
    ti = (t * (_LUT_N - 1) + 0.5).astype(np.int32)
    air = geo.lut_air[ti]
    val = air + (geo.lut_liquid[ti] - air) * wet
    # meniscus: dark band under the surface, darker where it climbs the wall, bright reflex above
    band = scene.meniscus_band[V]
    k = np.flatnonzero((dm > -4.0) & (dm < 3.0 * band))
    dk, bk, tk = dm[k], band[k], t[k]
    amp = 0.45 + 0.35 * tk * tk
    val[k] = val[k] * (1.0 - amp * np.exp(-(((dk - 0.5 * bk) / (0.5 * bk)) ** 2)))
    val[k] += 18.0 * np.exp(-(((dk + 1.3) / 0.6) ** 2))
    # the bottom is thicker plastic
    k = np.flatnonzero(Y > geo.body_bottom)
    val[k] *= 1.0 - 0.3 * _smoothstep(
        (Y[k] - geo.body_bottom) / (geo.vial_bottom - geo.body_bottom)
    )
    # flag: a flat tab with a dark rim and the mould engraving
    k = np.flatnonzero(Y < geo.flag_bottom + 1.0)
    yk, uk = Y[k], U[k]
    d_edge = np.minimum(cv.hw.ravel()[idx[k]] - np.abs(uk), yk - geo.flag_top)
    flag = cfg.flag_level * (1.0 - 0.5 * np.exp(-np.maximum(d_edge, 0.0) / 1.2))
    eh, ew = geo.emboss.shape
    iy = np.floor(yk - geo.emboss_y0).astype(np.int32)
    ix = np.floor(uk + ew / 2.0).astype(np.int32)
    ok = (iy >= 0) & (iy < eh) & (ix >= 0) & (ix < ew)
    flag[ok] -= cfg.emboss_depth * geo.emboss[iy[ok], ix[ok]]
    val[k] = flag
    return val.astype(F32)


def _shade_web(cfg: VialStripConfig, geo: Geometry, cv: Canvas, idx: np.ndarray) -> np.ndarray:
    """The thin flat plastic joining neighbouring vials, with a seam in the middle."""
    Y, AU = cv.Y.ravel()[idx], np.abs(cv.U.ravel()[idx])
    edge = np.minimum(Y - geo.web_top, geo.web_bottom - Y)
    val = cfg.web_level * (1.0 - 0.35 * np.exp(-np.maximum(edge, 0.0) / 1.0))
    val -= 22.0 * np.exp(-(((geo.pitch / 2.0 - AU) / 0.8) ** 2))
    return val.astype(F32)


def _draw_blob(cv: Canvas, b: Blob, in_liquid: bool, center_gain: float) -> None:
    """Bubble/droplet: a small lens with a dark rim and a bright centre (back light)."""
    sy, sx = _window(cv, b.x, b.y, b.r * 1.5)
    if sy.start >= sy.stop or sx.start >= sx.stop:
        return
    d = np.hypot(cv.X[sy, sx] - b.x, cv.Y[sy, sx] - b.y) / b.r
    wet = cv.wet[sy, sx]
    weight = cv.vial[sy, sx] * (wet if in_liquid else 1.0 - wet)
    patch = cv.img[sy, sx]
    rim = 1.0 - b.strength * np.exp(-(((d - 0.8) / 0.25) ** 2))
    new = patch * rim + center_gain * b.strength * np.exp(-((d / 0.35) ** 2))
    cv.img[sy, sx] = patch + (new - patch) * weight


def _draw_particle(cv: Canvas, p: dict[str, Any]) -> None:
    """Opaque dark particle: union of small discs, alpha-blended to a dark level."""
    for x, y, r in p["discs"]:
        sy, sx = _window(cv, x, y, r)
        if sy.start >= sy.stop or sx.start >= sx.stop:
            continue
        d = np.hypot(cv.X[sy, sx] - x, cv.Y[sy, sx] - y)
        a = np.clip((r - d) * cv.ss + 0.5, 0.0, 1.0) * cv.vial[sy, sx]
        cv.img[sy, sx] = cv.img[sy, sx] * (1.0 - a) + p["level"] * a


def _segment_distance(
    X: np.ndarray, Y: np.ndarray, a: tuple[float, float], b: tuple[float, float]
) -> np.ndarray:
    ax, ay = a
    vx, vy = b[0] - ax, b[1] - ay
    t = np.clip(((X - ax) * vx + (Y - ay) * vy) / max(vx * vx + vy * vy, 1e-6), 0.0, 1.0)
    return np.hypot(X - ax - t * vx, Y - ay - t * vy)


def _draw_scratch(cv: Canvas, p: dict[str, Any]) -> None:
    """Thin (slightly curved) line on the plastic, darker or lighter than it."""
    pts = p["points"]
    xs, ys = [q[0] for q in pts], [q[1] for q in pts]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    rad = max(max(xs) - min(xs), max(ys) - min(ys)) / 2 + 2
    sy, sx = _window(cv, cx, cy, rad * 1.5)
    X, Y = cv.X[sy, sx], cv.Y[sy, sx]
    d = np.min([_segment_distance(X, Y, pts[i], pts[i + 1]) for i in range(len(pts) - 1)], 0)
    a = np.exp(-((d / p["width"]) ** 2)) * cv.vial[sy, sx]
    cv.img[sy, sx] += p["sign"] * p["contrast"] * a


def _draw_soft_particle(cv: Canvas, p: dict[str, Any]) -> None:
    """Particle stuck on the inner wall: seen through the plastic, so blurred and part-opaque."""
    for x, y, r in p["discs"]:
        sy, sx = _window(cv, x, y, 2.0 * r + 1.0)
        if sy.start >= sy.stop or sx.start >= sx.stop:
            continue
        d = np.hypot(cv.X[sy, sx] - x, cv.Y[sy, sx] - y) / max(r, 0.3)
        a = p["opacity"] * np.exp(-(d**2)) * cv.vial[sy, sx]
        cv.img[sy, sx] = cv.img[sy, sx] * (1.0 - a) + p["level"] * a


def _draw_foam(cv: Canvas, p: dict[str, Any]) -> None:
    """Foam on the liquid surface: a crowd of small bubbles, drawn over liquid and air alike."""
    for x, y, r, strength in p["blobs"]:
        sy, sx = _window(cv, x, y, r * 1.5)
        if sy.start >= sy.stop or sx.start >= sx.stop:
            continue
        d = np.hypot(cv.X[sy, sx] - x, cv.Y[sy, sx] - y) / r
        patch = cv.img[sy, sx]
        new = patch * (1.0 - strength * np.exp(-(((d - 0.8) / 0.3) ** 2)))
        new += 12.0 * strength * np.exp(-((d / 0.35) ** 2))
        cv.img[sy, sx] = patch + (new - patch) * cv.vial[sy, sx]


def _draw_burn(cv: Canvas, p: dict[str, Any]) -> None:
    """Soft dark smudge (a burn is brownish; in gray it only darkens)."""
    x0, y0 = p["center"]
    sy, sx = _window(cv, x0, y0, p["extent"])
    X, Y = cv.X[sy, sx], cv.Y[sy, sx]
    g = np.zeros_like(X)
    for x, y, sxx, syy, w in p["lobes"]:
        g += w * np.exp(-(((X - x) / sxx) ** 2 + ((Y - y) / syy) ** 2))
    g = np.clip(g, 0.0, 1.0) * cv.product[sy, sx]
    cv.img[sy, sx] *= 1.0 - p["strength"] * g


def render_noiseless(
    cfg: VialStripConfig, geo: Geometry, scene: Scene, defects: list[DefectSpec]
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the strip, its nuisances and `defects`; return (image, plastic coverage), output size.

    Edges are anti-aliased analytically (coverage from the distance to the contour), so the
    default supersample=1 is already smooth; larger values only refine thin details.
    """
    X, Y, pose = _grid(geo, scene)
    ss = geo.supersample
    V = np.clip(np.floor((X + 0.5) / geo.pitch), 0, geo.n_vials - 1).astype(np.int32)
    U = X - ((V + 0.5) * geo.pitch - 0.5)
    hw, norm = geo.outline(Y)
    AU = _warp_bumps(np.abs(U), hw, _bump_offset(geo, Y, V, U, defects))
    vial = np.clip((hw - AU) * (norm * ss) + 0.5, 0.0, 1.0)
    vial *= np.clip((Y - geo.flag_top) * ss + 0.5, 0.0, 1.0)
    vial[hw <= 0.0] = 0.0
    t = np.minimum(AU / np.maximum(hw, 0.5), 1.0)
    idx = np.flatnonzero(vial > 0.0)
    vi, ti = V.ravel()[idx], t.ravel()[idx]
    dm = Y.ravel()[idx] - (scene.meniscus_y[vi] - scene.meniscus_curv[vi] * ti * ti)
    if scene.meniscus_tilt is not None:
        dm -= scene.meniscus_tilt[vi] * U.ravel()[idx]
    wet = np.zeros_like(vial)
    wet.ravel()[idx] = np.clip(dm * ss + 0.5, 0.0, 1.0)
    web = np.clip(np.minimum(Y - geo.web_top, geo.web_bottom - Y) * ss + 0.5, 0.0, 1.0)
    web *= 1.0 - vial
    web[((V == 0) & (U < 0)) | ((V == geo.n_vials - 1) & (U > 0))] = 0.0
    bg = F32(cfg.background_level)
    cv = Canvas(ss, X, Y, V, U, hw, t, vial, wet, vial + web, np.full(X.shape, bg, F32), pose)
    flat = cv.img.ravel()
    flat[idx] += (_shade_vials(cfg, geo, scene, cv, idx, dm) - bg) * vial.ravel()[idx]
    iw = np.flatnonzero(web > 0.0)
    flat[iw] += (_shade_web(cfg, geo, cv, iw) - bg) * web.ravel()[iw]
    for b in scene.bubbles:
        _draw_blob(cv, b, in_liquid=True, center_gain=30.0)
    for b in scene.droplets:
        _draw_blob(cv, b, in_liquid=False, center_gain=20.0)
    drawers = {
        "black_spot": _draw_particle, "scratch": _draw_scratch, "burn": _draw_burn,
        "soft_particle": _draw_soft_particle, "foam": _draw_foam,
    }  # fmt: skip
    for d in defects:
        if d.kind in drawers:
            drawers[d.kind](cv, d.params)
    if ss == 1:
        return cv.img, cv.product
    size = (geo.width, geo.height)
    img = cv2.resize(cv.img, size, interpolation=cv2.INTER_AREA)
    return img, cv2.resize(cv.product, size, interpolation=cv2.INTER_AREA)


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]
) -> np.ndarray:
    """Unit-variance-ish smooth random field: coarse gaussian grid, cubic upsampling."""
    coarse = rng.normal(0.0, 1.0, (cells[0] + 3, cells[1] + 3)).astype(F32)
    big = cv2.resize(
        coarse,
        (shape[1] + 2 * shape[1] // cells[1], shape[0] + 2 * shape[0] // cells[0]),
        interpolation=cv2.INTER_CUBIC,
    )
    oy, ox = shape[0] // cells[0], shape[1] // cells[1]
    return big[oy : oy + shape[0], ox : ox + shape[1]]


def finish(
    cfg: VialStripConfig,
    scene: Scene,
    img: np.ndarray,
    cov: np.ndarray,
    noise_rng: np.random.Generator,
) -> np.ndarray:
    """Plastic texture, uneven lighting and sensor noise; returns the uint8 image."""
    h, w = img.shape
    trng = np.random.default_rng(scene.texture_seed)
    streaks = _smooth_noise(trng, (h, w), (max(h // 40, 1), max(w // 3, 1)))  # flow lines
    blotches = _smooth_noise(trng, (h, w), (max(h // 12, 1), max(w // 12, 1)))
    out = img + cfg.texture_sigma * (0.7 * streaks + 0.7 * blotches) * cov
    li = scene.light
    yy = (np.arange(h, dtype=F32) / h - 0.5)[:, None]
    xx = (np.arange(w, dtype=F32) / w - 0.5)[None, :]
    r2 = (xx - li["vx"]) ** 2 + ((yy - li["vy"]) * h / w) ** 2
    light = li["gain"] * (1.0 + li["gx"] * xx + li["gy"] * yy) * (1.0 - li["vig"] * 4.0 * r2)
    out = out * light + noise_rng.normal(0.0, cfg.noise_sigma, (h, w)).astype(F32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- defects


def _point_in(
    rng: np.random.Generator, geo: Geometry, v: int, region: int, margin: float
) -> tuple[float, float]:
    """A random point inside vial v, within the rows of `region`, `margin` px from the wall."""
    lo = max(geo.region_y[region], geo.flag_top + margin)
    hi = min(geo.region_y[region + 1], geo.vial_bottom - margin)
    for _ in range(50):
        y = float(rng.uniform(lo, hi))
        hw = float(geo.half_width(y)) - margin
        if hw > 0.5:
            return float(vial_cx(geo, v) + rng.uniform(-1, 1) * hw), y
    return float(vial_cx(geo, v)), float(geo.region_y[region] + geo.region_y[region + 1]) / 2


def _uniform(rng: np.random.Generator, r: tuple[float, float]) -> float:
    return float(rng.uniform(r[0], r[1]))


def _spot(rng: np.random.Generator, cfg: VialStripConfig, geo: Geometry, v: int) -> dict:
    region = int(rng.choice(4, p=np.asarray(cfg.spot_region_probs) / sum(cfg.spot_region_probs)))
    x, y = _point_in(rng, geo, v, region, margin=3.0)
    r = _uniform(rng, cfg.particle_size) / 2.0
    discs = [(x, y, r)]
    for _ in range(int(rng.integers(0, 3))):
        a = rng.uniform(0, 2 * math.pi)
        discs.append(
            (x + r * 0.6 * math.cos(a), y + r * 0.6 * math.sin(a), r * rng.uniform(0.5, 0.8))
        )
    return {"discs": discs, "level": _uniform(rng, cfg.particle_level)}


def _scratch(rng: np.random.Generator, cfg: VialStripConfig, geo: Geometry, v: int) -> dict:
    region = int(rng.choice(4, p=[0.3, 0.3, 0.25, 0.15]))
    x, y = _point_in(rng, geo, v, region, margin=3.0)
    length = _uniform(rng, cfg.scratch_length)
    a = rng.uniform(0, math.pi)
    ux, uy = math.cos(a), math.sin(a)
    bend = rng.uniform(-0.15, 0.15) * length
    pts = []
    for s in np.linspace(0.0, 1.0, 5):
        k = bend * 4 * s * (1 - s)
        pts.append((x + (s - 0.5) * length * ux - k * uy, y + (s - 0.5) * length * uy + k * ux))
    return {
        "points": pts,
        "width": float(rng.uniform(0.45, 0.8)),
        "contrast": _uniform(rng, cfg.scratch_contrast),
        "sign": -1.0 if rng.random() < 0.7 else 1.0,
    }


def _bump(rng: np.random.Generator, cfg: VialStripConfig, geo: Geometry, v: int) -> dict:
    region = int(rng.choice([1, 2, 3], p=[0.35, 0.45, 0.2]))
    lo = max(geo.region_y[region], geo.neck_bottom + 4)
    hi = min(geo.region_y[region + 1], geo.vial_bottom - 5)
    amp = _uniform(rng, cfg.bump_amplitude) * (1.0 if rng.random() < 0.6 else -1.0)
    return {
        "y": float(rng.uniform(lo, hi)),
        "side": 1.0 if rng.random() < 0.5 else -1.0,
        "amp": amp,
        "sigma": _uniform(rng, cfg.bump_sigma),
    }


def _burn(rng: np.random.Generator, cfg: VialStripConfig, geo: Geometry, v: int) -> dict:
    region = int(rng.choice([0, 1], p=[0.55, 0.45]))
    x, y = _point_in(rng, geo, v, region, margin=2.0)
    size = _uniform(rng, cfg.burn_size)
    lobes = [(x, y, size * rng.uniform(0.8, 1.3), size * rng.uniform(0.6, 1.1), 1.0)]
    for _ in range(int(rng.integers(1, 3))):
        a = rng.uniform(0, 2 * math.pi)
        d = size * rng.uniform(0.5, 1.0)
        s = size * rng.uniform(0.5, 0.9)
        lobes.append(
            (
                x + d * math.cos(a),
                y + d * math.sin(a),
                s,
                s * rng.uniform(0.7, 1.2),
                float(rng.uniform(0.5, 0.9)),
            )
        )
    return {
        "center": (x, y),
        "extent": 3.0 * size,
        "lobes": lobes,
        "strength": _uniform(rng, cfg.burn_strength),
    }


_SAMPLERS = {"black_spot": _spot, "scratch": _scratch, "bump": _bump, "burn": _burn}


def sample_defect(
    rng: np.random.Generator,
    cfg: VialStripConfig,
    geo: Geometry,
    scene: Scene,
    kind: str,
    vial: int,
) -> DefectSpec:
    """Draw the parameters of one defect of `kind` on vial `vial` (strip coordinates)."""
    del scene  # defects ignore the nuisances: a particle may well sit next to a bubble
    return DefectSpec(kind, vial, _SAMPLERS[kind](rng, cfg, geo, vial))
