from anomalyqc.models.padim.model import Padim, PadimConfig

__all__ = ["Padim", "PadimConfig"]
