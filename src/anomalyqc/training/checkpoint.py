"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint folder holds
- `state-<step>.safetensors`: network weights (`net.<name>.<param>`), optimizer tensors
  (`opt.<name>...`) and every process's random states (`rng.<rank>.<stream>`);
- `checkpoint.json`: the rest (optimizer scalars and param groups, scheduler, counters,
  early stopping, log position, the training config), naming the tensor file and its SHA-256;
- `best.safetensors`: the weights of the best validation epoch so far.

A save writes the new tensor file first and then replaces checkpoint.json (both atomically),
then deletes the older tensor files: a kill at any moment leaves a complete checkpoint.

Nested state (an optimizer's state_dict) is encoded as JSON with tensors replaced by
references into the tensor file: {"tensor": key}; dicts become {"dict": [[key, value], ...]}
(so integer keys survive) and tuples {"tuple": [...]}.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from anomalyqc.errors import ModelFileError
from anomalyqc.fileio import atomic_path, atomic_write_json, file_sha256

FORMAT = 1
POINTER = "checkpoint.json"
BEST = "best.safetensors"


# ------------------------------------------------------------------ nested state <-> JSON
def encode(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of obj; its tensors go into `tensors` under keys starting with prefix."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().clone().contiguous()
        return {"tensor": prefix}
    if isinstance(obj, dict):
        return {"dict": [[k, encode(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"tuple": [encode(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a checkpoint")


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "tensor" in obj:
            return tensors[obj["tensor"]]
        if "tuple" in obj:
            return tuple(decode(v, tensors) for v in obj["tuple"])
        return {k: decode(v, tensors) for k, v in obj["dict"]}
    return obj


# ------------------------------------------------------------------------ random states
def rng_tensors() -> dict[str, torch.Tensor]:
    """This process's global random states (torch CPU/CUDA, numpy, python) as tensors."""
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda_{i}"] = s
    _, keys, pos, has_gauss, cached = np.random.get_state()
    out["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    out["numpy_rest"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
    out["numpy_gauss"] = torch.tensor([cached], dtype=torch.float64)
    version, internal, gauss_next = random.getstate()
    out["python"] = torch.tensor([version, *internal], dtype=torch.int64)
    out["python_gauss"] = torch.tensor([np.nan if gauss_next is None else gauss_next],
                                       dtype=torch.float64)
    return out


def restore_rng(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    cuda = sorted((k for k in state if k.startswith("cuda_")), key=lambda k: int(k[5:]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state[k] for k in cuda][: torch.cuda.device_count()])
    pos, has_gauss = (int(v) for v in state["numpy_rest"].tolist())
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                         float(state["numpy_gauss"][0])))
    py = [int(v) for v in state["python"].tolist()]
    gauss = float(state["python_gauss"][0])
    random.setstate((py[0], tuple(py[1:]), None if np.isnan(gauss) else gauss))


def rng_to_bytes(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The random states as one uint8 tensor (safetensors bytes), to gather across ranks."""
    from safetensors.torch import save

    return torch.frombuffer(bytearray(save(state)), dtype=torch.uint8)


def rng_from_bytes(data: torch.Tensor) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(bytes(data.numpy().tobytes()))


# ---------------------------------------------------------------------------- save/load
def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors refuses tensors sharing memory (tied weights): each is its own copy."""
    own = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(own, str(tmp))


def save_checkpoint(folder: Path, step: int, tensors: dict[str, torch.Tensor],
                    meta: dict[str, Any]) -> Path:
    """Write a complete checkpoint (see the module docstring); returns the pointer file."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"state-{step:09d}.safetensors"
    save_tensors(folder / name, tensors)
    pointer = folder / POINTER
    atomic_write_json(pointer, {**meta, "format": FORMAT, "tensors": name,
                                "sha256": file_sha256(folder / name)})
    for old in folder.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return pointer


def has_checkpoint(folder: Path) -> bool:
    return (folder / POINTER).is_file()


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of the checkpoint in folder; ModelFileError when it is damaged."""
    pointer = folder / POINTER
    try:
        meta = json.loads(pointer.read_text())
        tensor_file = folder / meta["tensors"]
        if meta.get("format") != FORMAT:
            raise ModelFileError(f"{pointer}: checkpoint format {meta.get('format')} is not "
                                 f"{FORMAT}; start a new run in another folder")
        if file_sha256(tensor_file) != meta["sha256"]:
            raise ModelFileError(f"{tensor_file}: does not match its SHA-256 in {pointer}; the "
                                 f"checkpoint is damaged, start a new run in another folder")
        return load_file(str(tensor_file)), meta
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{pointer}: unreadable checkpoint ({exc}); start a new run in "
                             f"another folder") from None


def load_best(folder: Path) -> dict[str, torch.Tensor] | None:
    path = folder / BEST
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: unreadable best weights ({exc}); delete it to resume "
                             f"without them") from None
