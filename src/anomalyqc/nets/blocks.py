"""Pre-activation residual blocks (ResNet-V2) and their plain twins (thesis fig. 8.2, 8.8, 8.9).

A block is `convs` layers of BN -> ReLU -> 3x3 conv. The first conv may resample: stride 2
to halve H and W (encoder, fig. 8.2 right, 8.8c) or a stride-2 transposed conv to double
them (decoder, fig. 8.9c). The shortcut is the identity when shape and width are kept, else a
1x1 projection of the pre-activated input (strided 1x1 conv down, 2x2 stride-2 transposed
conv up), as in He et al.'s pre-activation ResNet. `residual=False` drops the shortcut and
keeps every other layer: the "vanilla" network of the residual-vs-vanilla comparison (9.1).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Resample = Literal["none", "down", "up"]


def _first_conv(cin: int, cout: int, resample: Resample) -> nn.Module:
    if resample == "down":
        return nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
    if resample == "up":
        # Kernel 4 with stride 2 covers every output pixel equally often (a 3x3 kernel gives
        # the checkerboard pattern of uneven overlap); output is exactly 2H x 2W.
        return nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False)
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False)


def _projection(cin: int, cout: int, resample: Resample) -> nn.Module:
    if resample == "down":
        return nn.Conv2d(cin, cout, 1, stride=2, bias=False)
    if resample == "up":
        return nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False)
    return nn.Conv2d(cin, cout, 1, bias=False)


class PreActBlock(nn.Module):
    """`convs` x (BN-ReLU-conv3x3) plus a shortcut; see the module docstring."""

    def __init__(
        self, cin: int, cout: int, resample: Resample = "none", convs: int = 2, residual: bool = True
    ) -> None:
        super().__init__()
        if convs < 1:
            raise ValueError("a block needs at least one convolution")
        self.pre = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
        layers: list[nn.Module] = [_first_conv(cin, cout, resample)]
        for _ in range(convs - 1):
            layers += [nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                       nn.Conv2d(cout, cout, 3, padding=1, bias=False)]
        self.body = nn.Sequential(*layers)
        self.residual = residual
        needs_projection = residual and (cin != cout or resample != "none")
        self.shortcut = _projection(cin, cout, resample) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ReLU is in place on the BN output, never on x itself, so the identity path is intact.
        a = self.pre(x)
        out = self.body(a)
        if not self.residual:
            return out
        return out + (self.shortcut(a) if self.shortcut is not None else x)


def stage(
    cin: int, cout: int, blocks: int, resample: Resample, convs: int = 2, residual: bool = True,
    widen: Literal["first", "last"] = "first",
) -> nn.Sequential:
    """One stage: the first block changes the width (1x1 projection), the middle ones keep
    it (identity shortcut), only the last one resamples (figs. 8.8/8.9, sequence a-b-c).
    With blocks=2 this is fig. 8.2's stride-1 block followed by the stride-2 block; with a
    single block that block does both. widen="last" moves the width change to the last
    block too, so the stage's body runs at `cin` and only its output has `cout` channels."""
    if blocks < 1:
        raise ValueError("a stage needs at least one block")
    layers = []
    for i in range(blocks):
        last = i == blocks - 1
        if widen == "first":
            width_in, width_out = (cin if i == 0 else cout), cout
        else:
            width_in, width_out = cin, (cout if last else cin)
        layers.append(PreActBlock(width_in, width_out, resample if last else "none", convs,
                                  residual))
    return nn.Sequential(*layers)
