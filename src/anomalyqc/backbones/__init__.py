"""Pretrained feature extractors returning the patch-embedding grid (B, D, h, w)."""

from anomalyqc.backbones.extractor import FeatureExtractor, aggregate
from anomalyqc.backbones.zoo import BACKBONES

__all__ = ["BACKBONES", "FeatureExtractor", "aggregate"]
