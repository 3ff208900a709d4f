"""A module whose forward takes a gradient (torch.autograd.grad, e.g. Grad-CAM's A.1) as a
graph of forward ops, so it exports to ONNX, which has no autograd.

torch.export cannot trace an autograd.grad call inside forward; make_fx can: it runs the
forward and the autograd engine on fake tensors and records every aten op the backward
runs, batch size symbolic. The backward ops are then written with forward ops:

  - torch's own decompositions of the activation/normalisation backwards (ReLU, ReLU6,
    hardswish, hardsigmoid, SiLU, sigmoid, eval-mode batch norm, padding, slicing, ...),
  - convolution_backward, input gradient only (the weights' gradients are never needed):
    the transposed convolution with the same weight, stride, padding, dilation and groups,
    with the output padding that restores the input's size.

A backward op left over after that (a module whose gradient torch cannot decompose, e.g.
adaptive max pooling) is refused by name, with the module types it differentiates, before
the ONNX exporter sees it. What is decomposed is checked numerically anyway: export_run
compares ONNX Runtime with the torch model and refuses a disagreement.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from anomalyqc.errors import ConfigError

aten = torch.ops.aten


def _convolution_backward(grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                          bias_sizes: Any, stride: Sequence[int], padding: Sequence[int],
                          dilation: Sequence[int], transposed: bool, output_padding: Any,
                          groups: int, output_mask: Sequence[bool]) -> Any:
    """d conv2d / d input as conv_transpose2d; NotImplemented (the op stays, and is refused)
    for what that does not cover: weight or bias gradients, transposed or non-2-D convs."""
    if transposed or output_mask[1] or output_mask[2] or input.dim() != 4:
        return NotImplemented
    k = weight.shape[-2:]
    # conv_transpose2d maps size o to (o - 1) s - 2 p + d (k - 1) + 1; a strided conv
    # dropped up to s - 1 input rows, given back as output padding
    extra = [int(input.shape[2 + i]) - ((int(grad_output.shape[2 + i]) - 1) * stride[i]
                                        - 2 * padding[i] + dilation[i] * (int(k[i]) - 1) + 1)
             for i in range(2)]
    grad_input = F.conv_transpose2d(grad_output, weight, None, list(stride), list(padding),
                                    extra, groups, list(dilation))
    return grad_input, None, None


def backward_decompositions() -> dict[Any, Callable[..., Any]]:
    """aten backward op -> its decomposition into forward ops."""
    from torch._decomp import decomposition_table

    table: dict[Any, Callable[..., Any]] = {
        op: fn for op, fn in decomposition_table.items()
        if "backward" in str(op) and str(op).endswith(".default")}
    table[aten.convolution_backward.default] = _convolution_backward
    return table


def _modules_running(module: nn.Module, example: torch.Tensor) -> dict[str, set[str]]:
    """aten op name -> the types of the innermost modules that call it in module(example)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    stack: list[str] = []
    seen: dict[str, set[str]] = {}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            if stack:
                seen.setdefault(func.overloadpacket.__name__, set()).add(stack[-1])
            return func(*args, **(kwargs or {}))

    def enter(m: nn.Module, _: Any) -> None:
        stack.append(type(m).__name__)

    def leave(m: nn.Module, _: Any, __: Any) -> None:
        stack.pop()

    hooks = [h for m in module.modules()
             for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.no_grad(), Record():
            module(example)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _describe(ops: list[str], module: nn.Module, example: torch.Tensor) -> str:
    """The backward ops, each with the module types whose forward op it differentiates."""
    try:
        running = _modules_running(module, example)
    except Exception:  # naming the modules is a courtesy; the ops are named regardless
        running = {}
    out = []
    for op in ops:
        forward = op.split(".")[1].removesuffix("_backward") if op.count(".") >= 1 else op
        mods = sorted(running.get(forward, ()))
        out.append(f"{op} (the gradient of {', '.join(mods)})" if mods else op)
    return ", ".join(out)


def trace_with_gradients(module: nn.Module, example: torch.Tensor, what: str) -> fx.GraphModule:
    """`module` (its forward may call torch.autograd.grad) as a GraphModule of forward aten
    ops, batch size symbolic, for torch.onnx.export; ConfigError naming the backward ops
    (and their modules) that have no forward form. `what` names the model in messages.

    The module is copied with its parameters frozen, so no weight gradient is traced and
    the caller's model is left as it was."""
    from torch.fx.experimental.proxy_tensor import make_fx

    frozen = copy.deepcopy(module).cpu().eval().requires_grad_(False)
    with torch.no_grad():
        gm = make_fx(frozen, tracing_mode="symbolic", decomposition_table=backward_decompositions(),
                     _allow_non_fake_inputs=True)(example.cpu())
    left = sorted({str(n.target) for n in gm.graph.nodes
                   if n.op == "call_function" and "backward" in str(n.target)})
    if left:
        found = _describe(left, frozen, example.cpu())
        raise ConfigError(
            f"{what}: its gradient passes through ops that cannot be written in ONNX here: "
            f"{found}. Export a model whose layers after the Grad-CAM layer are convolutions, "
            f"batch norm, ReLU/ReLU6/hardswish/SiLU/sigmoid activations, residual additions "
            f"and average pooling (the trunks anomalyqc builds), or run it with the torch runtime")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


__all__ = ["backward_decompositions", "trace_with_gradients"]
