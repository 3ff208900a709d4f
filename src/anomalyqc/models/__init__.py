"""Detectors, one folder each; importing this package registers them by CLI name."""

from anomalyqc.models.base import REGISTRY, Detector, detector_class
from anomalyqc.models.mhbc import Mhbc
from anomalyqc.models.padim import Padim
from anomalyqc.models.patchcore import Patchcore

__all__ = ["REGISTRY", "Detector", "Mhbc", "Padim", "Patchcore", "detector_class"]
