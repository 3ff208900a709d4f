from anomalyqc.models.mhbc.model import Mhbc, MhbcConfig

__all__ = ["Mhbc", "MhbcConfig"]
