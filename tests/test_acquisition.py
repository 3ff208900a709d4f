"""Line acquisitions: strip identity across runs, what moves within a run, defect types, rank images."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from anomalyqc.errors import ConfigError, DataError
from anomalyqc.line.layout import default_layout
from anomalyqc.line.patches import cut, region_labels
from anomalyqc.line.rank import KEY_FRAMES, key_frame_indices, line_batch, rank_images
from anomalyqc.synth import _render
from anomalyqc.synth.acquisition import (
    ALL_DEFECT_TYPES,
    MOVING_TYPES,
    AcquisitionConfig,
    PhysicalStrip,
    acquire,
    make_strip,
)
from anomalyqc.synth.vials import VialStripConfig

# 128 x 160 strips, 312.5 um/px like the default geometry, 6 frames: fast but every type fits.
SMALL = AcquisitionConfig(strip=VialStripConfig(height=128, vial_pitch=32), n_frames=6, body_diameter_mm=8.0)
LAYOUT = default_layout(SMALL.strip, patch_size=32)


def _strip(seed: int, defect: str | None, cfg: AcquisitionConfig = SMALL) -> PhysicalStrip:
    return make_strip(np.random.default_rng([seed, 99]), cfg, defect)


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def _pose(cfg: AcquisitionConfig, shift: tuple[float, float], angle: float) -> tuple:
    a = math.radians(angle)
    return (math.cos(a), math.sin(a), (cfg.strip.width - 1) / 2, (cfg.strip.height - 1) / 2, *shift)


# --------------------------------------------------------------------------- config


def test_pixel_size_is_stated_and_particle_sizes_follow_it() -> None:
    cfg = AcquisitionConfig()
    assert cfg.pixel_size_um == pytest.approx(156.25)  # 16 mm body over 102.4 px (512 px strip)
    assert cfg.particle_size_px == pytest.approx((1.0, 6.4))  # 100 um is under a pixel: from 1 px
    still = AcquisitionConfig(strip=VialStripConfig())  # the still generator's 256 px strip
    assert still.pixel_size_um == pytest.approx(312.5)
    tall = AcquisitionConfig(strip=VialStripConfig(height=1024, vial_pitch=256))
    assert tall.pixel_size_um == pytest.approx(78.125)
    assert tall.particle_size_px == pytest.approx((1.28, 12.8))  # the whole 100..1000 um range
    with pytest.raises(ConfigError, match="all under 1.0 px at 156.2 um/px"):
        AcquisitionConfig(particle_size_um=(50.0, 120.0))
    with pytest.raises(ConfigError, match="defect_types"):
        AcquisitionConfig(defect_types=("dent",))
    with pytest.raises(ConfigError, match="unknown line defect type"):
        _strip(0, "dent")


def test_particle_sizes_are_drawn_in_the_range() -> None:
    for t in ("black_spot", "stuck_particle", "particle", "floating_particle"):
        for seed in range(4):
            for d in _strip(seed, t).defects:
                assert 312.5 - 1e-6 <= d.size_um <= 1000.0 + 1e-6, (t, d.size_um)


# --------------------------------------------------------------------------- acquisitions


def test_acquisitions_are_deterministic_and_runs_differ() -> None:
    a = acquire(_strip(1, "scratch"), 1, SMALL)
    b = acquire(_strip(1, "scratch"), 1, SMALL)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.masks, b.masks)
    assert a.frames.shape == a.masks.shape == (6, 128, 160) and a.frames.dtype == np.uint8
    c = acquire(_strip(1, "scratch"), 2, SMALL)
    assert a.shift != c.shift, "a new pose every run"
    assert np.abs(a.frames.astype(int) - c.frames).mean() > 2


def test_good_strips_have_no_defect_pixels() -> None:
    s = _strip(3, None)
    assert s.label == 0 and s.defects == [] and s.defect_types == []
    assert not acquire(s, 1, SMALL).masks.any()


@pytest.mark.parametrize("kind", ALL_DEFECT_TYPES)
def test_every_defect_type_is_drawn_on_its_vial(kind: str) -> None:
    for seed in range(3):
        s = _strip(seed, kind)
        assert s.label == 1 and s.defect_types == [kind]
        assert all(d.moving == (kind in MOVING_TYPES) for d in s.defects)
        vial = s.defects[0].vial
        acq = acquire(s, 1, SMALL)
        assert acq.masks.any(axis=(1, 2)).sum() >= SMALL.n_frames // 2, "visible in most frames"
        hit = region_labels(acq.masks, LAYOUT).any(axis=0)  # (vials, regions)
        assert hit[vial].any(), (kind, seed, hit)
        if kind != "bump":  # a bump pushes the wall out, at this small pitch into the next column
            assert not np.delete(hit, vial, axis=0).any(), (kind, seed, hit)
        if not s.defects[0].moving:
            assert hit[vial, s.defects[0].describe()["region"]], "stated region holds the defect"


def test_engraving_scratches_cross_the_engraving() -> None:
    geo = _render.make_geometry(SMALL.strip)
    for seed in range(4):
        d = _strip(seed, "engraving_scratch").defects[0]
        ys = [p[1] for p in d.params["points"]]
        assert geo.emboss_y0 - 4 < np.mean(ys) < geo.emboss_y0 + geo.emboss.shape[0] + 4
        assert d.describe()["region"] == 0


@pytest.mark.parametrize("kind", ["black_spot", "stuck_particle"])
def test_a_static_defect_is_the_same_object_in_every_run(kind: str) -> None:
    """Same place on the vial: the mask centroid follows the strip's pose, run after run."""
    s = _strip(5, kind)
    x, y, _ = s.defects[0].params["discs"][0]
    areas = []
    for run in (1, 2, 3):
        acq = acquire(s, run, SMALL)
        m = acq.masks[0]
        expected = _render.to_output(_pose(SMALL, acq.shift, acq.angle_deg), x, y)
        assert np.hypot(*(_centroid(m) - expected)) < 1.5, (run, _centroid(m), expected)
        areas.append(int(m.sum()))
    assert max(areas) <= 2 * min(areas), areas


