"""Device and precision choice for training."""

from __future__ import annotations

import torch

from anomalyqc.errors import ConfigError


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """"auto": this process's GPU when CUDA is present, else the CPU; or an explicit device."""
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"device {spec!r} is not a torch device; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r}: CUDA is not available here; use device=auto or cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        raise ConfigError(f"device {spec!r}: only cpu and cuda are supported")
    return device


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether to scale gradients). Mixed precision is for GPUs: on
    a CPU "auto" means fp32 and an explicit fp16/bf16 is refused."""
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return None, False
    if device.type != "cuda":
        raise ConfigError(f"precision={precision} (mixed precision) needs a GPU; on {device} use "
                          f"precision=fp32 or auto")
    if precision == "fp16":
        return torch.float16, True
    if precision == "bf16":
        return torch.bfloat16, False
    raise ConfigError(f"precision must be auto, fp32, fp16 or bf16, got {precision!r}")
