"""Sharded fits across processes (torchrun): each process fits a disjoint shard of the training
images, then the shards are combined with collectives and rank 0 holds the result.

    torchrun --nproc-per-node 2 -m anomalyqc.cli fit padim --data D --out RUN
    anomalyqc fit padim --data D --out RUN --nproc 2          # launches the line above

How the shards combine, per detector:

- PaDiM: the per-location moments are all-reduced (summed) after every process re-expresses
  its own about rank 0's shift, so the result is the one-process fit up to float rounding.
- MhBC-PatchCore (clustering="kmeans"): moments as PaDiM (exact); each shard's K-Means sums
  and counts are gathered and merged by `Mhbc.merge_clusters`, the same weighted re-clustering
  `anomalyqc merge` uses (K-Means has no exact merge, so centroids match a merge of runs fitted
  on the same shards, not a one-process fit).
- PatchCore: each shard keeps a local greedy coreset as large as the final bank (the
  composable-coreset scheme), then rank 0 takes a greedy coreset of their union. Approximate:
  see benchmarks/README.md, "Sharded fits", for how far it lands from the one-process bank.

A reduction (pca/srp) is fitted on rank 0's warm-up images and broadcast, so every shard
embeds in the same coordinates; it then differs from the one-process fit's reduction, which
saw the first images of the whole set.

Backend: gloo on CPU, NCCL when CUDA is available (tensors are moved to the process's GPU for
the collectives only; the models themselves run on the CPU).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist

from anomalyqc.errors import ConfigError
from anomalyqc.models.base import Detector
from anomalyqc.progress import Progress
from anomalyqc.stats.moments import OnlineMoments
from anomalyqc.types import Batch

if TYPE_CHECKING:
    from anomalyqc.models import Mhbc, Padim, Patchcore
    from anomalyqc.models.embedding import EmbeddingDetector

T = TypeVar("T")


def world_from_env() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) in a plain process."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise ConfigError(f"RANK/WORLD_SIZE are not integers ({exc}); launch with torchrun "
                          f"or `anomalyqc fit --nproc N`") from None


def init_from_env() -> bool:
    """Join the process group torchrun described; True when this call created it."""
    if dist.is_initialized():
        return False
    _, world = world_from_env()
    if world <= 1:
        return False
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ConfigError(f"WORLD_SIZE={world} but {var} is not set; launch with torchrun "
                              f"or `anomalyqc fit --nproc N`")
    backend = "gloo"
    if torch.cuda.is_available():
        backend = "nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """This process's disjoint, deterministic share: every world-th item from rank."""
    return list(items[rank::world])


# ---------------------------------------------------------------------- collectives
def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank src's values, in place on every rank."""
    dev = t.to(_device()).contiguous()
    dist.broadcast(dev, src)
    t.copy_(dev.cpu())
    return t


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place."""
    dev = t.to(_device()).contiguous()
    dist.all_reduce(dev)
    t.copy_(dev.cpu())
    return t


def all_gather_rows(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's tensor (same trailing shape, any number of rows), in rank order."""
    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64, device=_device()) for _ in range(world)]
    dist.all_gather(sizes, n.to(_device()))
    rows = [int(s.item()) for s in sizes]
    top = max(rows)
    padded = torch.zeros((top, *t.shape[1:]), dtype=t.dtype)
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded, device=_device()) for _ in range(world)]
    dist.all_gather(out, padded.to(_device()))
    return [o[:r].cpu() for o, r in zip(out, rows, strict=True)]


def all_reduce_moments(moments: OnlineMoments) -> OnlineMoments:
    """Sum every rank's moments in place: recentre about rank 0's shift, then add up."""
    shift = broadcast_(moments.shift.clone())
    moments.recentre(shift)
    count = all_reduce_(torch.tensor([moments.count], dtype=torch.float64))
    all_reduce_(moments.sum)
    all_reduce_(moments.packed)
    moments.count = int(round(float(count.item())))
    return moments


