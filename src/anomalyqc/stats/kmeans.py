"""Cumulative (online, mini-batch) K-Means run for every grid location at once (thesis 8.3.5.5.1).

State per location: K running sums and counts, so a centroid is the exact mean of the points
assigned to it and the memory does not depend on how many points were seen. All P locations
are updated together with batched tensor ops, not one model per location.

Assignments are made in a metric given by a (P, D, D) Cholesky factor L (Mahalanobis, i.e.
Euclidean after whitening) or in plain Euclidean space when no factor is given. Because the
centroid of whitened points is the whitened centroid, sums are kept in the original space
and can be whitened with whatever factor is final.
"""

from __future__ import annotations

import torch

from anomalyqc.stats.whitening import whiten

_INIT_BLOCK = 256  # locations seeded together


def _transform(x: torch.Tensor, mean: torch.Tensor | None, chol: torch.Tensor | None) -> torch.Tensor:
    x = x.float()
    if chol is None:
        return x
    assert mean is not None, "a Cholesky factor comes with its mean"
    return whiten(x, mean.float(), chol.float())


def pairwise_sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared distances between (P, N, D) and (P, K, D) -> (P, N, K), clipped at zero."""
    d = (a * a).sum(-1, keepdim=True) - 2 * (a @ b.transpose(1, 2)) + (b * b).sum(-1).unsqueeze(1)
    return d.clamp_min_(0)


def kmeans_plus_plus(z: torch.Tensor, k: int, generator: torch.Generator,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """k-means++ seeding for every location: z (P, N, D) -> indices (P, k)."""
    p, n, d = z.shape
    w = torch.ones(p, n, dtype=z.dtype) if weights is None else weights.to(z.dtype)
    # |z|^2 once: a per-centre (P, N, D) temporary, k times over, fragments the heap until
    # the process holds gigabytes (k in the thousands for PatchCore's K-Means bank).
    z_sq = (z * z).sum(-1, keepdim=True)  # (P, N, 1)

    def sqdist_to(idx: torch.Tensor) -> torch.Tensor:  # idx (P, 1) -> (P, N)
        c = z.gather(1, idx.unsqueeze(-1).expand(-1, -1, d))  # (P, 1, D)
        dist = z_sq - 2 * (z @ c.transpose(1, 2)) + (c * c).sum(-1).unsqueeze(1)
        return dist.clamp_min_(0)[..., 0]

    first = torch.multinomial(w, 1, generator=generator)  # (P, 1)
    chosen = [first]
    mind = sqdist_to(first)
    for _ in range(1, k):
        prob = (mind * w).clamp_min(0)
        prob = torch.where(prob.sum(1, keepdim=True) > 0, prob, w)  # all points coincide
        nxt = torch.multinomial(prob, 1, generator=generator)
        chosen.append(nxt)
        torch.minimum(mind, sqdist_to(nxt), out=mind)
    return torch.cat(chosen, dim=1)


def lloyd(x: torch.Tensor, centres: torch.Tensor, iters: int, mean: torch.Tensor | None = None,
          chol: torch.Tensor | None = None, weights: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched weighted Lloyd iterations in the original space with the given metric.

    x: (P, N, D), centres: (P, K, D). Returns (sums (P, K, D), counts (P, K)) of the final
    assignment; an empty cluster keeps its previous centre with zero weight.
    """
    p, n, d = x.shape
    k = centres.shape[1]
    acc = torch.float64
    w = torch.ones(p, n, dtype=acc) if weights is None else weights.to(acc)
    zx = _transform(x, mean, chol)
    zx_sq = (zx * zx).sum(-1, keepdim=True)  # once, not per iteration
    xw = x.to(acc) * w.unsqueeze(-1)
    # Buffers reused across iterations: fewer large temporaries, less allocator churn.
    sums = torch.zeros(p, k, d, dtype=acc)
    counts = torch.zeros(p, k, dtype=acc)
    centres = centres.to(acc).clone()
    for _ in range(max(1, iters)):
        zc = _transform(centres, mean, chol)
        dist = torch.baddbmm(zx_sq, zx, zc.transpose(1, 2), alpha=-2.0)
        dist += (zc * zc).sum(-1).unsqueeze(1)
        assign = dist.argmin(-1)  # (P, N)
        del dist, zc
        sums.zero_().scatter_add_(1, assign.unsqueeze(-1).expand(-1, -1, d), xw)
        counts.zero_().scatter_add_(1, assign, w)
        filled = (counts > 0).unsqueeze(-1)
        torch.where(filled, sums / counts.clamp_min(1e-12).unsqueeze(-1), centres, out=centres)
    return sums, counts


