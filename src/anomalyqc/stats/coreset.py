"""Greedy k-center coreset (thesis eq. 8.39), exact, fast.

The textbook loop streams all N points once per new centre: N x n x d multiply-adds, memory
bound (one matrix-vector product per centre), and the reason the reference library spends most of
a PatchCore fit here. This implementation selects exactly the same points (up to float rounding
of near-ties) and touches far less data, by combining three exact devices:

1. Candidate batches. After bringing the distances of the farthest points up to date, the T
   largest of them (values >= v) are copied into a small candidate set; every other point has
   distance < v. Distances only shrink, so as long as the best candidate still has distance
   >= v it is the global argmax. Many centres (hundreds, early on) are chosen one after the
   other on the candidate set alone; the rest of the data is then updated once against the
   whole batch of new centres with a matrix-matrix product (compute bound, not memory bound).

2. Blocks. From time to time the points are permuted so that the points owned by the same
   centre are contiguous (a Voronoi partition with radius at most the current covering
   radius). For a block with centre g, radius r and largest point distance U, a new centre c
   can only lower a distance in the block if |c - g| < r + sqrt(U) (triangle inequality); the
   other centres are skipped without touching the block's points and without any gather.

3. Laziness. A block is only brought up to date when it may hold a candidate, i.e. when its
   bound U reaches the current threshold v. Blocks far from the frontier (the bulk of the
   redundant background patches late in the run) are not looked at for many batches.

Ties are broken like ``np.argmax`` over the original order (the lowest index wins), and points
already chosen are never chosen again (the argmax runs over D minus S): if the data has fewer
distinct points than n, the remaining picks are the lowest-indexed unchosen duplicates.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import numpy as np

try:  # a scikit-learn dependency, so normally present
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

__all__ = ["greedy_coreset", "naive_greedy_coreset"]

_CHUNK = 8192  # rows per matrix product, so the (rows x centres) distance tile stays in cache


def greedy_coreset(features: np.ndarray, n: int, seed: int = 0,
                   progress: Callable[[int], object] | None = None) -> np.ndarray:
    """Indices of n points chosen by farthest-point sampling, starting at a seeded random point.

    features: (N, d) float array (typically already randomly projected, eq. 8.34).
    progress: optional callback(done: int) called now and then with the number chosen so far.
    Returns int64 indices into features, in selection order.
    """
    return _greedy_coreset(features, n, seed, progress)


def _greedy_coreset(features: np.ndarray, n: int, seed: int = 0,
                    progress: Callable[[int], object] | None = None, *,
                    candidates: int = 1024, builds: tuple[int, ...] = (256, 2048),
                    stats: dict | None = None) -> np.ndarray:
    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D (N, d), got shape {x.shape}")
    total = x.shape[0]
    if n >= total:
        if progress is not None:
            progress(total)
        return np.arange(total, dtype=np.int64)
    if n < 1:
        raise ValueError("coreset size must be at least 1")
    first = int(np.random.default_rng(seed).integers(total))
    # Small matrix products dominate; BLAS threads cost more than they bring (and fight with
    # anything else running), so run BLAS single-threaded while selecting.
    limit = threadpool_limits(limits=1, user_api="blas") if threadpool_limits else nullcontext()
    with limit:
        sel = _Selector(x, n, first, candidates, builds, progress)
        chosen = sel.run()
    if stats is not None:
        stats.update(sel.stats)
    if progress is not None:
        progress(n)
    return chosen


class _Selector:
    def __init__(self, features, n, first, candidates, builds, progress):
        x = np.ascontiguousarray(features, dtype=np.float32)
        total, d = x.shape
        # Distances are translation invariant; centring keeps |x|^2 small next to the
        # distances, which makes |x|^2 - 2 x.c + |c|^2 accurate in float32.
        x = x - x.mean(axis=0, dtype=np.float64).astype(np.float32)
        self.x = x
        self.sq = np.einsum("ij,ij->i", x, x)
        self.perm = np.arange(total)                 # position -> original index
        self.n, self.total, self.d = n, total, d
        self.first = first
        self.T = max(8, int(candidates))
        self.build_at = sorted(b for b in builds if 1 < b < n)
        self.progress = progress
        self.C = np.empty((n, d), np.float32)        # centres (centred coordinates)
        self.Cm2 = np.empty((n, d), np.float32)      # -2 * centres
        self.csq = np.empty(n, np.float32)           # |c|^2
        self.chosen = np.empty(n, np.int64)
        self.mind = np.full(total, np.inf, np.float32)   # squared distance to nearest centre
        self.owner = np.zeros(total, np.int64)           # that centre (index into C)
        # blocks: contiguous ranges [bstart, bend) of positions
        self.bstart = np.zeros(1, np.int64)
        self.bend = np.full(1, total, np.int64)
        self.g = np.zeros(1, np.int64)               # block centre (index into C)
        self.r = np.full(1, np.inf, np.float32)      # block radius around its centre
        self.U = np.full(1, np.inf, np.float32)      # upper bound of mind in the block
        self.seen = np.zeros(1, np.int64)            # centres [0, seen) are accounted for
        self.stats = dict(batches=0, block_updates=0, pairs=0, gemm_flop=0, builds=0)

    # -- bookkeeping --------------------------------------------------------------------
    def _add(self, k: int, pos: int) -> None:
        c = self.x[pos]
        self.chosen[k] = self.perm[pos]
        self.C[k] = c
        self.Cm2[k] = -2.0 * c
        self.csq[k] = self.sq[pos]
        self.mind[pos] = -1.0          # chosen: never a candidate again
        self.owner[pos] = k

    def _update_blocks(self, blocks: np.ndarray, k: int) -> None:
        """Bring the given blocks up to date with centres [seen_b, k) (exact, pruned)."""
        self.stats["block_updates"] += blocks.size
        finite = np.isfinite(self.r[blocks])
        for b in blocks[~finite]:                     # the initial all-data block: no pruning
            self._apply(b, np.arange(self.seen[b], k))
        blocks = blocks[finite]
        if blocks.size:
            # Pruning test, vectorised per group of blocks with the same `seen`.
            lim = (self.r[blocks] + np.sqrt(np.maximum(self.U[blocks], 0.0))) * 1.001 + 1e-6
            lim2 = lim * lim
            seen = self.seen[blocks]
            order = np.argsort(seen, kind="stable")
            blocks, seen, lim2 = blocks[order], seen[order], lim2[order]
            starts = np.flatnonzero(np.r_[True, seen[1:] != seen[:-1]])
            ends = np.r_[starts[1:], blocks.size]
            for s0, s1 in zip(starts, ends):
                ks = int(seen[s0])
                gi = self.g[blocks[s0:s1]]
                # |g - c|^2 minus a rounding allowance of 1e-5 (|g|^2 + |c|^2): the expanded
                # form is off by about that much, and skipping must stay on the safe side
                dg2 = (self.C[gi] @ self.Cm2[ks:k].T)
                dg2 += (1.0 - 1e-5) * self.csq[ks:k]
                dg2 += (1.0 - 1e-5) * self.csq[gi][:, None]
                rows, cols = np.nonzero(dg2 < lim2[s0:s1, None])
                if rows.size == 0:
                    continue
                cols += ks
                cuts = np.flatnonzero(np.diff(rows)) + 1
                for rr, cc in zip(np.split(rows, cuts), np.split(cols, cuts)):
                    self._apply(blocks[s0 + rr[0]], cc)

    def _apply(self, b: int, rel: np.ndarray) -> None:
        """mind/owner of block b updated with centres rel; block marked up to date."""
        s, e = int(self.bstart[b]), int(self.bend[b])
        x, sq, mind, owner = self.x, self.sq, self.mind, self.owner
        CrT = self.Cm2[rel].T
        cq = self.csq[rel]
        for cs in range(s, e, _CHUNK):
            ce = min(cs + _CHUNK, e)
            D = x[cs:ce] @ CrT
            D += cq
            mn = D.min(axis=1)
            mn += sq[cs:ce]
            np.maximum(mn, 0.0, out=mn)    # rounding must not make it look like a chosen point
            mv = mind[cs:ce]
            upd = np.flatnonzero(mn < mv)
            if upd.size:
                mv[upd] = mn[upd]
                owner[cs + upd] = rel[D[upd].argmin(axis=1)]
        self.stats["pairs"] += rel.size
        self.stats["gemm_flop"] += 2 * (e - s) * self.d * rel.size

    def _rebuild(self, k: int) -> None:
        """Everything up to date, then regroup points by owner into contiguous blocks."""
        allb = np.arange(self.U.size)
        self._refresh(allb, k)
        p = np.argsort(self.owner, kind="stable")
        self.x = self.x[p]
        self.sq = self.sq[p]
        self.mind = self.mind[p]
        self.owner = self.owner[p]
        self.perm = self.perm[p]
        starts = np.flatnonzero(np.r_[True, self.owner[1:] != self.owner[:-1]])
        self.bstart = starts
        self.bend = np.r_[starts[1:], self.total]
        self.g = self.owner[starts]
        self.U = np.maximum.reduceat(self.mind, starts)
        self.r = np.sqrt(np.maximum(self.U, 0.0))
        self.seen = np.full(starts.size, k, np.int64)
        self.stats["builds"] += 1

    def _refresh(self, blocks: np.ndarray, k: int) -> None:
        stale = blocks[self.seen[blocks] < k]
        if stale.size:
            self._update_blocks(stale, k)
            self.seen[stale] = k
            # bounds of all blocks at once (stale values are upper bounds too)
            self.U = np.maximum.reduceat(self.mind, self.bstart)

    # -- main loop ----------------------------------------------------------------------
    def run(self) -> np.ndarray:
        n, T = self.n, self.T
        self._add(0, self.first)
        k = 1
        v_guess = -1.0          # first batch: refresh everything
        ratio = 0.5
        builds = list(self.build_at)
        while k < n:
            self.stats["batches"] += 1
            order = np.argsort(-self.U, kind="stable")
            neg_u = -self.U[order]     # snapshot: refreshing lowers U, the order must not move
            i = 0
            while True:
                j = int(np.searchsorted(neg_u, -v_guess, side="right"))
                if j > i:
                    self._refresh(order[i:j], k)
                    i = j
                if i >= order.size:
                    # Everything is up to date: any threshold is valid.
                    pool = self.mind[self.mind >= 0.0]
                    v = float(np.partition(pool, pool.size - T)[pool.size - T]) \
                        if pool.size > T else 0.0
                    break
                cand_count = int(np.count_nonzero(self.mind >= v_guess))
                if cand_count >= T // 4:
                    v = v_guess
                    break
                v_guess *= 0.7
            cand = np.flatnonzero(self.mind >= v)
            if cand.size > T:
                vals = self.mind[cand]
                v = max(v, float(np.partition(vals, cand.size - T)[cand.size - T]))
                cand = cand[vals >= v]
            cand = cand[np.argsort(self.perm[cand], kind="stable")]
            xc = self.x[cand]
            oc = self.owner[cand]
            # Exact (difference form) distance to the owning centre: |x|^2 - 2 x.c + |c|^2
            # loses a few digits, and the candidates' values decide the argmax.
            diff = xc - self.C[oc]
            mc = np.einsum("ij,ij->i", diff, diff)
            mc[self.mind[cand] < 0.0] = -1.0
            top = float(mc.max())
            kstart = k
            buf = np.empty_like(xc)
            alive = cand.size
            while k < n and mc.size:
                a = int(np.argmax(mc))
                if mc[a] < v or mc[a] < 0.0:
                    break
                self._add(k, int(cand[a]))
                np.subtract(xc, xc[a], out=buf)
                dd = np.einsum("ij,ij->i", buf, buf)
                upd = dd < mc
                mc[upd] = dd[upd]
                oc[upd] = k
                mc[a] = -1.0
                k += 1
                alive -= 1
                if alive < 0.5 * cand.size or (k - kstart) % 64 == 0:
                    # candidates below v can no longer be picked in this batch: drop them
                    keep = mc >= v
                    alive = int(np.count_nonzero(keep))
                    if alive < 0.75 * cand.size:
                        gone = ~keep
                        self.mind[cand[gone]] = mc[gone]
                        self.owner[cand[gone]] = oc[gone]
                        cand, xc, mc, oc = cand[keep], xc[keep], mc[keep], oc[keep]
                        buf = buf[:cand.size]
            self.mind[cand] = mc
            self.owner[cand] = oc
            # next threshold: the bound on what is left, scaled like this batch
            if top > 0:
                ratio = min(max(v / top, 0.05), 0.99)
            # every point's stored distance is an upper bound of its true one
            v_guess = max(float(self.mind.max()), 0.0) * ratio
            if self.progress is not None and k > kstart:
                self.progress(k)
            while builds and k >= builds[0]:
                builds.pop(0)
                if k < n:
                    self._rebuild(k)
        return self.chosen


def naive_greedy_coreset(features: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """The textbook loop (one pass over all points per centre), float64; a reference for tests."""
    x = np.asarray(features, dtype=np.float64)
    total = x.shape[0]
    if n >= total:
        return np.arange(total, dtype=np.int64)
    j = int(np.random.default_rng(seed).integers(total))
    out = np.empty(n, np.int64)
    out[0] = j
    mind = ((x - x[j]) ** 2).sum(1)
    mind[j] = -1.0
    for k in range(1, n):
        j = int(np.argmax(mind))
        out[k] = j
        np.minimum(mind, ((x - x[j]) ** 2).sum(1), out=mind)  # chosen ones stay at -1
        mind[j] = -1.0
    return out
