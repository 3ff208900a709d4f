"""Detectors, one folder each; importing this package registers them by CLI name."""

from anomalyqc.models.base import REGISTRY, Detector, detector_class
from anomalyqc.models.blob import Blob
from anomalyqc.models.classifier import Classifier
from anomalyqc.models.draem import Draem
from anomalyqc.models.ganomaly import Ganomaly
from anomalyqc.models.grdnet import Grdnet
from anomalyqc.models.mhbc import Mhbc
from anomalyqc.models.padim import Padim
from anomalyqc.models.patchcore import Patchcore
from anomalyqc.models.resganad import Resganad
from anomalyqc.models.unet import Unet

__all__ = ["REGISTRY", "Blob", "Classifier", "Detector", "Draem", "Ganomaly", "Grdnet", "Mhbc", "Padim",
           "Patchcore", "Resganad", "Unet", "detector_class"]
