"""Network building blocks of the reconstruction family (thesis 8.2.2): pre-activation
residual blocks, encoder/decoder/autoencoder, GAN discriminator, U-Net, presets, profiling."""

from anomalyqc.nets.blocks import PreActBlock, stage
from anomalyqc.nets.coders import (
    Autoencoder,
    Decoder,
    Encoder,
    EncoderDecoderEncoder,
    NetConfig,
    as_config,
)
from anomalyqc.nets.discriminator import Discriminator
from anomalyqc.nets.presets import grdnet_config, resganad_config, resganad_generator
from anomalyqc.nets.profile import count_parameters, flops_per_input
from anomalyqc.nets.unet import UNet, UNetConfig

__all__ = [
    "Autoencoder", "Decoder", "Discriminator", "Encoder", "EncoderDecoderEncoder", "NetConfig",
    "PreActBlock", "UNet", "UNetConfig", "as_config", "count_parameters", "flops_per_input",
    "grdnet_config", "resganad_config", "resganad_generator", "stage",
]
