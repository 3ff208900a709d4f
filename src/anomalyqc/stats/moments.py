"""Mergeable online moments per grid location (thesis appendix C).

Running count, sum and sum of outer products, in float64, so that the mean and covariance of
any number of images take the memory of one: P x D(D+1)/2 (the outer products are symmetric,
so only their upper triangle is stored). Two accumulators built on disjoint shards merge
exactly (addition), which is what lets a fit run on many processes.
"""

from __future__ import annotations

import torch

_CHUNK = 128  # locations per block of outer products


class OnlineMoments:
    """Per-location first and second moments of D-dimensional embeddings.

    Embeddings arrive as (B, P, D): B images, P grid locations, D channels.
    """

    def __init__(self, locations: int, dim: int, dtype: torch.dtype = torch.float64) -> None:
        self.count = 0
        # Moments are taken about a shift (the first batch's mean) so that each batch's outer
        # products can be formed in fast float32 without cancellation, then added in float64.
        self.shift = torch.zeros(locations, dim, dtype=dtype)
        self.sum = torch.zeros(locations, dim, dtype=dtype)  # of (x - shift)
        self._iu = torch.triu_indices(dim, dim)
        # Upper triangle (row-major, diagonal included) of sum (x - shift)(x - shift)^T.
        self.packed = torch.zeros(locations, self._iu.shape[1], dtype=dtype)

    @property
    def locations(self) -> int:
        return int(self.sum.shape[0])

    @property
    def dim(self) -> int:
        return int(self.sum.shape[1])

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of embeddings (B, P, D)."""
        if x.ndim != 3 or x.shape[1:] != self.sum.shape:
            raise ValueError(f"expected embeddings (B, {self.locations}, {self.dim}), "
                             f"got {tuple(x.shape)}")
        if self.count == 0:
            # A shift float32 represents exactly, so update() and mean() agree on it.
            self.shift = x.to(self.sum.dtype).mean(dim=0).float().to(self.sum.dtype)
        y = x.float() - self.shift.float()
        self.count += int(x.shape[0])
        self.sum += y.sum(dim=0).to(self.sum.dtype)
        yp = y.permute(1, 2, 0).contiguous()  # (P, D, B)
        for start in range(0, self.locations, _CHUNK):  # bounded float32 temporaries
            part = yp[start : start + _CHUNK]
            block = torch.bmm(part, part.transpose(1, 2))
            self.packed[start : start + _CHUNK] += block[:, self._iu[0], self._iu[1]]

    def merge(self, other: OnlineMoments) -> OnlineMoments:
        """Combine with moments of a disjoint shard, in place (exact)."""
        if other.sum.shape != self.sum.shape:
            raise ValueError(f"cannot merge moments of shape {tuple(other.sum.shape)} into "
                             f"{tuple(self.sum.shape)}")
        if self.count == 0:
            self.shift = other.shift.clone()
        # Re-express the other shard's moments about our shift: y' = y + delta.
        delta = other.shift - self.shift
        n2 = other.count
        self.count += n2
        self.sum += other.sum + n2 * delta
        self.packed += other.packed + self._shift_term(delta, other.sum, n2)
        return self

    def recentre(self, shift: torch.Tensor) -> OnlineMoments:
        """Re-express the moments about another shift, in place (exact up to rounding).

        Accumulators that share a shift add up term by term, which is what an all-reduce
        across processes does: broadcast one shift, recentre, then sum count, sum, packed.
        """
        shift = shift.to(self.sum.dtype)
        if shift.shape != self.shift.shape:
            raise ValueError(f"shift of shape {tuple(shift.shape)} for moments of shape "
                             f"{tuple(self.shift.shape)}")
        delta = self.shift - shift  # y about the new shift = y + delta
        self.packed += self._shift_term(delta, self.sum, self.count)
        self.sum += self.count * delta
        self.shift = shift.clone()
        return self

    def _shift_term(self, delta: torch.Tensor, s: torch.Tensor, n: int) -> torch.Tensor:
        """Packed delta s^T + s delta^T + n delta delta^T: what moving the shift adds."""
        i, j = self._iu
        return delta[:, i] * s[:, j] + s[:, i] * delta[:, j] + n * delta[:, i] * delta[:, j]

    def unpack(self, locations: slice | None = None) -> torch.Tensor:
        """Full (P, D, D) sums of outer products (of a slice of locations)."""
        part = self.packed[locations or slice(None)]
        out = torch.empty(part.shape[0], self.dim, self.dim, dtype=part.dtype)
        i, j = self._iu
        out[:, i, j] = part
        out[:, j, i] = part
        return out

    @property
    def outer(self) -> torch.Tensor:
        return self.unpack()

    def mean(self) -> torch.Tensor:
        self._need(1)
        return self.shift + self.sum / self.count

    def covariance(self, eps: float = 0.0, locations: slice | None = None) -> torch.Tensor:
        """Unbiased covariance per location (eq. B.5), plus eps * I (regularisation, B.6).

        `locations` selects a slice of locations, so callers can work in bounded chunks.
        """
        self._need(2)
        sel = locations or slice(None)
        m = self.sum[sel] / self.count  # mean of the shifted data
        cov = (self.unpack(sel) - self.count * m.unsqueeze(2) * m.unsqueeze(1)) / (self.count - 1)
        if eps:
            cov.diagonal(dim1=-2, dim2=-1).add_(eps)
        return cov

    def pooled(self) -> OnlineMoments:
        """All locations as one: the moments of a single global distribution (ablation)."""
        out = OnlineMoments(1, self.dim, self.sum.dtype)
        g = self.shift.mean(dim=0, keepdim=True)
        delta = self.shift - g  # re-express every location about the common shift g
        n = self.count
        out.count = n * self.locations
        out.shift = g
        out.sum = (self.sum + n * delta).sum(dim=0, keepdim=True)
        out.packed = (self.packed + self._shift_term(delta, self.sum, n)).sum(dim=0, keepdim=True)
        return out

    def within_covariance(self, eps: float = 0.0, chunk: int = 64) -> torch.Tensor:
        """(1, D, D) pooled within-location covariance: the mean of the per-location
        covariances, each about its own location's mean, plus eps * I. Unlike pooled(), the
        spread of the location means does not enter it."""
        total = torch.zeros(self.dim, self.dim, dtype=self.sum.dtype)
        for start in range(0, self.locations, chunk):
            total += self.covariance(0.0, slice(start, start + chunk)).sum(dim=0)
        cov = total / self.locations
        if eps:
            cov.diagonal().add_(eps)
        return cov.unsqueeze(0)

    def state(self, prefix: str = "moments") -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.count": torch.tensor([self.count], dtype=torch.int64),
            f"{prefix}.shift": self.shift,
            f"{prefix}.sum": self.sum,
            f"{prefix}.outer": self.packed,
        }

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], prefix: str = "moments") -> OnlineMoments:
        s = tensors[f"{prefix}.sum"]
        out = cls(int(s.shape[0]), int(s.shape[1]), s.dtype)
        out.count = int(tensors[f"{prefix}.count"][0])
        out.shift = tensors[f"{prefix}.shift"].clone()
        out.sum = s.clone()
        packed = tensors[f"{prefix}.outer"]
        if packed.shape != out.packed.shape:
            raise ValueError(f"{prefix}.outer has shape {tuple(packed.shape)}, expected "
                             f"{tuple(out.packed.shape)} (packed upper triangle)")
        out.packed = packed.clone()
        return out

    def cholesky(self, eps: float, chunk: int = 64) -> torch.Tensor:
        """float32 Cholesky factors of the regularised covariances, computed a chunk of
        locations at a time in float64 so the peak memory stays near the moments' own."""
        from anomalyqc.stats.whitening import cholesky

        out = torch.empty(self.locations, self.dim, self.dim, dtype=torch.float32)
        for start in range(0, self.locations, chunk):
            sel = slice(start, start + chunk)
            out[sel] = cholesky(self.covariance(eps, sel)).float()
        return out

    def _need(self, n: int) -> None:
        if self.count < n:
            raise ValueError(f"need at least {n} training images, have {self.count}")
