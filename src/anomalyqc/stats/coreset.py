"""Greedy k-center coreset (thesis eq. 8.39), exact and fast.

The textbook loop streams all N points once per new centre: N x n x d multiply-adds as n
matrix-vector products, memory bound, and the reason the reference library spends most of a
PatchCore fit here. This implementation picks exactly the same points (up to float rounding of
near-ties) and touches far less data, by combining three exact devices:

1. Candidate batches. The points with the T largest distances to the centres (all values >= v)
   are copied into a small candidate set; every other point is below v. Distances only shrink,
   so while the best candidate is still >= v it is the global argmax: many centres in a row
   (hundreds early on) are picked on the candidate set alone. The rest of the data is then
   updated once against the whole batch of new centres with matrix-matrix products (compute
   bound, not memory bound).

2. Blocks. From time to time the points are permuted so that the points owned by the same
   centre are contiguous (a Voronoi partition whose radius is at most the covering radius at
   that time). For a block with centre g, radius r and largest point distance U, a new centre c
   can only lower a distance in the block if |c - g| < r + sqrt(U) (triangle inequality); other
   centres are skipped without touching the block's points and without gathering anything.
   Points are stored relative to their block centre, which keeps the expanded form
   |x|^2 - 2 x.c + |c|^2 accurate in float32 (distances are small next to |x|^2 otherwise).

3. Laziness. A block is only brought up to date when it may hold a candidate, i.e. when its
   bound U reaches the threshold v. Blocks far from the frontier (the bulk of the redundant
   background patches, late in the run) are not touched for many batches.

Ties are broken as ``np.argmax`` breaks them in the original order (the lowest index wins), and
points already chosen are never chosen again (the argmax runs over D minus S): when the data
has fewer distinct points than n, the last picks are the lowest-indexed unchosen duplicates.
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

_CHUNK = 8192  # rows per matrix product: the (rows x centres) tile stays in cache
_ALLOW = 1e-5  # relative rounding allowance of the float32 centre-to-block-centre distances


def greedy_coreset(features: np.ndarray, n: int, seed: int = 0,
                   progress: Callable[[int], object] | None = None) -> np.ndarray:
    """Indices of n points chosen by farthest-point sampling, starting at a seeded random point.

    features: (N, d) float array (typically already randomly projected, eq. 8.34); the
    distances are computed in float32.
    progress: optional callback(done: int) called now and then with the number chosen so far.
    Returns int64 indices into features, in selection order (all of them if n >= N).
    """
    return _greedy_coreset(features, n, seed, progress)


def _greedy_coreset(features: np.ndarray, n: int, seed: int = 0,
                    progress: Callable[[int], object] | None = None, *,
                    candidates: int = 1024, builds: tuple[int, ...] = (32, 256, 2048),
                    stats: dict | None = None) -> np.ndarray:
    """greedy_coreset with the tuning knobs: candidate set size T, and the numbers of chosen
    centres at which the points are regrouped into blocks."""
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
    # Many small matrix products: BLAS threads cost more than they bring (and fight with
    # anything else running on the machine), so BLAS runs single-threaded while selecting.
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
    """State of one selection. Positions index the permuted point arrays; `perm` maps a
    position to the original index. Centres are numbered 0..n-1 in selection order."""

    def __init__(self, features: np.ndarray, n: int, first: int, candidates: int,
                 builds: tuple[int, ...], progress: Callable[[int], object] | None) -> None:
        x0 = np.ascontiguousarray(features, dtype=np.float32)  # exact coordinates, by index
        total, d = x0.shape
        self.x0 = x0
        self.n, self.total, self.d = n, total, d
        self.first = first
        self.T = max(8, int(candidates))
        self.build_at = sorted(b for b in builds if 1 < b < n)
        self.progress = progress
        self.perm = np.arange(total)
        self.C = np.empty((n, d), np.float32)        # centres, exact coordinates
        mean = x0.mean(axis=0, dtype=np.float64).astype(np.float32)
        self.mean = mean
        self.Cc = np.empty((n, d), np.float32)       # centres minus the data mean (pruning test)
        self.ccsq = np.empty(n, np.float32)          # |Cc|^2
        self.chosen = np.empty(n, np.int64)
        self.mind = np.full(total, np.inf, np.float32)   # squared distance to nearest centre
        self.owner = np.zeros(total, np.int64)           # that centre
        # Blocks: contiguous position ranges. One block of everything to start with, stored
        # relative to the first centre (a data point: integer data stays exact) and not pruned.
        self.xl = x0 - x0[first]                     # point minus its block's origin
        self.sql = np.einsum("ij,ij->i", self.xl, self.xl)
        self.bstart = np.zeros(1, np.int64)
        self.bend = np.full(1, total, np.int64)
        self.origin = x0[first][None, :].copy()      # per block
        self.g = np.zeros(1, np.int64)               # block centre (a centre's number)
        self.r = np.full(1, np.inf, np.float32)      # radius of the block around g
        self.U = np.full(1, np.inf, np.float32)      # upper bound of mind in the block
        self.seen = np.zeros(1, np.int64)            # centres [0, seen) are accounted for
        self.stats = dict(batches=0, block_updates=0, pairs=0, gemm_flop=0, builds=0)

    # -- bookkeeping --------------------------------------------------------------------
    def _add(self, k: int, pos: int) -> None:
        i = self.perm[pos]
        self.chosen[k] = i
        c = self.x0[i]
        self.C[k] = c
        cc = c - self.mean
        self.Cc[k] = cc
        self.ccsq[k] = cc @ cc
        self.mind[pos] = -1.0          # chosen: never a candidate again
        self.owner[pos] = k

    def _refresh(self, blocks: np.ndarray, k: int) -> None:
        """Bring the given blocks up to date with all centres [0, k), then re-bound all blocks."""
        blocks = blocks[self.seen[blocks] < k]
        if blocks.size == 0:
            return
        self.stats["block_updates"] += blocks.size
        finite = np.isfinite(self.r[blocks])
        for b in blocks[~finite]:                     # the initial all-data block: no pruning
            self._apply(int(b), np.arange(self.seen[b], k))
        pruned = blocks[finite]
        if pruned.size:
            # A centre c matters to block b only if |c - g| < r + sqrt(U); tested per group of
            # blocks that have seen the same centres, as one matrix product per group.
            lim = (self.r[pruned] + np.sqrt(np.maximum(self.U[pruned], 0.0))) * 1.001 + 1e-12
            lim2 = lim * lim
            seen = self.seen[pruned]
            order = np.argsort(seen, kind="stable")
            pruned, seen, lim2 = pruned[order], seen[order], lim2[order]
            starts = np.flatnonzero(np.r_[True, seen[1:] != seen[:-1]])
            ends = np.r_[starts[1:], pruned.size]
            for s0, s1 in zip(starts, ends):
                ks = int(seen[s0])
                gi = self.g[pruned[s0:s1]]
                # |g - c|^2 less a rounding allowance, so that skipping stays on the safe side
                dg2 = self.Cc[gi] @ (-2.0 * self.Cc[ks:k]).T
                dg2 += (1.0 - _ALLOW) * self.ccsq[ks:k]
                dg2 += (1.0 - _ALLOW) * self.ccsq[gi][:, None]
                rows, cols = np.nonzero(dg2 < lim2[s0:s1, None])
                if rows.size == 0:
                    continue
                cols += ks
                cuts = np.flatnonzero(np.diff(rows)) + 1
                for rr, cc in zip(np.split(rows, cuts), np.split(cols, cuts)):
                    self._apply(int(pruned[s0 + rr[0]]), cc)
        self.seen[blocks] = k
        # stored distances are upper bounds whether up to date or not
        self.U = np.maximum.reduceat(self.mind, self.bstart)

    def _apply(self, b: int, rel: np.ndarray) -> None:
        """Lower mind/owner of block b's points with the centres `rel`."""
        s, e = int(self.bstart[b]), int(self.bend[b])
        xl, sql, mind, owner = self.xl, self.sql, self.mind, self.owner
        cl = self.C[rel] - self.origin[b]             # centres in the block's coordinates
        cq = np.einsum("ij,ij->i", cl, cl)
        cl *= -2.0
        clT = cl.T
        for cs in range(s, e, _CHUNK):
            ce = min(cs + _CHUNK, e)
            D = xl[cs:ce] @ clT
            D += cq
            mn = D.min(axis=1)
            mn += sql[cs:ce]
            np.maximum(mn, 0.0, out=mn)               # rounding must not look like "chosen"
            mv = mind[cs:ce]
            upd = np.flatnonzero(mn < mv)
            if upd.size:
                mv[upd] = mn[upd]
                owner[cs + upd] = rel[D[upd].argmin(axis=1)]
        self.stats["pairs"] += rel.size
        self.stats["gemm_flop"] += 2 * (e - s) * self.d * rel.size

    def _rebuild(self, k: int) -> None:
        """Bring everything up to date, then regroup the points by owner into blocks."""
        self._refresh(np.arange(self.U.size), k)
        p = np.argsort(self.owner, kind="stable")
        self.perm = self.perm[p]
        self.owner = self.owner[p]
        mind = self.mind[p]
        starts = np.flatnonzero(np.r_[True, self.owner[1:] != self.owner[:-1]])
        self.bstart = starts
        self.bend = np.r_[starts[1:], self.total]
        self.g = self.owner[starts]
        self.origin = self.C[self.g]
        # The regrouped copy is built with the old one freed first and the block origins
        # subtracted a chunk at a time: no full-size temporaries (a fit on 2M patches peaked
        # at 4 copies of the data here, now 2).
        self.xl = None
        self.xl = self.x0[self.perm]
        for cs in range(0, self.total, _CHUNK * 8):
            ce = min(cs + _CHUNK * 8, self.total)
            self.xl[cs:ce] -= self.C[self.owner[cs:ce]]
        self.sql = np.einsum("ij,ij->i", self.xl, self.xl)
        # now exact: every point's distance to its owner, in the difference form
        self.mind = np.where(mind < 0.0, mind, self.sql).astype(np.float32)
        self.U = np.maximum.reduceat(self.mind, starts)
        self.r = np.sqrt(np.maximum.reduceat(self.sql, starts))
        self.seen = np.full(starts.size, k, np.int64)
        self.stats["builds"] += 1

    # -- main loop ----------------------------------------------------------------------
    def run(self) -> np.ndarray:
        n, T = self.n, self.T
        pos0 = self.first                  # perm is the identity at this point
        self._add(0, pos0)
        self.mind[pos0] = -1.0
        k = 1
        v_guess = -1.0                     # first batch: everything gets updated
        ratio = 0.5
        builds = list(self.build_at)
        while k < n:
            self.stats["batches"] += 1
            # 1. update blocks by decreasing bound until >= T/4 points reach the threshold
            order = np.argsort(-self.U, kind="stable")
            neg_u = -self.U[order]         # snapshot: updating lowers U, the order must stay
            i = 0
            while True:
                j = int(np.searchsorted(neg_u, -v_guess, side="right"))
                if j > i:
                    self._refresh(order[i:j], k)
                    i = j
                if i >= order.size:        # everything up to date: any threshold is valid
                    pool = self.mind[self.mind >= 0.0]
                    v = float(np.partition(pool, pool.size - T)[pool.size - T]) \
                        if pool.size > T else 0.0
                    break
                if np.count_nonzero(self.mind >= v_guess) >= T // 4:
                    v = v_guess            # blocks not updated are all below v_guess
                    break
                v_guess = v_guess * 0.7 if v_guess > 0.0 else -1.0
            # 2. candidates: every point >= v, at most about T of them, in original order
            cand = np.flatnonzero(self.mind >= v)
            if cand.size > T:
                vals = self.mind[cand]
                v = max(v, float(np.partition(vals, cand.size - T)[cand.size - T]))
                cand = cand[vals >= v]
            cand = cand[np.argsort(self.perm[cand], kind="stable")]
            xc = self.x0[self.perm[cand]]
            oc = self.owner[cand]
            # exact distances to the owning centre (difference form) decide the argmax
            buf = xc - self.C[oc]
            mc = np.einsum("ij,ij->i", buf, buf)
            top = float(mc.max())
            # 3. pick centres on the candidates while the best one is >= v
            kstart = k
            alive = cand.size
            while k < n and mc.size:
                a = int(np.argmax(mc))
                if mc[a] < v:
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
                if alive < cand.size // 2 or (k - kstart) % 64 == 0:
                    # candidates below v cannot be picked in this batch any more: drop them
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
            # 4. next threshold guess: the bound on what is left, scaled like this batch
            if top > 0.0:
                ratio = min(max(v / top, 0.05), 0.99)
            v_guess = max(float(self.mind.max()), 0.0) * ratio
            if self.progress is not None:
                self.progress(k)
            while builds and k >= builds[0]:
                builds.pop(0)
                if k < n:
                    self._rebuild(k)
        return self.chosen


def naive_greedy_coreset(features: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """The textbook loop (one pass over all points per centre), in float64. For tests."""
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
