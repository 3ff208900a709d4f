"""What fit sets is typed as optional; reading it before a fit is a clear error, not a None."""

from __future__ import annotations

import pytest
import torch

from anomalyqc.errors import ConfigError
from anomalyqc.models import Mhbc, Padim, Patchcore
from anomalyqc.stats.kmeans import OnlineKMeans


@pytest.mark.parametrize("cls", [Padim, Patchcore, Mhbc])
def test_state_of_an_unfitted_detector_says_fit_first(cls):
    with pytest.raises(ConfigError, match=f"{cls.name} is not fitted: call fit"):
        cls(image_size=64, allow_download=False).state_tensors()


def test_patchcore_merge_refuses_a_shard_without_a_bank():
    a, b = Patchcore(image_size=64), Patchcore(image_size=64)
    a.bank = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="cannot merge PatchCore banks"):
        a.merge(b)
    b.bank = torch.ones(2, 8)
    assert a.merge(b).bank.shape == (6, 8)


def test_kmeans_state_before_any_point_is_an_error():
    km = OnlineKMeans(2, 3, 4)
    with pytest.raises(ValueError, match="no clusters yet"):
        km.state()
    km.update(torch.randn(16, 2, 3))  # 16 points per location: seeds the 4 clusters
    assert km.state()["kmeans.counts"].sum().item() == 2 * 16
