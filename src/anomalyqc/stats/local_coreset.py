"""Greedy k-center coreset (eq. 8.39) run at every grid location at once.

MhBC-PatchCore's alternative to cumulative K-Means (8.3.5.5.2): it needs every training
embedding in memory, which is why K-Means is the default.
"""

from __future__ import annotations

import torch

from anomalyqc.stats.kmeans import pairwise_sqdist


def local_farthest_points(z: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """z (P, N, D) -> indices (P, n) chosen by farthest-point sampling at each location."""
    p, total, d = z.shape
    n = min(n, total)
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(total, (p, 1), generator=g)
    chosen = [first]
    c = z.gather(1, first.unsqueeze(-1).expand(-1, -1, d))
    mind = pairwise_sqdist(z, c)[..., 0]
    for _ in range(1, n):
        nxt = mind.argmax(dim=1, keepdim=True)
        chosen.append(nxt)
        c = z.gather(1, nxt.unsqueeze(-1).expand(-1, -1, d))
        mind = torch.minimum(mind, pairwise_sqdist(z, c)[..., 0])
    return torch.cat(chosen, dim=1)
