"""Greedy k-center coreset (thesis eq. 8.39), exact, with triangle-inequality pruning.

The textbook loop recomputes the distance from every point to each new centre: N x n x d work,
which is why the reference library spends most of a PatchCore fit here. We keep, for every
point, its nearest centre so far; a new centre c can only capture points of a centre a with
d(c, a) < 2 * radius(a), where radius(a) bounds the distance of a's points to a. Only those
points are looked at. The selection is identical to the plain algorithm; late iterations,
when clusters are small, touch a small fraction of the data.
"""

from __future__ import annotations

import numpy as np


def greedy_coreset(features: np.ndarray, n: int, seed: int = 0,
                   progress: "callable | None" = None) -> np.ndarray:
    """Indices of n points chosen by farthest-point sampling, starting at a seeded random point.

    features: (N, d) float32 (typically already randomly projected, eq. 8.34).
    progress: optional callback(done: int) called now and then.
    """
    x = np.ascontiguousarray(features, dtype=np.float32)
    total = x.shape[0]
    if n >= total:
        return np.arange(total)
    if n < 1:
        raise ValueError("coreset size must be at least 1")
    sqnorm = np.einsum("ij,ij->i", x, x)
    chosen = np.empty(n, dtype=np.int64)
    centres = np.empty((n, x.shape[1]), dtype=np.float32)
    radius = np.empty(n, dtype=np.float32)  # upper bound on distance of a centre's points

    first = int(np.random.default_rng(seed).integers(total))
    chosen[0] = first
    centres[0] = x[first]
    mind = _sqdist(x, sqnorm, x[first])  # squared distance to nearest centre
    owner = np.zeros(total, dtype=np.int32)
    radius[0] = np.sqrt(mind.max())

    for k in range(1, n):
        j = int(np.argmax(mind))
        c = x[j]
        chosen[k] = j
        centres[k] = c
        dc = np.sqrt(np.maximum(_sqdist(centres[:k], None, c), 0.0))
        candidate_owner = dc < 2.0 * radius[:k]
        idx = np.flatnonzero(candidate_owner[owner])
        d_new = _sqdist(x[idx], sqnorm[idx], c)
        closer = d_new < mind[idx]
        moved = idx[closer]
        mind[moved] = d_new[closer]
        owner[moved] = k
        mind[j] = 0.0
        owner[j] = k
        radius[k] = np.sqrt(mind[moved].max()) if moved.size else 0.0
        if progress is not None and k % 256 == 0:
            progress(k)
    if progress is not None:
        progress(n)
    return chosen


def _sqdist(x: np.ndarray, sqnorm: np.ndarray | None, c: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances from the rows of x to one point c, clipped at zero."""
    if sqnorm is None:
        diff = x - c
        return np.einsum("ij,ij->i", diff, diff)
    d = sqnorm - 2.0 * (x @ c) + float(c @ c)
    np.maximum(d, 0.0, out=d)
    return d