def broadcast_reduction(det: EmbeddingDetector) -> None:
    """Replace this rank's fitted reduction by rank 0's (EmbeddingDetector.reduction_sync)."""
    assert det.reduction_mean is not None and det.reduction_matrix is not None
    broadcast_(det.reduction_mean)
    broadcast_(det.reduction_matrix)


# ------------------------------------------------------------------------------ fits
def fit_sharded(det: Detector, batches: Iterable[Batch],
                progress: Progress | None = None) -> Detector:
    """Fit `det` on this process's batches, then combine with every other process's shard.

    Every rank must call it (it is a collective). On rank 0 the returned detector is the
    combined model, ready to save; other ranks hold their partial state. Only rank 0 reports
    progress, so N processes draw one set of bars.
    """
    from anomalyqc.models import Mhbc, Padim, Patchcore

    if not active():
        return det.fit(batches, progress=progress)
    if dist.get_rank() != 0:
        progress = None
    if not isinstance(det, Padim | Mhbc | Patchcore):
        raise ConfigError(f"{det.name} cannot be fitted across processes")
    if det.config.reduction != "none":
        det.reduction_sync = broadcast_reduction
    try:
        if isinstance(det, Padim):
            return _fit_padim(det, batches, progress)
        if isinstance(det, Mhbc):
            return _fit_mhbc(det, batches, progress)
        return _fit_patchcore(det, batches, progress)
    finally:
        det.reduction_sync = None


def _fit_padim(det: Padim, batches: Iterable[Batch], progress: Progress | None) -> Padim:
    det.fit(batches, progress=progress)
    assert det.moments is not None  # fit raises before leaving them unset
    all_reduce_moments(det.moments)
    return det.finalise() if dist.get_rank() == 0 else det


def _fit_mhbc(det: Mhbc, batches: Iterable[Batch], progress: Progress | None) -> Mhbc:
    if det.config.clustering != "kmeans":
        raise ConfigError("MhBC-PatchCore with clustering='coreset' keeps every embedding and "
                          "cannot be sharded; use clustering='kmeans' (the default) or --nproc 1")
    det.fit(batches, progress=progress)
    assert det.moments is not None and det.kmeans is not None  # set by a kmeans fit
    all_reduce_moments(det.moments)
    own_sums, own_counts = det.kmeans.fitted_state()
    sums = all_gather_rows(own_sums)
    counts = all_gather_rows(own_counts)
    if dist.get_rank() != 0:
        return det
    from anomalyqc.stats.kmeans import OnlineKMeans

    others = []
    for s, c in zip(sums[1:], counts[1:], strict=True):
        km = OnlineKMeans(det.kmeans.locations, det.kmeans.dim, det.kmeans.k)
        km.sums, km.counts = s, c
        others.append(km)
    return det.merge_clusters(others)


def _fit_patchcore(det: Patchcore, batches: Iterable[Batch],
                   progress: Progress | None) -> Patchcore:
    world = dist.get_world_size()
    ratio = det.config.coreset_ratio
    counted = _Counted(batches)
    # Local coresets as large as the final bank (ratio of all patches, about ratio * world of
    # this shard's): the union then holds a k-center solution of every shard.
    det.config.coreset_ratio = min(1.0, ratio * world)
    try:
        det.fit(counted, progress=progress)
    finally:
        det.config.coreset_ratio = ratio
    assert det.grid is not None and det.bank is not None  # set by fit
    h, w = det.grid
    total = int(all_reduce_(torch.tensor([counted.images * h * w], dtype=torch.float64)).item())
    banks = all_gather_rows(det.bank)
    if dist.get_rank() != 0:
        return det
    det.bank = torch.cat(banks)
    return det.merge(size=max(1, int(round(ratio * total))))


class _Counted:
    """Pass batches through, counting the images."""

    def __init__(self, batches: Iterable[Batch]) -> None:
        self.batches = batches
        self.images = 0

    def __iter__(self) -> Iterator[Batch]:
        for b in self.batches:
            self.images += len(b)
            yield b


def gather_floats(value: float) -> list[float]:
    """One number from every rank (e.g. peak RSS), in rank order."""
    if not active():
        return [value]
    return [float(t[0]) for t in all_gather_rows(torch.tensor([value], dtype=torch.float64))]
