"""Size and cost of a network: parameters and FLOPs per input (torch's own FLOP counter)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def flops_per_input(module: nn.Module, *inputs: torch.Tensor) -> float:
    """Forward FLOPs (a multiply-add counts 2) per sample, from one no-grad forward pass in
    eval mode over `inputs` (batch first). The module's mode is restored afterwards."""
    was_training = module.training
    module.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            module(*inputs)
    finally:
        module.train(was_training)
    return counter.get_total_flops() / inputs[0].shape[0]