def test_the_plastic_texture_is_the_same_in_every_run() -> None:
    """Still, noiseless, evenly lit strips: the flags of two runs differ only by the light gain."""
    still = replace(SMALL.strip, noise_sigma=0.0, max_shift=0.0, max_rotation_deg=0.0,
                    lighting_gradient=0.0, vignetting=0.0)  # fmt: skip
    cfg = replace(SMALL, strip=still, n_frames=1)
    s, other = _strip(1, None, cfg), _strip(2, None, cfg)
    a, b = (acquire(s, run, cfg).frames[0][6:26].astype(float) for run in (1, 2))
    c = acquire(other, 2, cfg).frames[0][6:26].astype(float)
    assert np.abs(a * b.mean() / a.mean() - b).mean() < 0.6, "same strip, same texture"
    assert np.abs(a * c.mean() / a.mean() - c).mean() > 1.2, "another strip, another texture"


@pytest.mark.parametrize("kind", ["scratch", "black_spot", "stuck_particle", "engraving_scratch", "burn"])
def test_static_defects_do_not_move_within_a_run(kind: str) -> None:
    acq = acquire(_strip(7, kind), 1, SMALL)
    first = acq.masks[0].astype(bool)
    for m in acq.masks[1:].astype(bool):
        iou = (first & m).sum() / max((first | m).sum(), 1)
        assert iou > 0.7, (kind, iou)


@pytest.mark.parametrize("kind", sorted(MOVING_TYPES))
def test_moving_defects_move_within_a_run(kind: str) -> None:
    for seed in range(3):
        acq = acquire(_strip(seed, kind), 1, SMALL)
        seen = [f for f in range(SMALL.n_frames) if acq.masks[f].any()]
        c = np.array([_centroid(acq.masks[f]) for f in seen])
        assert np.hypot(*(c - c[0]).T).max() > 2.0, (kind, seed, c)


