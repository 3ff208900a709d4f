from anomalyqc.models.blob.model import Blob, BlobConfig

__all__ = ["Blob", "BlobConfig"]
