from anomalyqc.models.patchcore.model import Patchcore, PatchcoreConfig

__all__ = ["Patchcore", "PatchcoreConfig"]