class OnlineKMeans:
    """K centroids at each of P locations, updated batch by batch.

    The first `init_size` points per location are buffered (memory bounded by init_size) and
    seeded with k-means++ plus a few Lloyd iterations; later batches are assigned to the
    nearest centroid and folded into its running mean (Sculley's mini-batch K-Means with
    per-centroid learning rate 1/count, which is exactly a cumulative mean).
    """

    def __init__(self, locations: int, dim: int, k: int, init_size: int | None = None,
                 seed: int = 0, lloyd_iters: int = 10) -> None:
        if k < 1:
            raise ValueError("number of clusters must be at least 1")
        self.k = k
        self.locations = locations
        self.dim = dim
        self.init_size = max(k, init_size or 4 * k)
        self.lloyd_iters = lloyd_iters
        self.generator = torch.Generator().manual_seed(seed)
        self.sums: torch.Tensor | None = None  # (P, K, D) float64
        self.counts: torch.Tensor | None = None  # (P, K) float64
        self._buffer: list[torch.Tensor] = []
        self._buffered = 0

    @property
    def buffered(self) -> int:
        """Points per location waiting for the seeding (0 once initialised)."""
        return self._buffered if not self.initialised else 0

    @property
    def initialised(self) -> bool:
        return self.sums is not None

    def update(self, x: torch.Tensor, mean: torch.Tensor | None = None,
               chol: torch.Tensor | None = None) -> None:
        """Add embeddings x (B, P, D); mean/chol give the current metric (None = Euclidean)."""
        x = x.float().transpose(0, 1)  # (P, B, D); sums are kept in float64
        if not self.initialised:
            self._buffer.append(x)
            self._buffered += x.shape[1]
            if self._buffered >= self.init_size:
                self.finish_init(mean, chol)
            return
        sums, counts = self.fitted_state()
        zc = _transform(self.centroids(), mean, chol)
        assign = pairwise_sqdist(_transform(x, mean, chol), zc).argmin(-1)  # (P, B)
        sums.scatter_add_(1, assign.unsqueeze(-1).expand(-1, -1, self.dim), x.double())
        counts.scatter_add_(1, assign, torch.ones_like(assign, dtype=counts.dtype))

    def finish_init(self, mean: torch.Tensor | None = None, chol: torch.Tensor | None = None) -> None:
        """Seed and refine the centroids on the buffered points (also called at end of fit)."""
        if self.initialised or not self._buffer:
            return
        x = torch.cat(self._buffer, dim=1)
        self._buffer = []
        k = min(self.k, x.shape[1])
        sums = torch.empty(self.locations, k, self.dim, dtype=torch.float64)
        counts = torch.empty(self.locations, k, dtype=torch.float64)
        # Locations are independent: seed them a block at a time, so the temporaries stay
        # a fraction of the buffer's size.
        for start in range(0, self.locations, _INIT_BLOCK):
            sel = slice(start, start + _INIT_BLOCK)
            m = None if mean is None else (mean if mean.shape[0] == 1 else mean[sel])
            c = None if chol is None else (chol if chol.shape[0] == 1 else chol[sel])
            xb = x[sel]
            idx = kmeans_plus_plus(_transform(xb, m, c), k, self.generator)
            centres = xb.gather(1, idx.unsqueeze(-1).expand(-1, -1, self.dim)).double()
            sums[sel], counts[sel] = lloyd(xb, centres, self.lloyd_iters, m, c)
        del x
        if k < self.k:  # fewer points than clusters so far: pad with empty clusters
            pad = self.k - k
            sums = torch.cat([sums, sums[:, :1].expand(-1, pad, -1) * 0], dim=1)
            counts = torch.cat([counts, torch.zeros(self.locations, pad, dtype=counts.dtype)], 1)
        self.sums, self.counts = sums, counts

    def fitted_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sums, counts), which exist once the centroids are seeded."""
        if self.sums is None or self.counts is None:
            raise ValueError("K-Means has no clusters yet: it has seen no points")
        return self.sums, self.counts

    def centroids(self) -> torch.Tensor:
        """(P, K, D) centroids in the original space; empty clusters are NaN-free zeros."""
        sums, counts = self.fitted_state()
        return sums / counts.clamp_min(1e-12).unsqueeze(-1)

    def merge(self, other: OnlineKMeans, mean: torch.Tensor | None = None,
              chol: torch.Tensor | None = None, iters: int = 10) -> OnlineKMeans:
        """Fold another shard's clusters in: weighted K-Means over both sets of centroids.

        Unlike moments this is not exact (K-Means has no exact merge); it is the standard
        weighted re-clustering of the 2K weighted centroids.
        """
        return self.merge_all([other], mean, chol, iters)

    def merge_all(self, others: list[OnlineKMeans], mean: torch.Tensor | None = None,
                  chol: torch.Tensor | None = None, iters: int = 10) -> OnlineKMeans:
        """Fold any number of shards in at once: one weighted K-Means over all (1 + S) K
        centroids, started from the K heaviest (for one other shard, exactly `merge`).

        Doing it at once rather than pairwise makes the result independent of the order in
        which shards arrive, up to ties in the starting weights.
        """
        self.finish_init(mean, chol)
        sums, counts = self.fitted_state()
        weights = [counts]
        for other in others:
            other.finish_init(mean, chol)
            if other.sums is None or other.sums.shape != sums.shape:
                raise ValueError("cannot merge K-Means states of different shapes")
            weights.append(other.fitted_state()[1])
        x = torch.cat([self.centroids(), *(o.centroids() for o in others)], dim=1)
        w = torch.cat(weights, dim=1)
        order = w.argsort(dim=1, descending=True, stable=True)[:, : self.k]
        start = x.gather(1, order.unsqueeze(-1).expand(-1, -1, self.dim))
        self.sums, self.counts = lloyd(x, start, iters, mean, chol, weights=w)
        return self

    def state(self, prefix: str = "kmeans") -> dict[str, torch.Tensor]:
        """Running sums and counts: what a later merge needs (call finish_init first)."""
        sums, counts = self.fitted_state()
        return {f"{prefix}.sums": sums, f"{prefix}.counts": counts}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], prefix: str = "kmeans",
                   seed: int = 0) -> OnlineKMeans:
        sums, counts = tensors[f"{prefix}.sums"], tensors[f"{prefix}.counts"]
        if sums.ndim != 3 or counts.shape != sums.shape[:2]:
            raise ValueError(f"{prefix}.sums {tuple(sums.shape)} and {prefix}.counts "
                             f"{tuple(counts.shape)} disagree")
        p, k, d = sums.shape
        out = cls(p, d, k, seed=seed)
        out.sums, out.counts = sums.double().clone(), counts.double().clone()
        return out
