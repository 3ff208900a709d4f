"""Grad-CAM (Selvaraju et al., ICCV 2017; thesis appendix A, eqs. A.1-A.3).

For a class c with pre-softmax score y^c and the feature maps A^k of a convolutional layer:

    dy^c / dA^k_ij                                   (A.1, the gradient)
    alpha^c_k = 1/Z sum_ij dy^c / dA^k_ij            (A.2, global average over the map)
    L^c = ReLU(sum_k alpha^c_k A^k)                  (A.3)

upsampled (bilinearly) to the input size here so it can be laid over the image.

The gradient is taken from the layer onwards only: the features are computed (under any
grad mode, inference_mode included) and then copied into a fresh autograd graph, so
Grad-CAM works whatever mode the caller is in and never backpropagates through the trunk.

`class_activation` is the traceable core (no data-dependent Python checks), so the same
code runs in predict and, traced with its backward (anomalyqc.export.gradients), in the
ONNX export; `grad_cam` validates the classes first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def class_activation(features: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                     choose: Callable[[torch.Tensor], torch.Tensor],
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps (B, 1, h, w) >= 0 at the layer's size, logits (B, K)) of the layer's `features`
    (B, C, h, w); `choose` picks one class index per image from the (detached) logits, so
    the head runs once for both the class decision and its gradient."""
    with torch.inference_mode(False), torch.enable_grad():
        # clone(): an inference tensor cannot enter a graph; the copy can.
        a = features.detach().clone().float().requires_grad_(True)
        logits = head(a)
        classes = choose(logits.detach())
        index = classes.to(logits.device, torch.long).view(-1, 1)
        y = logits.gather(1, index).sum()
        (grad,) = torch.autograd.grad(y, a)  # A.1; images are independent: one backward
        alpha = grad.mean(dim=(2, 3), keepdim=True)  # A.2
        cam = F.relu((alpha * a).sum(dim=1, keepdim=True))  # A.3
    return cam.detach(), logits.detach()


def grad_cam(features: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
             classes: torch.Tensor, size: tuple[int, int] | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps (B, 1, H, W) >= 0, logits (B, K)) of the layer's `features` (B, C, h, w),
    `head` mapping them to pre-softmax class scores, for one class index per image.

    `size` (H, W) upsamples the maps; None keeps the layer's h x w."""
    if classes.ndim != 1 or classes.shape[0] != features.shape[0]:
        raise ValueError(f"grad_cam: one class per image expected, got classes of shape "
                         f"{tuple(classes.shape)} for {features.shape[0]} images")

    def given(logits: torch.Tensor) -> torch.Tensor:
        k = logits.shape[1]
        if int(classes.min()) < 0 or int(classes.max()) >= k:
            raise ValueError(f"grad_cam: class indices must be in [0, {k}), got "
                             f"{classes.tolist()}")
        return classes.detach().clone()

    cam, logits = class_activation(features, head, given)
    return upsample(cam, size), logits


def upsample(cam: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Maps (B, 1, h, w) bilinearly to `size` (None or the same size: unchanged)."""
    if size is not None and tuple(cam.shape[-2:]) != tuple(size):
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
    return cam


__all__ = ["class_activation", "grad_cam", "upsample"]
