"""The three embedding detectors on the real MVTec AD bottle data (skipped when absent).

A reduced setting (128 px, a third of the training images) keeps this to about a minute;
the full-size figures are in benchmarks/bottle.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from anomalyqc.data import ImageDataset, ImageTransform, make_loader, records_for
from anomalyqc.evaluation import aupro, image_auroc, pixel_auroc
from anomalyqc.models import detector_class

BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not (BOTTLE / "train" / "good").is_dir(),
                       reason=f"MVTec bottle data not found at {BOTTLE}"),
]


@pytest.fixture(scope="module")
def test_set():
    tf = ImageTransform(128, None, 3)
    images, labels, masks = [], [], []
    for batch in make_loader(ImageDataset(records_for(BOTTLE, "test"), tf, 3), 16):
        images.append(batch.image)
        labels.append(batch.label)
        m = batch.mask if batch.mask is not None else torch.zeros_like(batch.image[:, :1])
        masks.append(m)
    return torch.cat(images), torch.cat(labels).numpy(), torch.cat(masks).numpy()


@pytest.mark.parametrize("name,params", [
    ("padim", {}),
    ("patchcore", {}),
    ("mhbc", {"n_clusters": 8}),
])
def test_bottle(name: str, params: dict, test_set) -> None:
    images, labels, masks = test_set
    train = records_for(BOTTLE, "train")[::3]
    det = detector_class(name)(image_size=128, **params)
    det.fit(make_loader(ImageDataset(train, ImageTransform(128, None, 3), 3), 16))
    scores, maps = [], []
    for i in range(0, len(images), 16):
        pred = det.predict(images[i:i + 16])
        scores.append(pred.score)
        maps.append(pred.anomaly_map)
    scores_np = torch.cat(scores).numpy()
    maps_np = torch.cat(maps).numpy()
    img = image_auroc(labels, scores_np)
    pix = pixel_auroc(masks, maps_np)
    pro = aupro(masks, maps_np)
    print(f"{name}: image AUROC {img:.4f} pixel AUROC {pix:.4f} AUPRO {pro:.4f}")
    assert img >= 0.97
    assert pix >= 0.95
    assert pro >= 0.75
    assert np.isfinite(scores_np).all()
