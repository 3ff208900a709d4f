"""Product layout (YAML, validation), region cut/paste, and box labels."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from anomalyqc.errors import ConfigError, DataError
from anomalyqc.line.layout import (
    DEFAULT_REGION_NAMES,
    ProductLayout,
    default_layout,
    layout_from_dict,
    load_layout,
    region_roi_masks,
    write_layout,
)
from anomalyqc.line.patches import cut, paste, region_labels
from anomalyqc.synth.vials import VialStripConfig, vial_region_boxes


def _grid_layout(patch_size: int = 16, **kw: object) -> ProductLayout:
    """3 vials of 16 x 48 px in a 48 x 56 image (8 px margin right), 3 regions of 16 x 16."""
    data = {
        "name": "grid",
        "image_height": 48,
        "image_width": 56,
        "patch_size": patch_size,
        "vials": [{"box": [16 * v, 0, 16 * v + 16, 48]} for v in range(3)],
        "regions": [{"name": f"r{r}", "box": [0, 16 * r, 16, 16 * r + 16]} for r in range(3)],
    }
    data.update(kw)
    return layout_from_dict(data)


def _write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- layout


def test_default_layout_matches_the_generator_geometry() -> None:
    for cfg in (VialStripConfig(), VialStripConfig(height=96, vial_pitch=24, n_vials=3)):
        layout = default_layout(cfg, patch_size=64)
        assert layout.image_size == (cfg.height, cfg.width)
        assert layout.n_vials == cfg.n_vials and layout.region_names == list(DEFAULT_REGION_NAMES)
        assert np.array_equal(layout.boxes(), vial_region_boxes(cfg))
        assert layout.patch_size == 64


def test_layout_yaml_round_trip(tmp_path: Path) -> None:
    layout = _grid_layout(regions=[{"name": "odd: name, [x]", "box": [0, 0, 16, 16], "roi": "m a.png"}])
    cv2.imwrite(str(tmp_path / "m a.png"), np.full((4, 4), 255, np.uint8))
    write_layout(layout, tmp_path / "layout.yaml")
    assert load_layout(tmp_path / "layout.yaml") == layout
    d = default_layout()
    write_layout(d, tmp_path / "d.yaml")
    assert load_layout(tmp_path / "d.yaml") == d
    assert "vials:" in (tmp_path / "d.yaml").read_text()


def test_layout_boxes_are_vial_offsets_plus_region_boxes() -> None:
    b = _grid_layout().boxes()
    assert b.shape == (3, 3, 4)
    assert b[2, 1].tolist() == [32, 16, 48, 32]


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"vials": [{"box": [48, 0, 64, 48]}]}, "vials", "leaves the 56x48 image"),
        ({"vials": [{"box": [0, 0, 16, 48]}, {"box": [8, 0, 24, 48]}]}, "layout", "overlap"),
        ({"regions": [{"name": "a", "box": [0, 0, 16, 20]}, {"name": "b", "box": [0, 16, 16, 32]}]},
         "layout", "regions a and b overlap"),
        ({"regions": [{"name": "a", "box": [0, 40, 16, 56]}]}, "layout", "leaves vials[0].box"),
        ({"regions": [{"name": "a", "box": [4, 4, 4, 8]}]}, "regions.0.box", "x0 < x1"),
        ({"regions": [{"name": "a", "box": [0, 0, 4, 4]}, {"name": "a", "box": [0, 8, 4, 12]}]},
         "layout", "unique"),
        ({"patch_size": 4}, "patch_size", "greater than or equal to 8"),
        ({"colour": "red"}, "colour", "Extra inputs"),
        ({"vials": []}, "vials", "at least 1"),
    ],
)  # fmt: skip
def test_layout_validation_names_the_file_and_field(
    tmp_path: Path, change: dict, field: str, words: str
) -> None:
    import yaml

    data = _grid_layout().model_dump(mode="json") | change
    path = _write_yaml(tmp_path / "bad.yaml", yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_layout(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: "), msg
    assert field in msg and words in msg, msg
    assert "\n" not in msg


def test_overlap_can_be_allowed() -> None:
    layout = _grid_layout(
        allow_overlap=True,
        regions=[{"name": "a", "box": [0, 0, 16, 20]}, {"name": "b", "box": [0, 16, 16, 32]}],
    )
    assert layout.n_regions == 2


def test_layout_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read the layout file"):
        load_layout(tmp_path / "nope.yaml")
    bad = _write_yaml(tmp_path / "syntax.yaml", "name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"syntax\.yaml: not valid YAML at line"):
        load_layout(bad)
    lst = _write_yaml(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_layout(lst)
    layout = _grid_layout(regions=[{"name": "a", "box": [0, 0, 16, 16], "roi": "masks/a.png"}])
    write_layout(layout, tmp_path / "roi.yaml")
    with pytest.raises(DataError, match=r"regions\[a\]\.roi: mask file .*a\.png does not exist"):
        load_layout(tmp_path / "roi.yaml")


def test_region_roi_masks(tmp_path: Path) -> None:
    (tmp_path / "masks").mkdir()
    m = np.zeros((8, 8), np.uint8)
    m[:, 4:] = 255  # right half inspected
    cv2.imwrite(str(tmp_path / "masks" / "r1.png"), m)
    layout = _grid_layout(
        regions=[
            {"name": "r0", "box": [0, 0, 16, 16]},
            {"name": "r1", "box": [0, 16, 16, 32], "roi": "masks/r1.png"},
        ]
    )
    write_layout(layout, tmp_path / "layout.yaml")
    rois = region_roi_masks(load_layout(tmp_path / "layout.yaml"), tmp_path, size=16)
    assert rois.shape == (2, 16, 16)
    assert rois[0].all()
    assert not rois[1][:, :8].any() and rois[1][:, 8:].all()


# --------------------------------------------------------------------------- cut / paste


def test_cut_is_an_exact_crop_at_box_size_and_paste_inverts_it() -> None:
    layout = _grid_layout(patch_size=16)
    x = torch.rand(2, 1, 48, 56)
    p = cut(x, layout)
    assert p.shape == (2, 3, 3, 1, 16, 16)
    for b in range(2):
        for v in range(3):
            for r in range(3):
                x0, y0, x1, y1 = layout.boxes()[v, r]
                assert torch.equal(p[b, v, r, 0], x[b, 0, y0:y1, x0:x1])
    back = paste(p, layout, fill=-1.0)
    assert torch.equal(back[..., :48], x[..., :48]), "cut then paste is exact at box size"
    assert (back[..., 48:] == -1.0).all(), "pixels outside every box get the fill value"


def test_cut_multichannel_and_uint8() -> None:
    layout = _grid_layout(patch_size=16)
    x = torch.randint(0, 256, (1, 3, 48, 56), dtype=torch.uint8)
    p = cut(x, layout)
    assert p.dtype == torch.float32 and p.shape == (1, 3, 3, 3, 16, 16)
    assert torch.equal(p[0, 1, 2], x[0, :, 32:48, 16:32].float())


def test_round_trip_through_resizing_is_close_for_smooth_images() -> None:
    """Default generator layout, 256 px patches (the thesis size): boxes are 64 x 41..85 px."""
    layout = default_layout(patch_size=256)
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(320.0), indexing="ij")
    x = (torch.sin(xx / 9.0) * torch.cos(yy / 13.0))[None, None]
    back = paste(cut(x, layout), layout)
    err = (back - x).abs()
    assert err.max() < 0.02, float(err.max())
    down = default_layout(patch_size=32)  # shrinking then growing loses detail, not position
    err2 = (paste(cut(x, down), down) - x).abs()
    assert err2.mean() < 0.05, float(err2.mean())


def test_paste_puts_each_patch_in_its_own_box() -> None:
    layout = default_layout(patch_size=24)
    maps = torch.arange(20, dtype=torch.float32).reshape(1, 5, 4, 1, 1).expand(1, 5, 4, 24, 24)
    heat = paste(maps, layout)[0, 0]
    for v in range(5):
        for r in range(4):
            x0, y0, x1, y1 = layout.boxes()[v, r]
            assert torch.allclose(heat[y0:y1, x0:x1], torch.tensor(v * 4.0 + r), atol=1e-5)


def test_paste_keeps_the_larger_score_where_boxes_overlap() -> None:
    layout = _grid_layout(
        allow_overlap=True,
        regions=[{"name": "a", "box": [0, 0, 16, 24]}, {"name": "b", "box": [0, 16, 16, 40]}],
        patch_size=16,
    )
    maps = torch.zeros(1, 3, 2, 16, 16)
    maps[:, :, 0] = 5.0
    maps[:, :, 1] = 2.0
    heat = paste(maps, layout)[0, 0]
    assert (heat[16:24, :48] == 5.0).all() and (heat[24:40, :48] == 2.0).all()


def test_cut_and_paste_reject_wrong_shapes() -> None:
    layout = _grid_layout()
    with pytest.raises(DataError, match="are 40x56 .* expects 48x56"):
        cut(torch.zeros(1, 1, 40, 56), layout)
    with pytest.raises(DataError, match=r"\(B, C, H, W\)"):
        cut(torch.zeros(48, 56), layout)
    with pytest.raises(DataError, match=r"expects \(B, 3, 3, P, P\)"):
        paste(torch.zeros(1, 2, 3, 16, 16), layout)


def test_region_labels_any_pixel_in_box() -> None:
    layout = default_layout()
    masks = np.zeros((2, 256, 320), np.uint8)
    masks[0, 100, 70] = 1  # vial 1, shoulder (rows 69..153)
    masks[1, 255, 319] = 1  # last vial, bottom corner
    masks[1, 68, 0] = 1  # vial 0, flag (last row of R0)
    lab = region_labels(masks, layout)
    assert lab.shape == (2, 5, 4)
    assert np.argwhere(lab[0]).tolist() == [[1, 1]]
    assert np.argwhere(lab[1]).tolist() == [[0, 0], [4, 3]]
    assert np.array_equal(region_labels(torch.from_numpy(masks), layout), lab)
