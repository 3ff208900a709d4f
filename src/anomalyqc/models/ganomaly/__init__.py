from anomalyqc.models.ganomaly.model import Ganomaly, GanomalyConfig

__all__ = ["Ganomaly", "GanomalyConfig"]
