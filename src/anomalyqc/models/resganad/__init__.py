from anomalyqc.models.resganad.model import Resganad, ResganadConfig

__all__ = ["Resganad", "ResganadConfig"]
