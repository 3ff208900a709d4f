from anomalyqc.models.draem.model import Draem, DraemConfig

__all__ = ["Draem", "DraemConfig"]
