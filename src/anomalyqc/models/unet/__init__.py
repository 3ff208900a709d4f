from anomalyqc.models.unet.model import Unet, UnetConfig

__all__ = ["Unet", "UnetConfig"]
