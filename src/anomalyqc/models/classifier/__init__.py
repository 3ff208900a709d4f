"""The supervised defect classifier with Grad-CAM (see model.py)."""

from anomalyqc.models.classifier.model import Classifier, ClassifierConfig, ClassifierNet

__all__ = ["Classifier", "ClassifierConfig", "ClassifierNet"]
