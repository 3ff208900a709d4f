"""The supervised classifier as an ONNX graph: its whole predict (class probabilities, score
= 1 - P(good), and the Grad-CAM map of the most probable defect class), gradient included.

The graph is ClassifierNet.outputs, the function predict runs, traced with its backward
(anomalyqc.export.gradients), so Grad-CAM's d y^c / d A^k is a chain of forward ops in the
file. Outputs: score, anomaly_map, and the classifier's extras class_index (float, as in
Prediction.extras) and class_probabilities (B, K), which OnnxDetector hands to predict's
rows and evaluate's per-class metrics. The map is checked at export within MAP_RTOL of its
peak, not the strict tolerance (see MAP_RTOL).
"""

from __future__ import annotations

import torch
from torch import fx, nn

from anomalyqc.models.base import Detector

OUTPUTS = ("score", "anomaly_map", "class_index", "class_probabilities")
# The map's parity tolerance, relative to its peak (export.onnx): Grad-CAM's gradient jumps
# at the ReLU/ReLU6 kinks, and a pre-activation within float32 rounding of one can fall on
# either side in torch and in ONNX Runtime. Measured: one flipped element of 20 000 moved a
# 64 px map (stride-8 layer) by 0.028 (maps peak at the score, <= 1); score and probabilities still agreed to
# 1e-5. Scores, probabilities and classes keep the strict tolerance.
MAP_RTOL = 0.05


class _Outputs(nn.Module):
    def __init__(self, net: nn.Module, explanation: str, guided: bool) -> None:
        super().__init__()
        self.net = net
        self.explanation, self.guided = explanation, guided

    def forward(self, images: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.net.outputs(images, self.explanation, self.guided)  # type: ignore[operator]


def classifier_graph(det: Detector) -> fx.GraphModule:
    """The fitted classifier's inference as a traced module with outputs OUTPUTS."""
    from anomalyqc.export.gradients import trace_with_gradients
    from anomalyqc.models.classifier import Classifier

    assert isinstance(det, Classifier)
    c = det.config.channels or 3
    h, w = det.input_size
    # Two images: a batch of one would let the tracer specialise the batch size to 1.
    example = torch.rand(2, c, h, w, generator=torch.Generator().manual_seed(0))
    gm = trace_with_gradients(_Outputs(det.nets["net"], det.config.explanation,
                                       det.config.guided), example,
                              f"the classifier (backbone {det.config.backbone}, "
                              f"cam_layer {det.config.cam_layer})")
    gm.output_names = OUTPUTS  # type: ignore[assignment]
    gm.map_rtol = MAP_RTOL  # type: ignore[assignment]
    return gm


__all__ = ["OUTPUTS", "classifier_graph"]
