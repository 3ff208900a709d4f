"""Network shapes the thesis names, as NetConfig presets with size and width as parameters.

- ResGANAD (10.5.2, figs. 8.8-8.10, 10.3): 256x256x1 in; a 3x3 stem to 64 filters, then 4
  stages of 3 pre-activation blocks of three 3x3 convs, filters doubling per stage and the
  third block halving H and W, to 16x16x1024; dense bottleneck of 64; mirrored decoder with
  transposed convs; sigmoid output. The generator is encoder-decoder-encoder (8.2.2.5.1).
- GRD-Net's residual generator (8.2.2.2, fig. 8.2; 9.1.3.1): stages of two blocks (stride
  1, then stride 2 with a strided 1x1 shortcut), with a convolutional bottleneck of 32x8x8
  (CRAE) or a dense one of 2048 (DRAE).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from anomalyqc.errors import ConfigError
from anomalyqc.nets.coders import EncoderDecoderEncoder, NetConfig, as_config


def resganad_config(
    width: int = 64, image_size: int | tuple[int, int] = 256, channels: int = 1,
    latent_dim: int = 64, **overrides: Any,
) -> NetConfig:
    """The thesis's full size by default; `width` is the stem's filter count (stage i has
    width * 2**(i+1), so 64 reaches 1024 at the fourth stage)."""
    return as_config(dict(channels=channels, image_size=image_size, base_width=width,
                          width_mult=2.0, stages=4, blocks=3, convs=3, bottleneck="dense",
                          latent_dim=latent_dim), **overrides)


def resganad_generator(**kwargs: Any) -> EncoderDecoderEncoder:
    """Encoder-decoder-encoder with resganad_config(**kwargs); inference uses `.autoencoder`."""
    return EncoderDecoderEncoder(resganad_config(**kwargs))


def grdnet_config(
    bottleneck: Literal["conv", "dense"] = "conv", image_size: int = 256, channels: int = 3,
    base_width: int = 32, **overrides: Any,
) -> NetConfig:
    """CRAE (conv, 32 x 8 x 8) or DRAE (dense, 2048): as many stages as bring the input
    down to 8x8, two blocks of two convs each."""
    stages = math.log2(image_size / 8)
    if image_size < 16 or stages != int(stages):
        raise ConfigError(f"GRD-Net's 8x8 bottleneck needs an image size of 16 * 2**k, "
                          f"got {image_size}")
    return as_config(dict(channels=channels, image_size=image_size, base_width=base_width,
                          width_mult=2.0, stages=int(stages), blocks=2, convs=2,
                          bottleneck=bottleneck, latent_channels=32, latent_dim=2048,
                          max_width=512), **overrides)
