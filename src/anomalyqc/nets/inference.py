"""Inference-only rewrites of the reconstruction networks: channels-last memory, BatchNorm
folded into the convolution before it, and bfloat16 autocast of the network bodies.

Each works on a copy (`inference_copy`), never on the networks being trained or saved.

- channels_last: oneDNN's convolutions run on NHWC without reordering each layer's input;
  on CPU this is where most of the gain of the other two options comes from.
- fold: a BatchNorm right after a convolution (conv -> BN -> ReLU inside each pre-activation
  block, and in the U-Net) becomes that convolution's scale and bias. The block's first BN,
  the pre-activation one, cannot fold: it follows the residual sum, whose unnormalised value
  the identity shortcut still needs, and a ReLU sits between it and the next convolution. So
  with three convs per block two BNs of three fold, with two one of two.
- bfloat16: the bodies (Encoder, Decoder, U-Net) run under autocast and hand float32 back,
  so losses and scores (SSIM above all) are still computed in float32. Fast only where the
  CPU has native bf16 (AVX512-BF16 or AMX); elsewhere autocast emulates it and is slower.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from anomalyqc.nets.coders import Decoder, Encoder
from anomalyqc.nets.unet import UNet

InferenceDtype = Literal["float32", "bfloat16"]
_BODIES = (Encoder, Decoder, UNet)


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d/ConvTranspose2d in an
    nn.Sequential into that conv (in place, eval statistics); returns how many folded."""
    folded = 0
    for seq in module.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        items = list(seq._modules.items())
        for (name_a, a), (name_b, b) in zip(items, items[1:]):
            if (isinstance(a, (nn.Conv2d, nn.ConvTranspose2d)) and isinstance(b, nn.BatchNorm2d)
                    and b.track_running_stats and b.running_mean is not None):
                seq._modules[name_a] = fuse_conv_bn_eval(
                    a.eval(), b.eval(), transpose=isinstance(a, nn.ConvTranspose2d))
                seq._modules[name_b] = nn.Identity()
                folded += 1
    return folded


def _autocast_forward(forward: Callable[..., Any], device_type: str,
                      dtype: torch.dtype) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type, dtype=dtype):
            out = forward(*args, **kwargs)
        return out.float()

    return run


def autocast_bodies(module: nn.Module, device_type: str, dtype: torch.dtype) -> int:
    """Run each Encoder, Decoder and U-Net inside `module` under autocast, returning
    float32 (in place: the instances' forward is wrapped); returns how many were wrapped."""
    wrapped = 0
    for m in module.modules():
        if isinstance(m, _BODIES):
            m.forward = _autocast_forward(m.forward, device_type, dtype)  # type: ignore[method-assign]
            if isinstance(m, Encoder):  # the discriminator calls features() directly
                m.features = _autocast_forward(m.features, device_type, dtype)  # type: ignore[method-assign]
            wrapped += 1
    return wrapped


def inference_copy(nets: dict[str, nn.Module], channels_last: bool = False, fold: bool = False,
                   dtype: InferenceDtype = "float32") -> dict[str, nn.Module]:
    """Eval-mode copies of `nets` with the chosen rewrites (see the module docstring)."""
    out = {}
    for name, net in nets.items():
        c = copy.deepcopy(net).eval()
        if fold:
            fold_batchnorm(c)
        if channels_last:
            c = c.to(memory_format=torch.channels_last)
        if dtype == "bfloat16":
            device = next(c.parameters()).device.type
            autocast_bodies(c, device, torch.bfloat16)
        out[name] = c
    return out
