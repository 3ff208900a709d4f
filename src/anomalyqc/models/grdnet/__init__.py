from anomalyqc.models.grdnet.model import Grdnet, GrdnetConfig

__all__ = ["Grdnet", "GrdnetConfig"]
