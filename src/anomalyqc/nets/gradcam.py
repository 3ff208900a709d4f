"""Grad-CAM (Selvaraju et al., ICCV 2017; thesis appendix A, eqs. A.1-A.3).

For a class c with pre-softmax score y^c and the feature maps A^k of a convolutional layer:

    dy^c / dA^k_ij                                   (A.1, the gradient)
    alpha^c_k = 1/Z sum_ij dy^c / dA^k_ij            (A.2, global average over the map)
    L^c = ReLU(sum_k alpha^c_k A^k)                  (A.3)

upsampled (bilinearly) to the input size here so it can be laid over the image.

A.2's average over the map is what makes Grad-CAM coarse (appendix A.4): one weight per
channel, so a defect a few pixels wide that lights a channel in one place is weighed
against that channel's gradient everywhere else. Two refinements, both optional:

  - LayerCAM (Jiang et al., IEEE TIP 2021) keeps the gradient per position:
    L^c_ij = ReLU(sum_k ReLU(dy^c / dA^k_ij) A^k_ij), and so works at a finer layer;
  - guided backpropagation (Springenberg et al. 2015, the "guided" of Guided Grad-CAM)
    lets only positive gradients back through the activations between the layer and the
    score, so evidence for the class is not cancelled by evidence against it on the way.

The gradient is taken from the layer onwards only: the features are computed (under any
grad mode, inference_mode included) and then copied into a fresh autograd graph, so
Grad-CAM works whatever mode the caller is in and never backpropagates through the trunk.

`class_activation` is the traceable core (no data-dependent Python checks), so the same
code runs in predict and, traced with its backward (anomalyqc.export.gradients), in the
ONNX export; `grad_cam` validates the classes first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

CamMethod = Literal["gradcam", "layercam"]
# activations whose backward guided backpropagation rectifies
_GUIDED = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.LeakyReLU)


def _rectify(_m: nn.Module, grad_in: tuple[torch.Tensor | None, ...],
             _grad_out: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor | None, ...]:
    return tuple(None if g is None else g.clamp_min(0) for g in grad_in)


@contextmanager
def guided_backprop(module: nn.Module) -> Iterator[None]:
    """Within the block, the gradient leaving every activation of `module` is clamped at
    zero (guided backpropagation); the module is left as it was afterwards."""
    acts = [m for m in module.modules() if isinstance(m, _GUIDED)]
    inplace = [getattr(m, "inplace", False) for m in acts]
    hooks = []
    try:
        for m in acts:
            if hasattr(m, "inplace"):
                m.inplace = False  # a backward hook cannot sit on an in-place op
            hooks.append(m.register_full_backward_hook(_rectify))
        yield
    finally:
        for h in hooks:
            h.remove()
        for m, flag in zip(acts, inplace, strict=True):
            if hasattr(m, "inplace"):
                m.inplace = flag


def class_activation(features: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                     choose: Callable[[torch.Tensor], torch.Tensor],
                     method: CamMethod = "gradcam", guided: nn.Module | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps (B, 1, h, w) >= 0 at the layer's size, logits (B, K)) of the layer's `features`
    (B, C, h, w); `choose` picks one class index per image from the (detached) logits, so
    the head runs once for both the class decision and its gradient. `method` "layercam"
    weighs each position by its own positive gradient; `guided` is the part of `head`
    whose activations get guided backpropagation (module docstring)."""
    if method not in ("gradcam", "layercam"):
        raise ValueError(f"grad_cam: method must be 'gradcam' or 'layercam', got {method!r}")
    guide = guided_backprop(guided) if guided is not None else _unguided()
    with torch.inference_mode(False), torch.enable_grad(), guide:
        # clone(): an inference tensor cannot enter a graph; the copy can.
        a = features.detach().clone().float().requires_grad_(True)
        logits = head(a)
        classes = choose(logits.detach())
        index = classes.to(logits.device, torch.long).view(-1, 1)
        y = logits.gather(1, index).sum()
        (grad,) = torch.autograd.grad(y, a)  # A.1; images are independent: one backward
        if method == "gradcam":
            alpha = grad.mean(dim=(2, 3), keepdim=True)  # A.2
        else:
            alpha = grad.clamp_min(0)  # LayerCAM: per position
        cam = F.relu((alpha * a).sum(dim=1, keepdim=True))  # A.3
    return cam.detach(), logits.detach()


def grad_cam(features: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
             classes: torch.Tensor, size: tuple[int, int] | None = None,
             method: CamMethod = "gradcam", guided: nn.Module | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps (B, 1, H, W) >= 0, logits (B, K)) of the layer's `features` (B, C, h, w),
    `head` mapping them to pre-softmax class scores, for one class index per image.

    `size` (H, W) upsamples the maps; None keeps the layer's h x w. `method` "layercam"
    weighs each position by its own positive gradient; `guided` is the part of `head`
    whose activations get guided backpropagation (module docstring)."""
    if classes.ndim != 1 or classes.shape[0] != features.shape[0]:
        raise ValueError(f"grad_cam: one class per image expected, got classes of shape "
                         f"{tuple(classes.shape)} for {features.shape[0]} images")

    def given(logits: torch.Tensor) -> torch.Tensor:
        k = logits.shape[1]
        if int(classes.min()) < 0 or int(classes.max()) >= k:
            raise ValueError(f"grad_cam: class indices must be in [0, {k}), got "
                             f"{classes.tolist()}")
        return classes.detach().clone()

    cam, logits = class_activation(features, head, given, method, guided)
    return upsample(cam, size), logits


def upsample(cam: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Maps (B, 1, h, w) bilinearly to `size` (None or the same size: unchanged)."""
    if size is not None and tuple(cam.shape[-2:]) != tuple(size):
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
    return cam


@contextmanager
def _unguided() -> Iterator[None]:
    yield


__all__ = ["CamMethod", "class_activation", "grad_cam", "guided_backprop", "upsample"]