def test_the_liquid_moves_and_the_flag_does_not() -> None:
    acq = acquire(_strip(2, None), 1, SMALL)
    d = acq.frames[-1].astype(float) - acq.frames[0]
    flag = d[8:30]  # flags and engraving: only sensor noise differs (sigma 2.5 per frame)
    assert abs(flag.mean()) < 1.0 and flag.std() < 2.5 * math.sqrt(2) * 1.3
    mid = acquire(_strip(2, None), 1, SMALL).frames[SMALL.n_frames // 2].astype(float) - acq.frames[0]
    surface = mid[int(0.40 * 128) : int(0.62 * 128)]  # the meniscus band, swung by the motion
    assert np.abs(surface).max() > 40


# --------------------------------------------------------------------------- rank images


def test_rank_images_are_per_pixel_min_and_max() -> None:
    rng = np.random.default_rng(0)
    f = rng.integers(0, 256, (2, 5, 7, 9), dtype=np.uint8)
    lo, hi = rank_images(f)
    assert np.array_equal(lo, np.sort(f, axis=1)[:, 0]) and np.array_equal(hi, np.sort(f, axis=1)[:, -1])
    tlo, thi = rank_images(torch.from_numpy(f))
    assert isinstance(tlo, torch.Tensor) and torch.equal(tlo, torch.from_numpy(lo))
    assert torch.equal(thi, torch.from_numpy(hi))


def _twins(kind: str, seed: int, cfg: AcquisitionConfig = SMALL) -> tuple:
    """The same strip with and without its defect (same rng draws: same poses, bubbles, noise)."""
    bad, good = _strip(seed, kind, cfg), _strip(seed, None, cfg)
    assert (bad.seed, bad.texture_seed) == (good.seed, good.texture_seed)
    a, b = acquire(bad, 1, cfg), acquire(good, 1, cfg)
    return a, rank_images(a.frames.astype(int)), rank_images(b.frames.astype(int))


def test_a_static_dark_spot_survives_in_the_max_image() -> None:
    for seed in range(3):
        acq, (lo_d, hi_d), (lo_g, hi_g) = _twins("black_spot", seed)
        core = acq.masks.min(axis=0) > 0  # defect pixels in every frame
        assert core.any()
        assert (hi_d - hi_g)[core].mean() < -15, "kept by the light rank"
        assert (lo_d - lo_g)[core].mean() < -15, "and by the dark rank"


def test_a_moving_particle_leaves_the_max_image_and_trails_in_the_min_image() -> None:
    for seed in range(3):
        acq, (lo_d, hi_d), (lo_g, hi_g) = _twins("particle", seed)
        trail = acq.masks.max(axis=0) > 0
        assert (lo_d - lo_g)[trail].mean() < -10, "the dark rank keeps its trail"
        assert np.abs(hi_d - hi_g)[trail].mean() < 3, "the light rank has lost it"


def test_moving_bubbles_vanish_from_the_max_image() -> None:
    """Same scenes with bubbles held still or drifting: only the rank images tell them apart."""
    base = replace(SMALL, strip=replace(SMALL.strip, bubbles_per_vial=5.0), slosh_px=0.0, tilt=0.0)
    still = acquire(_strip(4, None, base), 1, replace(base, bubble_travel=(0.0, 0.0)))
    moving = acquire(_strip(4, None, base), 1, replace(base, bubble_travel=(9.0, 12.0)))
    assert np.array_equal(still.frames[0], moving.frames[0]), "the first frames are the same scene"
    lo_s, hi_s = rank_images(still.frames.astype(int))
    lo_m, hi_m = rank_images(moving.frames.astype(int))
    rims = hi_s < hi_m - 15  # dark bubble rims the light rank kept only while they stood still
    trails = lo_m < lo_s - 15  # dark trails the dark rank picked up once they moved
    assert rims.sum() > 30 and trails.sum() > rims.sum(), (rims.sum(), trails.sum())
    assert np.array_equal(hi_s[:40], hi_m[:40]), "nothing above the liquid changed"


# --------------------------------------------------------------------------- key-frame batch


def test_key_frame_indices() -> None:
    assert key_frame_indices(16) == [0, 7, 15] and KEY_FRAMES == (1, 8, 16)
    assert key_frame_indices(4, (1, 2, -1)) == [0, 1, 3]
    with pytest.raises(
        ConfigError, match="key frame 8 does not exist .* 4 frames; choose key frames between 1 and 4"
    ):
        key_frame_indices(4)


def test_line_batch_is_the_60_patch_batch_of_eq_10_1() -> None:
    cfg = replace(SMALL, n_frames=16)
    frames = acquire(_strip(6, "scratch", cfg), 1, cfg).frames
    b = line_batch(frames, LAYOUT)
    assert len(b) == 60 == 3 * 5 * 4 and b.patches.shape == (60, 1, 32, 32)
    assert b.sources == ["frame_1", "frame_8", "frame_16"]
    ref = cut(torch.from_numpy(frames[[0, 7, 15]])[:, None].float(), LAYOUT)
    for k in (0, 13, 27, 59):
        s, v, r = int(b.source[k]), int(b.vial[k]), int(b.region[k])
        assert torch.equal(b.patches[k], ref[s, v, r])
    assert (b.source * 20 + b.vial * 4 + b.region).tolist() == list(range(60)), "(frame, vial, region) order"
    br = line_batch(frames, LAYOUT, rank=True)
    assert len(br) == 100 and br.sources[3:] == ["rank_min", "rank_max"]
    lo, hi = rank_images(torch.from_numpy(frames))
    assert torch.equal(br.patches[60:80], cut(lo[None, None].float(), LAYOUT).reshape(20, 1, 32, 32))
    assert torch.equal(br.patches[80:], cut(hi[None, None].float(), LAYOUT).reshape(20, 1, 32, 32))
    with pytest.raises(DataError, match="an acquisition is"):
        line_batch(frames[0, 0], LAYOUT)


def test_a_level_surface_renders_as_the_still_generator_does() -> None:
    """The tilt added for moving strips is neutral when zero: still images stay byte-identical."""
    cfg = SMALL.strip
    geo = _render.make_geometry(cfg)
    scene = _render.sample_scene(np.random.default_rng(0), cfg, geo)
    flat = replace(scene, meniscus_tilt=np.zeros(cfg.n_vials, np.float32))
    a, _ = _render.render_noiseless(cfg, geo, scene, [])
    b, _ = _render.render_noiseless(cfg, geo, flat, [])
    assert np.array_equal(a, b)
    tilted, _ = _render.render_noiseless(
        cfg, geo, replace(scene, meniscus_tilt=np.full(5, 0.2, np.float32)), []
    )
    assert not np.array_equal(a, tilted)
