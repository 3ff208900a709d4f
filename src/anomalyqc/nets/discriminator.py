"""GAN discriminator (thesis 8.2.2.1): the encoder trunk plus a real/fake classifier.

It returns the logit and the trunk's feature map: GANomaly's adversarial loss for the
generator is feature matching, L_adv = ||f(X) - f(X_hat)||_2 (eq. 8.1), so the generator
needs the features, while the discriminator itself trains on the logits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from anomalyqc.nets.coders import Encoder, NetConfig, as_config


class Discriminator(nn.Module):
    """X (B, C, H, W) -> (logits (B,), features (B, *config.feature_shape))."""

    def __init__(self, config: NetConfig | dict[str, Any] | None = None, **params: Any) -> None:
        super().__init__()
        # The bottleneck setting belongs to the generator: the classifier sits on the trunk.
        self.config = as_config(config, **{**params, "bottleneck": "none"})
        self.trunk = Encoder(self.config)
        # Global average pooling keeps the head independent of the input size.
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(self.config.feature_shape[0], 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk.features(x)
        return self.head(features).squeeze(1), features
