"""Which images each step sees: a pure function of (seed, epoch, step, rank).

The train/validation split, every epoch's order and every step's random streams are derived
from the run's seed, never from a global random state, so a run resumed mid-epoch skips the
batches already done and sees exactly what the uninterrupted run saw next. With several
processes the epoch's permutation is the same everywhere and each rank takes every
world-th index (padded by wrapping so all ranks take the same number of steps).
"""

from __future__ import annotations

import random

import numpy as np
import torch

from anomalyqc.errors import DataError

# Stream tags keep the derived seeds of different uses apart.
SPLIT, ORDER, AUGMENT, STEP, LOADER, VALIDATE, GLOBAL = 1, 2, 3, 4, 5, 6, 7


def derived_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (numpy's SeedSequence: nearby inputs give unrelated
    outputs, unlike seed + epoch)."""
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31 | int(words[1]) >> 1) & (2**63 - 1)


def seed_everything(seed: int) -> None:
    """Seed the global generators (torch, numpy, python) that networks draw from (dropout):
    a new run starts from its own seed, whatever ran before in the process."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def generator(*parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derived_seed(*parts))


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, validation) split of range(n); validation gets round(n * fraction)
    images, at least one when the fraction is positive."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"the validation fraction must be in [0, 1), got {val_fraction}")
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    if n - n_val < 1:
        raise DataError(f"{n} training images cannot be split into training and validation "
                        f"(fraction {val_fraction}); add images or set val_fraction=0")
    perm = torch.randperm(n, generator=generator(seed, SPLIT)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def epoch_batches(indices: list[int], batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world: int = 1, drop_last: bool = False) -> list[list[int]]:
    """This rank's batches of dataset indices for one epoch."""
    if not indices:
        raise DataError("no training images")
    order = torch.randperm(len(indices), generator=generator(seed, ORDER, epoch)).tolist()
    perm = [indices[i] for i in order]
    per_rank = -(-len(perm) // world)
    perm = (perm * (-(-per_rank * world // len(perm))))[: per_rank * world]
    mine = perm[rank::world]
    batches = [mine[i: i + batch_size] for i in range(0, len(mine), batch_size)]
    if drop_last and len(batches[-1]) < batch_size:
        batches.pop()
    if not batches:
        raise DataError(f"{len(indices)} training images give no full batch of {batch_size} "
                        f"per process; lower the batch size or set drop_last=False")
    return batches
