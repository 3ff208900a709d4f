"""Network shapes the thesis names, as NetConfig presets with size and width as parameters.

- ResGANAD (10.5.2, figs. 8.8-8.10, 10.3): 256x256x1 in; a 3x3 stem to 64 filters, then 4
  stages of 3 pre-activation blocks of three 3x3 convs, the third block halving H and W and
  doubling the filters, to 16x16x1024; dense bottleneck of 64; mirrored decoder with
  transposed convs; sigmoid output. The generator is encoder-decoder-encoder (8.2.2.5.1).

  Where the width doubles is our reading. Doubling it in a stage's first block (stage 1 at
  128 filters on 256x256, stage 4 at 1024 on 32x32) costs 574 GFLOP per 256x256 autoencoder
  pass (nets.flops_per_input): 60 patches = 34 TFLOP, 1.5 s at the A4500's 23 TFLOPS fp32
  peak and 0.73 s even at its ~47 TFLOPS TF32 tensor-core peak (TensorFlow's default on
  Ampere), against the 487 ms per 60 patches the thesis measured (table 10.2). Fig. 8.8
  doubles the filters where the resolution halves and 10.5.2 names 1024 only for the 16x16
  embedding, so here the third block does both (widen="last"): every stage's body runs at
  C x H = 64 x 256 (stem 64 @ 256, 64 @ 256, 128 @ 128, 256 @ 64, 512 @ 32 -> 1024 @ 16),
  342 GFLOP per pass, 20.5 TFLOP per 60 patches: 0.44 s at the TF32 peak, which the thesis's
  timing allows only with tensor cores. A lighter reading is width=32 (85.5 GFLOP, 16x16x512).
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
    """The thesis's full size by default; `width` is the stem's filter count (stage i's
    body runs at width * 2**i and it outputs width * 2**(i+1), so 64 reaches 1024 at the
    16x16 embedding; see the module docstring for why)."""
    return as_config(dict(channels=channels, image_size=image_size, base_width=width,
                          width_mult=2.0, stages=4, blocks=3, convs=3, bottleneck="dense",
                          latent_dim=latent_dim, widen="last"), **overrides)


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
