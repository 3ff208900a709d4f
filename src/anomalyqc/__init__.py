"""anomalyqc: visual anomaly detection for pharmaceutical quality control."""

__version__ = "0.1.0"
