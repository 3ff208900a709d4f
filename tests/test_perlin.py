"""Perlin anomaly synthesis P_q (thesis eq. 8.11): masks, blend, probability, sources."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from anomalyqc.errors import ConfigError, DataError
from anomalyqc.synth.perlin import PerlinConfig, PerlinSynthesizer, perlin_noise, perturb

pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_deterministic_under_a_seed() -> None:
    x = torch.rand(6, 3, 48, 48, generator=_gen(0))
    synth = PerlinSynthesizer()
    a, b = synth(x, generator=_gen(7)), synth(x, generator=_gen(7))
    assert torch.equal(a.images, b.images) and torch.equal(a.mask, b.mask)
    assert torch.equal(a.beta, b.beta) and torch.equal(a.noise, b.noise)
    c = synth(x, generator=_gen(8))
    assert not torch.equal(a.mask, c.mask)


def test_mask_is_binary_and_inside_the_roi() -> None:
    x = torch.rand(16, 1, 64, 64, generator=_gen(1))
    roi = torch.zeros(1, 1, 64, 64)
    roi[..., 10:40, 5:30] = 1
    out = PerlinSynthesizer(probability=1.0)(x, roi=roi, generator=_gen(2))
    assert set(out.mask.unique().tolist()) <= {0.0, 1.0}
    assert out.mask.sum() > 0
    assert (out.mask * (1 - roi)).sum() == 0
    # Outside the mask (so outside the ROI) the image is untouched.
    assert torch.equal(out.images * (1 - out.mask), x * (1 - out.mask))
    # A per-image ROI works too.
    rois = torch.zeros(16, 1, 64, 64)
    rois[::2, ..., :32] = 1
    rois[1::2, ..., 32:] = 1
    out = PerlinSynthesizer(probability=1.0)(x, roi=rois, generator=_gen(3))
    assert (out.mask * (1 - rois)).sum() == 0 and out.mask.sum() > 0
    with pytest.raises(ValueError, match="roi must be"):
        PerlinSynthesizer()(x, roi=torch.ones(1, 1, 32, 32))


@pytest.mark.parametrize("q", [0.25, 0.75])
def test_probability_q_is_respected(q: float) -> None:
    x = torch.rand(400, 1, 48, 48, generator=_gen(4))
    out = PerlinSynthesizer(probability=q)(x, generator=_gen(5))
    share = out.applied.float().mean().item()
    assert abs(share - q) < 0.08, share
    untouched = ~out.applied
    assert torch.equal(out.images[untouched], x[untouched])
    assert (out.beta[untouched] == 0).all() and (out.noise[untouched] == 0).all()
    assert ((out.beta[out.applied] >= 0.5) & (out.beta[out.applied] <= 1.0)).all()


def test_q_zero_and_one() -> None:
    x = torch.rand(8, 3, 32, 32, generator=_gen(6))
    none = PerlinSynthesizer(probability=0.0)(x, generator=_gen(0))
    assert torch.equal(none.images, x) and none.mask.sum() == 0 and (none.beta == 0).all()
    every = PerlinSynthesizer(probability=1.0)(x, generator=_gen(0))
    assert every.applied.all()


def test_blend_formula_exact_on_a_known_case() -> None:
    # Two flat images, texture source (the other image of the batch, flipped), beta = 0.6:
    # inside the mask X* = 0.4 X + 0.6 N, outside X* = X.
    x = torch.stack([torch.full((1, 32, 32), 0.2), torch.full((1, 32, 32), 0.9)])
    synth = PerlinSynthesizer(probability=1.0, beta_range=(0.6, 0.6), source="texture")
    out = synth(x, generator=_gen(9))
    m = out.mask.bool()
    assert m[0].any() and m[1].any()
    assert torch.allclose(out.images[0][m[0]], torch.tensor(0.4 * 0.2 + 0.6 * 0.9))
    assert torch.allclose(out.images[1][m[1]], torch.tensor(0.4 * 0.9 + 0.6 * 0.2))
    assert torch.equal(out.images[~m.expand_as(x)], x[~m.expand_as(x)])
    assert torch.allclose(out.noise[0][m[0]], torch.tensor(0.9))
    assert torch.allclose(out.beta, torch.tensor([0.6, 0.6]))


def test_blend_matches_eq_8_11_with_uniform_noise() -> None:
    x = torch.rand(8, 3, 40, 40, generator=_gen(10))
    out = perturb(x, PerlinConfig(probability=1.0), generator=_gen(11))
    b, m = out.beta.view(-1, 1, 1, 1), out.mask
    expected = (1 - m) * x + (1 - b) * m * x + b * out.noise
    assert torch.allclose(out.images, expected)
    assert (out.noise * (1 - m)).abs().sum() == 0
    inside = out.noise[m.bool().expand_as(x)]
    assert inside.min() >= 0 and inside.max() <= 1 and inside.std() > 0.2  # random pixels


def test_masks_have_perlin_structure() -> None:
    synth = PerlinSynthesizer(probability=1.0)
    masks = synth.masks(24, (96, 96), _gen(12)).squeeze(1).numpy().astype(np.uint8)
    shares = masks.mean(axis=(1, 2))
    assert (shares < 0.6).all() and shares.max() > 0.01
    blobs = [cv2.connectedComponents(m)[0] - 1 for m in masks]
    assert max(blobs) >= 3  # several separate blobs at least sometimes
    assert len({m.tobytes() for m in masks}) == len(masks)


def test_noise_field_is_smooth_and_bounded() -> None:
    n = perlin_noise(3, (64, 64), torch.tensor([[1, 1], [2, 4], [8, 8]]), _gen(13))
    assert n.shape == (3, 64, 64) and n.abs().max() <= 1.0 and n.std() > 0.05
    # Coarse lattices vary slowly from pixel to pixel, fine ones faster.
    steps = (n[:, 1:] - n[:, :-1]).abs().mean(dim=(1, 2))
    assert steps[0] < steps[2]


@pytest.mark.parametrize("channels", [1, 3])
def test_works_for_one_and_three_channels(channels: int) -> None:
    x = torch.rand(4, channels, 32, 48, generator=_gen(14))
    for source in ("uniform", "texture"):
        out = PerlinSynthesizer(probability=1.0, source=source)(x, generator=_gen(15))
        assert out.images.shape == x.shape and out.noise.shape == x.shape
        assert out.mask.shape == (4, 1, 32, 48) and out.beta.shape == (4,)
        assert out.images.min() >= 0 and out.images.max() <= 1


def test_folder_textures(tmp_path) -> None:
    tex = tmp_path / "tex"
    tex.mkdir()
    for i, value in enumerate((30, 220)):
        cv2.imwrite(str(tex / f"t{i}.png"), np.full((20, 30, 3), value, np.uint8))
    x = torch.full((12, 1, 32, 32), 0.5)
    synth = PerlinSynthesizer(probability=1.0, beta_range=(1.0, 1.0), source="folder",
                              texture_dir=tex)
    out = synth(x, generator=_gen(16))
    inside = out.images[out.mask.bool()]
    # beta = 1: the blob is the texture itself, one of the two flat gray levels.
    levels = torch.tensor([30 / 255, 220 / 255])
    assert torch.isclose(inside[:, None], levels[None], atol=1e-3).any(dim=1).all()
    assert torch.isclose(inside, levels[0], atol=1e-3).any()
    assert torch.isclose(inside, levels[1], atol=1e-3).any()


def test_bad_configuration_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="texture_dir"):
        PerlinSynthesizer(source="folder")
    with pytest.raises(ConfigError):
        PerlinSynthesizer(probability=1.5)
    with pytest.raises(ConfigError, match="min_scale_log2"):
        PerlinSynthesizer(min_scale_log2=4, max_scale_log2=2)
    (tmp_path / "empty").mkdir()
    synth = PerlinSynthesizer(probability=1.0, source="folder", texture_dir=tmp_path / "empty")
    with pytest.raises(DataError, match="no images"):
        synth(torch.rand(2, 1, 16, 16), generator=_gen(0))
